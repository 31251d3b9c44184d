"""The request bodies of the Simple IMAP2API, checked: credentials, IMAP servers, webhooks.

JSON, form or multipart bodies come in as one mapping (`ApiApp.fields`); a bad field is a 400
naming it, and unknown or read-only keys are ignored, as DRF does. Names, usernames, hosts,
folder names and descriptions are one line: a control character in them is a 400, and a
password for the IMAP server may hold no NUL, CR or LF (it goes into a protocol command).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mailcore.fetch.accounts import MAX_SYNC_INTERVAL, SYNC_LIMIT_TYPES
from mailcore.text import CONTROL_CHARACTER, breaks_line, has_control
from mailcore.webhooks import EVENTS
from web.errors import field_error
from web.parsing import bool_field, collect_fields, int_field, string_field

LINE_BREAK = "NUL, CR and LF are not allowed."


def credentials_input(data: Mapping[str, Any]) -> tuple[str, str]:
    """The username and password of a token request."""
    values = collect_fields(
        {
            "username": lambda: string_field(data, "username", max_length=254, line=True),
            "password": lambda: string_field(data, "password", trim=False, max_length=1024),
        }
    )
    return values["username"], values["password"]


def _nullable_string(data: Mapping[str, Any], name: str) -> str | None:
    if data.get(name) is None or data.get(name) == "":
        return None
    return string_field(data, name, required=False, trim=False, max_length=65536)


def _folders(data: Mapping[str, Any]) -> str | list[str] | None:
    value = data.get("folders_to_sync")
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise field_error("folders_to_sync", "Expected a list of folder names.")
        if any(has_control(v) for v in value):
            raise field_error("folders_to_sync", CONTROL_CHARACTER)
        return value
    return string_field(data, "folders_to_sync", allow_blank=True, max_length=65536, line=True)


def _password(data: Mapping[str, Any], *, required: bool) -> str | None:
    """The IMAP server's password: any text but what would cut the LOGIN line."""
    value = string_field(data, "password", required=required, trim=False, max_length=1024)
    if value is not None and breaks_line(value):
        raise field_error("password", LINE_BREAK)
    return value


def server_input(data: Mapping[str, Any], *, create: bool) -> dict[str, Any]:
    """Checked account fields from a request body; unknown and read-only keys are ignored
    (as DRF does)."""
    checks: dict[str, Callable[[], Any]] = {
        "name": lambda: string_field(data, "name", required=False, allow_blank=True,
                                     max_length=255, line=True),
        "email": lambda: string_field(data, "email", required=False, allow_blank=True,
                                      max_length=254, line=True),
        "host": lambda: string_field(data, "host", required=create, max_length=255,
                                     line=True),
        "port": lambda: int_field(data, "port", minimum=1, maximum=65535),
        "username": lambda: string_field(data, "username", required=create, max_length=255,
                                         line=True),
        "password": lambda: _password(data, required=create),
        "use_ssl": lambda: bool_field(data, "use_ssl"),
        "start_tls": lambda: bool_field(data, "start_tls"),
        "allow_cleartext": lambda: bool_field(data, "allow_cleartext"),
        "exclude_trash": lambda: bool_field(data, "exclude_trash"),
        "enabled": lambda: bool_field(data, "enabled"),
        "sync_limit_type": lambda: string_field(data, "sync_limit_type", required=False),
        "sync_limit_value": lambda: int_field(data, "sync_limit_value", minimum=0),
        "folders_to_sync": lambda: _folders(data),
        "tls_ca_pem": lambda: _nullable_string(data, "tls_ca_pem"),
        "tls_fingerprint": lambda: _nullable_string(data, "tls_fingerprint"),
        "sync_interval": lambda: int_field(data, "sync_interval", minimum=1,
                                           maximum=MAX_SYNC_INTERVAL),
    }
    values = collect_fields(checks)
    clearable = {"tls_ca_pem", "tls_fingerprint", "sync_interval"}
    out = {k: v for k, v in values.items() if v is not None or (k in clearable and k in data)}
    limit = out.get("sync_limit_type")
    if limit is not None and limit not in SYNC_LIMIT_TYPES:
        raise field_error("sync_limit_type", f'"{limit}" is not a valid choice.')
    if create and "use_ssl" not in out:
        out["use_ssl"] = not out.get("start_tls", False)
    return out


def _description(data: Mapping[str, Any]) -> Any:
    """The description as given (the webhook service checks its type and length), refused
    here when it holds a control character."""
    value = data.get("description", "")
    if isinstance(value, str) and has_control(value):
        raise field_error("description", CONTROL_CHARACTER)
    return value


def _active(data: Mapping[str, Any]) -> bool:
    value = bool_field(data, "active")
    return True if value is None else value


def new_webhook_input(data: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `Webhooks.create` from a request body: `url` is required, the
    events default to all of them; the webhook service checks the values."""
    if "url" not in data or data["url"] in (None, ""):
        raise field_error("url", "This field is required.")
    return {
        "url": data["url"],
        "events": data.get("events", list(EVENTS)),
        "description": _description(data),
        "secret": data.get("secret"),
        "active": _active(data),
    }


def webhook_changes(data: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of `Webhooks.update` from a request body: only the fields given."""
    changes: dict[str, Any] = {}
    for key in ("url", "events", "secret"):
        if key in data:
            changes[key] = data[key]
    if "description" in data:
        changes["description"] = _description(data)
    if "active" in data:
        changes["active"] = _active(data)
    if "rotate_secret" in data:
        changes["rotate_secret"] = bool_field(data, "rotate_secret")
    return changes
