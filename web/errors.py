"""Errors raised by handlers, and the error shape of each seed API.

A handler raises `ApiError`; the app that served the request turns it into the JSON body its
seed documents, with the status and headers the error carries. One error, five shapes:

- Simple IMAP2API (DRF): `{"detail": "..."}` or `{"field": ["message", ...]}`
- Mail API: `{"message": "..."}` (or `{"error": "..."}` where the seed says so)
- Protecmail: the envelope `{"request_id", "success": false, "msg"}` on every reply
- safedrop: `{"error": "..."}`, with `{"errors": {"field": [...]}}` for bad form fields
- Dropmyemail (OAuth 2 style): `{"error": "code", "error_description": "..."}`
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from twisted.logger import Logger

from mailcore.outages import Outage

log = Logger(namespace="mailcore.web")

# The short machine code of each status, used where a shape carries one (OAuth, plain).
STATUS_CODES: dict[int, str] = {
    400: "invalid_request",
    401: "invalid_token",
    403: "insufficient_scope",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "server_error",
    503: "temporarily_unavailable",
    507: "insufficient_storage",
}

# Seconds a client is told to wait (Retry-After) when the store is full or unreachable.
OUTAGE_RETRY_AFTER = 30


class ApiError(Exception):
    """A reply that is an error: a status, a human message, and what the shapes may use.

    `fields` maps input fields to their messages (DRF and safedrop show them as such; the
    other shapes show `message`). `code` is a machine-readable error code (OAuth). `key` is
    the JSON key of the message where a seed uses more than one (Mail API "error" vs
    "message"). `extra` adds keys to the body (Mail API's "id"). `headers` go on the reply
    (Retry-After, WWW-Authenticate, Allow).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        fields: Mapping[str, Sequence[str]] | None = None,
        code: str | None = None,
        key: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = {k: list(v) for k, v in fields.items()} if fields else None
        self.code = code
        self.key = key
        self.extra = dict(extra) if extra else {}
        self.headers = dict(headers) if headers else {}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r})"


def outage_error(found: Outage) -> ApiError:
    """A full disk (507) or a database out of reach (503) as the reply to every request that
    needed it, with Retry-After; logged without a traceback, in words that are the same for
    every request (the repeat limiter keeps an outage to a few lines a minute)."""
    status = 507 if found.full else 503
    log.warn("answering {status} while {what}", status=status, what=found.what)
    return ApiError(status, f"Try again later: {found.what}.",
                    headers={"Retry-After": str(OUTAGE_RETRY_AFTER)})


def too_large(limit: int) -> ApiError:
    """413: the request body is over `limit` bytes."""
    return ApiError(413, f"Request body too large (at most {limit} bytes).")


def field_error(name: str, message: str, status: int = 400) -> ApiError:
    """A 400 about one input field: DRF shows `{name: [message]}`, others `name: message`."""
    return ApiError(status, f"{name}: {message}", fields={name: [message]})


class ErrorShape:
    """How one API writes an error body. Subclasses override `body` and `schema`."""

    name: ClassVar[str] = "plain"

    def body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        return {"error": error.message, "status": error.status, **error.extra}

    def schema(self) -> dict[str, Any]:
        """JSON Schema of the error body, for the OpenAPI document."""
        return {
            "type": "object",
            "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
            "required": ["error"],
        }

    def not_found(self) -> str:
        return "Not found."

    def method_not_allowed(self, method: str) -> str:
        return f"Method {method} not allowed."

    def internal_error(self) -> str:
        return "Internal server error."


class PlainErrors(ErrorShape):
    """Paths no seed API owns (and /metrics, /openapi.json): `{"error", "status"}`."""

    name = "plain"


class DrfErrors(ErrorShape):
    """Simple IMAP2API, a Django REST framework service."""

    name = "drf"

    def body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        if error.fields:
            return {**error.fields, **error.extra}
        return {"detail": error.message, **error.extra}

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "description": '`{"detail": "..."}`, or `{"field": ["message"]}` for bad input',
            "properties": {"detail": {"type": "string"}},
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        }

    def method_not_allowed(self, method: str) -> str:
        return f'Method "{method}" not allowed.'


class MailApiErrors(ErrorShape):
    """Mail API: `{"message": ...}`, or another key where the seed names one."""

    name = "mailapi"

    def body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        return {error.key or "message": error.message, **error.extra}

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"message": {"type": "string"}, "error": {"type": "string"}},
        }

    def not_found(self) -> str:
        return "not found"


class EnvelopeErrors(ErrorShape):
    """Protecmail: every reply is the envelope; errors have success false and a msg."""

    name = "envelope"

    def body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": request_id, "success": False, "msg": error.message}
        if error.fields:
            body["data"] = error.fields
        if error.extra:
            body["data"] = {**body.get("data", {}), **error.extra}
        return body

    def schema(self) -> dict[str, Any]:
        return envelope_schema({})


class SafedropErrors(ErrorShape):
    """safedrop: `{"error": ...}`, plus the offending form fields."""

    name = "safedrop"

    def body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {"error": error.message, **error.extra}
        if error.fields:
            body["errors"] = error.fields
        return body

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "error": {"type": "string"},
                "errors": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": {"type": "string"}},
                },
            },
            "required": ["error"],
        }


class OAuthErrors(ErrorShape):
    """Dropmyemail: RFC 6749/6750 style `{"error": code, "error_description": ...}`."""

    name = "oauth"

    def body(self, error: ApiError, request_id: str) -> dict[str, Any]:
        code = error.code or STATUS_CODES.get(error.status, "error")
        return {"error": code, "error_description": error.message, **error.extra}

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "error": {"type": "string"},
                "error_description": {"type": "string"},
            },
            "required": ["error"],
        }


def envelope_schema(data: dict[str, Any] | None) -> dict[str, Any]:
    """JSON Schema of a Protecmail envelope whose `data` has schema `data` (None: no data)."""
    properties: dict[str, Any] = {
        "request_id": {"type": "string", "format": "uuid"},
        "success": {"type": "boolean"},
        "msg": {"type": "string"},
    }
    if data is not None:
        properties["data"] = data
    return {"type": "object", "properties": properties, "required": ["request_id", "success"]}
