"""Dropmyemail's migrates and restores (`/v1/accounts/:id/migrates`, `/restores`).

The handlers live here, on `JobRoutes`, a base of `DropmyemailApp`; `install(routes)` adds
them to its route table (so they share its OAuth principal, rate limit, error shape and
OpenAPI document). The model is `mailcore.backup.jobs.BackupJobs` (given with `with_jobs`).

A migrate's `status` is queued, running, done or failed (`reason` says why); `downloaded`
counts the messages dealt with so far (written, or found already at the destination),
`messages` the messages the job has to deal with, `appended` those it wrote. A restore has the
same fields and `restore_size`, the bytes it has to put back, and `attempts`, its runs so far.
`backup_id` is the account whose backup is copied; `message_ids` the backed-up messages
dealt with, one id per message (millions, for a large account): lists and shows are
streamed, the ids read from the store and written a chunk at a time. The destination's
password is never returned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self

from twisted.web.iweb import IRequest

from mailcore.backup.accounts import BackupError, iso, login_check_deadline
from mailcore.backup.jobs import JobConflict, JobLimitReached
from mailcore.fetch.jobs import STATUSES, Job
from web.auth import DROPMYEMAIL
from web.errors import ApiError
from web.jsonstream import member_open, stream_json_text
from web.openapi import Reply, RouteTable
from web.parsing import (
    FORM_TYPE,
    bool_field,
    collect_fields,
    int_field,
    is_json_type,
    media_type,
    query_params,
    read_json,
    string_field,
)

if TYPE_CHECKING:
    from mailcore.backup.jobs import BackupJobs
    from mailcore.identity import Principal
    from web.settings import WebSettings

_PROGRESS = {
    "id": {"type": "integer"},
    "account_id": {"type": "integer"},
    "status": {"type": "string", "enum": list(STATUSES)},
    "reason": {"type": ["string", "null"], "description": "why the job failed, or why "
               "its last attempt did while it waits to retry"},
    "downloaded": {"type": "integer", "description": "messages dealt with so far"},
    "messages": {"type": "integer", "description": "messages the job has to deal with"},
    "appended": {"type": "integer", "description": "messages written (the others were "
                 "found at the destination already)"},
    "attempts": {"type": "integer"},
    "start_time": {"type": ["string", "null"], "format": "date-time"},
    "end_time": {"type": ["string", "null"], "format": "date-time"},
    "created_at": {"type": "string", "format": "date-time"},
    "backup_id": {"type": "integer", "description": "the account whose backup is copied"},
    "message_ids": {"type": "array", "items": {"type": "integer"},
                    "description": "the backed-up messages dealt with"},
}
MIGRATE = {
    "type": "object",
    "properties": {
        **_PROGRESS,
        "email": {"type": "string"}, "host": {"type": "string"},
        "protocol": {"type": "string", "enum": ["imap"]},
        "start_tls": {"type": "boolean"}, "ssl": {"type": "boolean"},
        "port": {"type": "integer"},
    },
    "required": ["id", "account_id", "host", "protocol", "start_tls", "ssl", "port",
                 "downloaded", "messages", "status", "start_time", "end_time", "created_at",
                 "backup_id", "message_ids", "email"],
}
RESTORE = {
    "type": "object",
    "properties": {
        **_PROGRESS,
        "user_id": {"type": "integer"},
        "restore_size": {"type": "integer", "description": "bytes to put back"},
    },
    "required": ["id", "user_id", "account_id", "downloaded", "restore_size", "messages",
                 "attempts", "created_at", "status", "start_time", "end_time", "backup_id",
                 "message_ids"],
}
MIGRATE_INPUT = {
    "type": "object",
    "properties": {
        "email": {"type": "string"},
        "password": {"type": "string"},
        "host": {"type": "string", "description": "default: derived from the address as for "
                 "accounts (imap.<domain> or [dropmyemail] providers)"},
        "protocol": {"type": "string", "enum": ["imap"]},
        "start_tls": {"type": "boolean"},
        "ssl": {"type": "boolean"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "tls_ca_pem": {"type": "string", "description": "a CA (PEM) to trust for this "
                       "server instead of the system's (an extension)"},
        "tls_fingerprint": {"type": "string", "description": "the SHA-256 fingerprint of the "
                            "server's certificate to accept (an extension)"},
    },
    "required": ["email", "password"],
}
RESTORE_INPUT: dict[str, Any] = {"type": "object", "properties": {},
                                 "additionalProperties": False}
JOB_QUERY = {
    "sort": {"type": "string", "enum": ["start_time", "end_time"]},
    "direction": {"type": "string", "enum": ["asc", "desc"]},
}


def _common(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "account_id": job.account_id, "status": job.status,
        "reason": job.reason, "downloaded": job.downloaded, "messages": job.messages,
        "appended": job.appended, "attempts": job.attempts,
        "start_time": iso(job.start_time), "end_time": iso(job.end_time),
        "created_at": iso(job.created_at), "backup_id": job.account_id,
        "message_ids": list(job.message_ids),
    }


def migrate_json(job: Job) -> dict[str, Any]:
    """A migrate as the documentation shows it; never the destination's password."""
    return {**_common(job), "email": job.email, "host": job.host, "protocol": "imap",
            "start_tls": job.start_tls, "ssl": job.use_ssl, "port": job.port}


def restore_json(job: Job) -> dict[str, Any]:
    return {**_common(job), "user_id": job.user_id, "restore_size": job.restore_size}


async def _job_text(jobs: BackupJobs, job: Job) -> AsyncIterator[bytes]:
    """A migrate or restore as JSON text, its `message_ids` (one per message the job dealt
    with: millions, for a large account) read and written a chunk at a time, last."""
    shown = migrate_json(job) if job.kind == "migrate" else restore_json(job)
    shown.pop("message_ids")
    yield member_open(shown, "message_ids", b"[")
    separator = b""
    async for chunk in jobs.message_ids(job.id):
        yield separator + ",".join(map(str, chunk)).encode("ascii")
        separator = b","
    yield b"]}"


def choice(params: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    """Query parameter `name`, one of `allowed` (`default` when absent or empty); else 400."""
    value = params.get(name, default) or default
    if value not in allowed:
        raise ApiError(400, f"{name} must be one of {', '.join(allowed)}.")
    return value


def refuse_unknown_fields(data: Mapping[str, Any], *known: Iterable[str]) -> None:
    """A 400 naming the first field of `data` not among the `known` names (a schema's
    properties); an access token in the body was refused before (principal)."""
    unknown = sorted(set(data).difference(*known))
    if unknown:
        raise ApiError(400, f"Unknown field: {unknown[0]}.")


class JobRoutes:
    """The migrate and restore handlers of the Dropmyemail app (module docstring)."""

    jobs: BackupJobs | None = None

    if TYPE_CHECKING:
        async def principal(self, request: IRequest, scope: str) -> Principal: ...

        def reply(self, request: IRequest, body: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> bytes: ...

        def fields(self, request: IRequest, *, untyped_form: bool = ...) -> dict[str, Any]: ...

        settings: WebSettings

    def with_jobs(self, jobs: BackupJobs) -> Self:
        """This app, serving `jobs`' migrates and restores."""
        self.jobs = jobs
        return self

    def _jobs(self) -> BackupJobs:
        if self.jobs is None:
            raise ApiError(503, "Migrates and restores are not available on this server.",
                           code="temporarily_unavailable")
        return self.jobs

    async def _list(self, request: IRequest, account_id: int, kind: str) -> bytes:
        principal = await self.principal(request, "read")
        params = query_params(request)
        sort = choice(params, "sort", ("start_time", "end_time"), "start_time")
        direction = choice(params, "direction", ("asc", "desc"), "asc")
        jobs = self._jobs()
        try:
            found = await jobs.list(principal.user.id, account_id, kind, sort=sort,
                                    direction=direction, with_message_ids=False)
        except BackupError as e:
            raise ApiError(400, e.message, code="invalid_request") from None
        if found is None:
            raise ApiError(404, "No such account.")

        async def text() -> AsyncIterator[bytes]:
            yield b"["
            for n, job in enumerate(found):
                if n:
                    yield b","
                async for piece in _job_text(jobs, job):
                    yield piece
            yield b"]"

        await stream_json_text(request, text())
        return b""

    async def _show(self, request: IRequest, account_id: int, kind: str, job_id: int
                    ) -> bytes:
        principal = await self.principal(request, "read")
        jobs = self._jobs()
        job = await jobs.get(principal.user.id, account_id, kind, job_id,
                             with_message_ids=False)
        if job is None:
            raise ApiError(404, f"No such {kind}.")
        await stream_json_text(request, _job_text(jobs, job))
        return b""

    async def list_migrates(self, request: IRequest, account_id: int) -> bytes:
        return await self._list(request, account_id, "migrate")

    async def show_migrate(self, request: IRequest, account_id: int, migrate_id: int
                           ) -> bytes:
        return await self._show(request, account_id, "migrate", migrate_id)

    async def create_migrate(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "write")
        jobs = self._jobs()
        data = self.fields(request)
        values = collect_fields({
            "email": lambda: string_field(data, "email", max_length=254, line=True),
            "password": lambda: string_field(data, "password", trim=False, max_length=1024,
                                             line=True),
            "host": lambda: string_field(data, "host", required=False, max_length=255,
                                         line=True),
            "protocol": lambda: string_field(data, "protocol", required=False, max_length=8),
            "start_tls": lambda: bool_field(data, "start_tls"),
            "ssl": lambda: bool_field(data, "ssl"),
            "port": lambda: int_field(data, "port", minimum=1, maximum=65535),
            "tls_ca_pem": lambda: string_field(data, "tls_ca_pem", required=False,
                                               trim=False, max_length=65536),
            "tls_fingerprint": lambda: string_field(data, "tls_fingerprint", required=False,
                                                    max_length=128, line=True),
        })
        refuse_unknown_fields(data, MIGRATE_INPUT["properties"])
        try:
            job = await jobs.migrate(principal.user.id, account_id,
                                     {k: v for k, v in values.items() if v is not None},
                                     deadline=login_check_deadline(self.settings.reply_timeout))
        except BackupError as e:
            raise ApiError(400, e.message, code="invalid_request") from None
        except (JobConflict, JobLimitReached) as e:
            raise ApiError(409, e.message) from None
        if job is None:
            raise ApiError(404, "No such account.")
        return self.reply(request, migrate_json(job), 201)

    async def list_restores(self, request: IRequest, account_id: int) -> bytes:
        return await self._list(request, account_id, "restore")

    async def show_restore(self, request: IRequest, account_id: int, restore_id: int
                           ) -> bytes:
        return await self._show(request, account_id, "restore", restore_id)

    async def create_restore(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "write")
        # No input (dropmyemail-v1.md): a field is a 400, not ignored. A client asking for
        # some messages back (`message_ids`) would otherwise get every missing one. A JSON
        # null says "no input" as an empty body does.
        if is_json_type(media_type(request)):
            data = read_json(request, self.settings.json_max_body)
            if data is not None and not isinstance(data, dict):
                raise ApiError(400, "Invalid data. Expected a JSON object or nothing.")
        else:
            data = self.fields(request)
        refuse_unknown_fields(data or {}, RESTORE_INPUT["properties"])
        try:
            job = await self._jobs().restore(principal.user.id, account_id)
        except BackupError as e:
            raise ApiError(400, e.message, code="invalid_request") from None
        except (JobConflict, JobLimitReached) as e:
            raise ApiError(409, e.message) from None
        if job is None:
            raise ApiError(404, "No such account.")
        return self.reply(request, restore_json(job), 201)


KEPT_TEXT = ("An account keeps its newest `[dropmyemail] jobs_kept_per_account` (100) "
             "finished jobs of each kind: a new job deletes the oldest beyond that name "
             "no message, a sweep every 10 minutes the others.")


def install(routes: RouteTable) -> None:
    """Serve and document the migrate and restore routes on the Dropmyemail route table."""
    base = "/v1/accounts/<int:account_id>"
    errors = (401, 403, 404, 429)
    streamed = ("The reply is streamed: each job's message_ids are read and written a chunk "
                "at a time.")
    routes.route(
        f"{base}/migrates", "GET", summary="List an account's migrates",
        description=f"{streamed} {KEPT_TEXT}",
        auth=DROPMYEMAIL, scope="read", query=JOB_QUERY,
        replies={200: Reply("The migrates", {"type": "array", "items": MIGRATE})},
        errors=errors,
    )(JobRoutes.list_migrates)
    routes.route(
        f"{base}/migrates/<int:migrate_id>", "GET", summary="Show a migrate and its progress",
        description=streamed, auth=DROPMYEMAIL, scope="read",
        replies={200: Reply("The migrate", MIGRATE)},
        errors=errors,
    )(JobRoutes.show_migrate)
    routes.route(
        f"{base}/migrates", "POST",
        summary="Copy the account's backup into another IMAP mailbox (a background job)",
        description="Logs in to the destination first (a refusal is a 400 with the server's "
        "reason, and nothing is stored); its password is stored encrypted and never "
        "returned. The job brings the backup up to date, then copies every backed-up "
        "message, folder by folder, with its flags and INTERNALDATE, exactly once: a "
        "message counts as copied only after the server's OK, and messages already at the "
        "destination are not copied again. Its end fires the webhook event "
        "migrate.completed. While a migrate of the account into the same destination "
        "(host, port, user) is queued or running, another is a 409; other jobs writing to that "
        "mailbox (of any account) wait, queued, while one runs there. A user has at most "
        "`[dropmyemail] max_queued_jobs_per_user` migrates and restores queued or running "
        "(100): one more is a 409 naming the cap, and nothing is stored.",
        auth=DROPMYEMAIL, scope="write", body=MIGRATE_INPUT,
        body_types=("application/json", FORM_TYPE),
        replies={201: Reply("The migrate, queued", MIGRATE)}, errors=(400, 409, *errors),
    )(JobRoutes.create_migrate)
    routes.route(
        f"{base}/restores", "GET", summary="List an account's restores",
        description=f"{streamed} {KEPT_TEXT}",
        auth=DROPMYEMAIL, scope="read", query=JOB_QUERY,
        replies={200: Reply("The restores", {"type": "array", "items": RESTORE})},
        errors=errors,
    )(JobRoutes.list_restores)
    routes.route(
        f"{base}/restores/<int:restore_id>", "GET", summary="Show a restore and its progress",
        description=streamed, auth=DROPMYEMAIL, scope="read",
        replies={200: Reply("The restore", RESTORE)},
        errors=errors,
    )(JobRoutes.show_restore)
    routes.route(
        f"{base}/restores", "POST",
        summary="Put back into the account every backed-up message no longer there",
        description="No input: an empty body (or `{}`, or JSON null); any field is a 400 "
        "naming it, "
        "`message_ids` among them (the whole backup is restored, never a choice of messages), "
        "as is a body that is not a JSON object or a form. A background job brings the "
        "backup up to date, then appends "
        "each backed-up message missing from the account into its folder (made again if it "
        "was deleted), exactly once; a restore of an intact account appends nothing. Its "
        "end fires the webhook event restore.completed. While a restore of the account is "
        "queued or running, another is a 409; other jobs writing to its mailbox (of any "
        "account) wait, queued, while one runs there. A user has at most `[dropmyemail] "
        "max_queued_jobs_per_user` migrates and restores queued or running (100): one "
        "more is a 409 naming the cap, and nothing is stored.",
        auth=DROPMYEMAIL, scope="write", body=RESTORE_INPUT,
        body_types=("application/json", FORM_TYPE),
        replies={201: Reply("The restore, queued", RESTORE)}, errors=(400, 409, *errors),
    )(JobRoutes.create_restore)
