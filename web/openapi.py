"""The route registry every app declares its routes through, and the OpenAPI 3.1 document.

An app never calls `Klein.route` itself: it declares each route on its `RouteTable`, which
registers the Klein rule and records what the document needs (summary, credential, input
and output schemas). The document is built from those records, so it lists exactly the
routes that are served; a test checks that the Klein rules and the document agree.

Every table makes `<int:…>` in its paths `web.parsing.IdConverter` (ASCII digits, at most
2^31-1, what an id column holds: a larger id is a 404, as an unknown one), and the document
says so; its other segments go through `web.parsing.TextConverter` (one holding NUL or a
lone surrogate is a 404 too).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from klein import Klein

from web.auth import AuthPolicy
from web.deadline import within_deadline
from web.errors import ErrorShape
from web.parsing import (
    ID_MAX,
    INT64_MAX,
    BigIdConverter,
    IdConverter,
    TextConverter,
)

F = TypeVar("F", bound=Callable[..., Any])

_CONVERTER = re.compile(r"<(?:(?P<conv>[a-zA-Z_]+)(?:\([^)]*\))?:)?(?P<name>[a-zA-Z_]\w*)>")
_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "int": {"type": "integer", "minimum": 0, "maximum": ID_MAX},
    "bigint": {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
    "float": {"type": "number"},
    "uuid": {"type": "string", "format": "uuid"},
}
_DEFAULT_ERRORS = {
    400: "Bad input",
    401: "No or bad credential",
    403: "Refused to this credential or account",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflicts with the state of the object",
    413: "Request body too large",
    415: "Unsupported media type: the body is not of a type the route reads (its "
         "requestBody's), or carries a Content-Encoding that transforms it (gzip, br...): "
         "bodies are taken "
         "uncoded, as Accept-Encoding says",
    429: "Rate limited",
    500: "Internal error",
    502: "A remote server failed",
    503: "Cannot be done now (the database cannot be reached, is busy or did not answer in "
         "time, or the work cannot be queued); try again later, after Retry-After when "
         "given. A write answered so for want of time may still have been applied",
    507: "No room left: the mailbox's quota, or the server's storage is full (then with "
         "Retry-After)",
}

# What a 429 carries (web.ratelimit.Decision.headers).
RATE_LIMIT_HEADERS = {
    "Retry-After": "Seconds until the request may be made again",
    "X-RateLimit-Limit": "Requests the bucket holds",
    "X-RateLimit-Remaining": "Requests left now",
    "X-RateLimit-Reset": "Epoch seconds when the bucket is full again",
}


@dataclass(frozen=True)
class Reply:
    """One documented reply: a description, and a schema for its body (None: no body)."""

    description: str
    schema: Mapping[str, Any] | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    # Other bodies the same status may carry: content type -> schema.
    alternatives: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A content type without a schema would vanish from the document (no body).
        if self.schema is None and self.content_type != "application/json":
            raise ValueError(f"a {self.content_type} reply needs a schema "
                             '({"type": "string", "format": "binary"} for bytes)')


@dataclass(frozen=True)
class RouteSpec:
    """One declared route: its paths, methods and what the document says about it."""

    api: str
    name: str
    paths: tuple[str, ...]
    methods: tuple[str, ...]
    summary: str
    description: str = ""
    auth: tuple[AuthPolicy, ...] = ()
    scope: str | None = None
    body: Mapping[str, Any] | None = None
    body_types: tuple[str, ...] = ("application/json",)
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    replies: Mapping[int, Reply] = field(default_factory=dict)
    errors: tuple[int, ...] = ()


class RouteTable:
    """Declares routes on one Klein app and remembers them for the OpenAPI document."""

    def __init__(self, klein: Klein, api: str, *, errors: Sequence[int] = (),
                 body_errors: Sequence[int] = ()) -> None:
        self.klein = klein
        self.api = api
        # Statuses every route of the API may answer (429 where every request is rate
        # limited), besides those each route lists; and those every route taking a body
        # may (415 for a body of another type, where the API answers so).
        self.errors = tuple(errors)
        self.body_errors = tuple(body_errors)
        self.specs: list[RouteSpec] = []
        # Before any rule is added: a rule looks its converters up when it is added.
        klein.url_map.converters["int"] = IdConverter
        klein.url_map.converters["bigint"] = BigIdConverter
        klein.url_map.converters["default"] = klein.url_map.converters["string"] = TextConverter

    def route(
        self,
        paths: str | Sequence[str],
        methods: str | Sequence[str],
        *,
        summary: str,
        description: str = "",
        auth: AuthPolicy | Sequence[AuthPolicy] = (),
        scope: str | None = None,
        body: Mapping[str, Any] | None = None,
        body_types: Sequence[str] = ("application/json",),
        query: Mapping[str, Mapping[str, Any]] | None = None,
        replies: Mapping[int, Reply] | None = None,
        errors: Sequence[int] = (),
        body_errors: Sequence[int] | None = None,
    ) -> Callable[[F], F]:
        """Serve the decorated method at `paths` for `methods`, and document it.

        Trailing slashes are optional on every path (a client may send either form).
        `auth` lists the credential policies of which the route accepts any one.
        `body_errors` replaces the API's for a route that takes a body.
        """
        policies = (auth,) if isinstance(auth, AuthPolicy) else tuple(auth)
        path_list = (paths,) if isinstance(paths, str) else tuple(paths)
        method_list = (methods,) if isinstance(methods, str) else tuple(methods)
        if body is not None and set(method_list) - {"GET", "HEAD", "DELETE"}:
            errors = (*errors, *(self.body_errors if body_errors is None else body_errors))

        def decorate(f: F) -> F:
            for i, path in enumerate(path_list):
                endpoint = f.__name__ if i == 0 else f"{f.__name__}__{i}"
                self.klein.route(
                    path, methods=list(method_list), strict_slashes=False, endpoint=endpoint
                )(within_deadline(f))
            self.specs.append(
                RouteSpec(
                    api=self.api,
                    name=f.__name__,
                    paths=path_list,
                    methods=method_list,
                    summary=summary,
                    description=description or (f.__doc__ or "").strip(),
                    auth=policies,
                    scope=scope,
                    body=body,
                    body_types=tuple(body_types),
                    query=dict(query or {}),
                    replies=dict(replies or {200: Reply("OK")}),
                    errors=tuple(dict.fromkeys((*self.errors, *errors))),
                )
            )
            return f

        return decorate


class DocumentedApi(Protocol):
    """What the document needs from an app: its name, title, routes and error shape."""

    @property
    def name(self) -> str: ...

    @property
    def title(self) -> str: ...

    @property
    def routes(self) -> RouteTable: ...

    @property
    def shape(self) -> ErrorShape: ...


def openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    """A Werkzeug rule as an OpenAPI path, with its path parameters."""
    parameters: list[dict[str, Any]] = []

    def replace(m: re.Match[str]) -> str:
        schema = _CONVERTER_SCHEMAS.get(m.group("conv") or "", {"type": "string"})
        parameters.append(
            {"name": m.group("name"), "in": "path", "required": True, "schema": dict(schema)}
        )
        return "{" + m.group("name") + "}"

    return _CONVERTER.sub(replace, rule), parameters


def error_schema_name(api: str) -> str:
    return f"{api}Error"


def _bad_input(spec: RouteSpec, method: str, statuses: set[int]) -> str:
    """The 400's description: bad input, with what of it the route's parameters and body
    may be besides a bad value (web.parsing)."""
    kinds = []
    if spec.query and spec.api != "imap2api":  # it takes the last (queries.drf_query)
        kinds.append("a query parameter given twice with different values")
    if spec.body is not None and method not in ("GET", "HEAD", "DELETE") \
            and 415 not in statuses:
        kinds.append("a body of a type the route does not read, or with a Content-Encoding "
                     "that transforms it (gzip, br...)")
    return _DEFAULT_ERRORS[400] + (f" ({'; '.join(kinds)}, among it)" if kinds else "")


def _operation(spec: RouteSpec, method: str, index: int) -> dict[str, Any]:
    suffix = "" if index == 0 else f"_{index}"
    op: dict[str, Any] = {
        "operationId": f"{spec.api}.{spec.name}.{method.lower()}{suffix}",
        "summary": spec.summary,
        "tags": [spec.api],
    }
    if spec.description:
        op["description"] = spec.description
    if spec.query:
        op["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": dict(schema)}
            for name, schema in spec.query.items()
        ]
    if spec.body is not None and method not in ("GET", "HEAD", "DELETE"):
        op["requestBody"] = {
            "required": True,
            "content": {t: {"schema": dict(spec.body)} for t in spec.body_types},
        }
    if spec.auth:
        scopes = [spec.scope] if spec.scope else []
        op["security"] = [req for policy in spec.auth for req in policy.security(scopes)]
    responses: dict[str, Any] = {}
    for status, reply in sorted(spec.replies.items()):
        entry: dict[str, Any] = {"description": reply.description}
        if reply.schema is not None:
            entry["content"] = {reply.content_type: {"schema": dict(reply.schema)}}
        for content_type, schema in reply.alternatives.items():
            entry.setdefault("content", {})[content_type] = {"schema": dict(schema)}
        if reply.headers:
            entry["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in reply.headers.items()
            }
        responses[str(status)] = entry
    # Any request may be bad input (a path that is not UTF-8, a bad parameter or body), an
    # unknown path, the wrong method or too large, or meet the store out of reach; any
    # write may meet it full (mailcore.outages).
    error_statuses = set(spec.errors) | {400, 404, 405, 413, 500, 503}
    if method not in ("GET", "HEAD"):
        error_statuses.add(507)
    if spec.auth:
        error_statuses.add(401)
    error_schema = {"$ref": f"#/components/schemas/{error_schema_name(spec.api)}"}
    for status in sorted(error_statuses):
        if str(status) in responses:
            continue
        responses[str(status)] = {
            "description": (_bad_input(spec, method, error_statuses) if status == 400
                            else _DEFAULT_ERRORS.get(status, "Error")),
            "content": {"application/json": {"schema": error_schema}},
        }
        if status == 415:  # web.parsing.coded_body
            responses[str(status)]["headers"] = {"Accept-Encoding": {
                "description": "identity: the content codings a request body may carry "
                               "(none)", "schema": {"type": "string"}}}
        elif status == 429:
            responses[str(status)]["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in RATE_LIMIT_HEADERS.items()
            }
        elif status == 401:  # web.replies.challenge_401 (ApiApp.challenge, an AuthPolicy's)
            responses[str(status)]["headers"] = {"WWW-Authenticate": {
                "description": "The challenge naming the credential the API takes "
                               "(RFC 9110 11.6.1)",
                "schema": {"type": "string"}}}
        elif status in (503, 507):
            responses[str(status)]["headers"] = {"Retry-After": {
                "description": "Seconds to wait before trying again (an outage)",
                "schema": {"type": "string"}}}
    op["responses"] = responses
    return op


def document(apis: Iterable[DocumentedApi], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the given apps declare."""
    paths: dict[str, dict[str, Any]] = {}
    schemes: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    tags = []
    for api in apis:
        tags.append({"name": api.name, "description": api.title})
        schemas[error_schema_name(api.name)] = api.shape.schema()
        for spec in api.routes.specs:
            for policy in spec.auth:
                for name, scheme in policy.security_schemes.items():
                    schemes[name] = dict(scheme)
            for index, rule in enumerate(spec.paths):
                path, parameters = openapi_path(rule)
                item = paths.setdefault(path, {})
                if parameters:
                    item["parameters"] = parameters
                for method in spec.methods:
                    key = method.lower()
                    if key in item:
                        raise ValueError(f"{method} {path} is declared twice")
                    item[key] = _operation(spec, method, index)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "tags": tags,
        "paths": dict(sorted(paths.items())),
    }
    doc["components"] = {"schemas": dict(sorted(schemas.items()))}
    if schemes:
        doc["components"]["securitySchemes"] = dict(sorted(schemes.items()))
    return doc
