"""The base class of every seed API app: a Klein app per class, replies in the API's shape.

A subclass sets `name`, `title`, `shape`, `app = Klein()` and `routes = RouteTable(app,
name)`, takes the services it needs in `__init__`, and declares its handlers with
`@routes.route(...)`. Whatever a handler raises comes back in the API's error shape:
`ApiError` as itself, Werkzeug's routing errors as 404/405, anything else as a logged 500
without a trace; every 405 carries Allow, the methods its path answers
(`ApiApp.with_allow`). An error once the reply has begun (a stream that failed midway)
renders nothing: the status line and headers have gone, and a page written after them would
be read as the rest of the body, or as the next response on a kept-alive connection. It is
logged and the connection dropped (`drop_connection`), so the client sees a cut-off reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from mailcore.outages import outage
from web.accesslog import redacted_path
from web.context import context_of
from web.errors import ApiError, ErrorShape, outage_error
from web.openapi import RouteTable
from web.parsing import UNSUPPORTED_MEDIA_STATUS, read_fields, read_json_object
from web.replies import encode_json, json_reply
from web.settings import WebSettings

log = Logger(namespace="mailcore.web")


def response_started(request: IRequest) -> bool:
    """Whether the reply's status line and headers have been written."""
    return bool(getattr(request, "startedWriting", False))


def drop_connection(request: IRequest) -> None:
    """End a reply that cannot be finished honestly: the connection is aborted (nothing more
    is written, not even the last chunk of a chunked body that would make a cut-off reply
    look whole) and takes no further request."""
    channel = getattr(request, "channel", None)
    if channel is None:
        return  # the client is gone already
    channel.persistent = False
    transport = channel.transport
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


def is_head(request: IRequest) -> bool:
    """Whether `request` is a HEAD. Werkzeug routes a HEAD to the route that takes GET and
    twisted.web drops the body that route writes, so every GET route answers HEAD. HEAD is
    safe (RFC 9110 9.2.1, 9.3.2: a link checker, a proxy's or monitor's probe, `curl -I`):
    a route whose GET changes anything (mints a token, sends or releases mail, marks mail
    read, records an opening or a download) asks this and, for a HEAD, answers what its GET
    would (status, headers) with nothing changed. Counting the request against a rate
    limit, or noting when a credential was last used, is no such change."""
    return request.method == b"HEAD"


def _klein_failure(self: Any, request: IRequest, failure: Failure) -> bytes:
    """Klein error handler installed on every app: delegate to the app instance."""
    app: ApiApp = self
    return app.handle_failure(request, failure)


class ApiApp:
    """One seed API: its routes, its error shape, and helpers to reply in that shape."""

    name: ClassVar[str]
    title: ClassVar[str]
    shape: ClassVar[ErrorShape]
    app: ClassVar[Klein]
    routes: ClassVar[RouteTable]
    # What every reply of the app tells caches, set by the root before the app answers (a
    # handler may set its own: the stylesheet's is cached for a year). The APIs' replies
    # carry account data and answer credentials that are no `Authorization` header
    # (X-Auth-Token, Api-Key, `Token` ...), which RFC 9111 3.5 does not keep from shared
    # caches: none may store them. None: no such header (web.meta: the metrics and the
    # OpenAPI document).
    cache_control: ClassVar[bytes | None] = b"no-store"
    # The WWW-Authenticate every 401 of the app carries unless its reply names its own (an
    # AuthPolicy's challenge, with its error code): RFC 9110 11.6.1 has every 401 carry
    # one. The root hands it to the request (web.context); web.replies sets it on a 401.
    # The scheme names the credential the API's document defines (a header's name is a
    # valid auth-scheme token), with the app's name as realm. None: no 401 (the pages').
    challenge: ClassVar[str | None] = None
    # The status of a body of a type the route does not read: 415 (RFC 9110 15.5.16), or
    # 400 where the API's document lists the statuses its clients know (the Mail API's
    # tables, safedrop's "400 ... when the form encoded properties do not meet
    # requirements") and the pages, which a browser's form reaches.
    unsupported_media_status: ClassVar[int] = UNSUPPORTED_MEDIA_STATUS
    # Whether a form or multipart text field, or a JSON key, given twice with different
    # values is a 400 (an API whose fields each take one value: a client sending a list as
    # forms do, `to=a&to=b`, would otherwise have the last value taken and the others
    # dropped unseen), rather than the last value winning.
    one_value_fields: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "app" in cls.__dict__:
            cls.app.handle_errors(Exception)(_klein_failure)

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        # Reading `self.app` binds the class's Klein app to this instance; the resource
        # keeps that binding alive.
        self._resource = self.app.resource()

    # -- serving ---------------------------------------------------------------------------

    def render(self, request: IRequest) -> Any:
        """Route and render `request` (the root resource hands it over with its full path)."""
        return self._resource.render(request)

    def reply(
        self,
        request: IRequest,
        body: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """A JSON reply."""
        return json_reply(request, body, status, headers)

    def error_reply(self, request: IRequest, error: ApiError) -> bytes:
        """`error` in this API's shape (a 405 with its Allow header: with_allow; a body
        of a type it does not read with its `unsupported_media_status`)."""
        if error.status == UNSUPPORTED_MEDIA_STATUS != self.unsupported_media_status:
            error = ApiError(self.unsupported_media_status, error.message, fields=error.fields,
                             code=error.code, key=error.key, extra=error.extra,
                             headers=error.headers)
        if response_started(request):
            return self.cut_short(request, f"{error.status} {error.message}")
        return self.render_error(request, self.with_allow(request, error))

    def render_error(self, request: IRequest, error: ApiError) -> bytes:
        """The reply of `error`: this API's JSON shape (the page apps make a page of it)."""
        body = self.shape.body(error, context_of(request).request_id)
        return json_reply(request, body, error.status, error.headers)

    def with_allow(self, request: IRequest, error: ApiError) -> ApiError:
        """`error`, and if it is a 405, with Allow naming exactly the methods the request's
        path answers: RFC 9110 15.5.6 has every 405 carry Allow. The router's 405s and
        handlers' alike get it here: the methods of the path's routes, HEAD among them
        where one takes GET (Werkzeug routes a HEAD there). A handler that refuses by the
        object's state names in its own Allow the methods that state leaves (web.safedrop's
        sent bundle: GET); those of them the path takes are kept, HEAD with GET."""
        if error.status != 405:
            return error
        path = request.path.decode("utf-8", "replace")
        methods = set(self.app.url_map.bind("localhost").allowed_methods(path))
        named = [k for k in error.headers if k.lower() == "allow"]
        if named:
            left = {m.strip().upper() for m in error.headers.pop(named[0]).split(",")}
            if "GET" in left:
                left.add("HEAD")
            methods = methods & left if methods else left - {""}
        error.headers["Allow"] = ", ".join(sorted(methods))
        return error

    def handle_failure(self, request: IRequest, failure: Failure) -> bytes:
        """Turn anything a handler or the router raised into a reply in this API's shape."""
        if response_started(request):
            return self.cut_short(request, failure.getErrorMessage(), failure)
        try:
            return self.error_reply(request, self._as_error(request, failure))
        except Exception:
            log.failure("error while rendering an error reply", api=self.name)
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
            return encode_json({"error": "Internal server error."})

    def cut_short(self, request: IRequest, why: str, failure: Failure | None = None) -> bytes:
        """An error after the reply began: logged, the connection dropped, nothing written."""
        fields = {
            "method": request.method.decode("latin-1", "replace"),
            "path": redacted_path(request.path),
            "api": self.name,
            "request_id": context_of(request).request_id,
            "why": why,
        }
        text = ("{method} {path} ({api}, request {request_id}) failed after its reply began "
                "({why}); the connection is dropped")
        if failure is None:
            log.error(text, **fields)
        else:
            log.failure(text, failure, **fields)
        drop_connection(request)
        return b""

    def _as_error(self, request: IRequest, failure: Failure) -> ApiError:
        error = failure.value
        if isinstance(error, ApiError):
            return error
        if isinstance(error, RequestRedirect):
            target = urlsplit(error.new_url)
            location = target.path + (f"?{target.query}" if target.query else "")
            return ApiError(308, "Moved.", headers={"Location": location})
        if isinstance(error, NotFound):
            return ApiError(404, self.shape.not_found())
        if isinstance(error, MethodNotAllowed):  # its Allow header: with_allow
            method = request.method.decode("latin-1", "replace")
            return ApiError(405, self.shape.method_not_allowed(method))
        if isinstance(error, HTTPException) and error.code is not None:
            return ApiError(error.code, error.description or error.name)
        found = outage(error) if error is not None else None
        if found is not None:
            return outage_error(found)
        log.failure(
            "unhandled error serving {method} {path} ({api}, request {request_id})",
            failure,
            method=request.method.decode("latin-1", "replace"),
            path=redacted_path(request.path),
            api=self.name,
            request_id=context_of(request).request_id,
        )
        return ApiError(500, self.shape.internal_error())

    # -- input -----------------------------------------------------------------------------

    def fields(self, request: IRequest, *, untyped_form: bool = False) -> dict[str, Any]:
        """Input fields from a JSON, form-encoded or multipart body (`untyped_form`: a body
        without a Content-Type is form-encoded), each at most `[web] json_max_body` (files
        come only to the upload paths, web.root.upload_paths). The body is parsed once a
        request: a check made before the route (a credential in the body: the Mail API's
        `body_credential`, Dropmyemail's `_no_body_token`) and the route both ask, and each
        gets a copy of its own (a route may change what it got)."""
        kept = getattr(request, "api_fields", None)
        if kept is None or kept[0] != untyped_form:
            kept = (untyped_form, self.parse_fields(request, untyped_form=untyped_form))
            cast(Any, request).api_fields = kept
        return dict(kept[1])

    def parse_fields(self, request: IRequest, *, untyped_form: bool) -> dict[str, Any]:
        """The body's fields as this API parses them (`fields` keeps them for the
        request); a form or multipart text field, or a JSON key, given twice with different
        values is a 400 on an API whose `one_value_fields` says so (see parse_form)."""
        return read_fields(request, self.settings.json_max_body, untyped_form=untyped_form,
                           once=self.one_value_fields)

    def json_object(self, request: IRequest) -> dict[str, Any]:
        """A JSON object body (only JSON is accepted)."""
        return read_json_object(request, self.settings.json_max_body)
