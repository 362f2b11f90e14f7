"""The HTTP API of a node, on FastAPI.

This layer only translates: it parses bodies as strict JSON and validates them with
pydantic, maps the caller's bearer key to a principal, hands the call to the router
and maps troth errors to status codes. Every error body has the same shape::

    {"error": {"type": "AppError", "message": "...", "data": ...}}

Status codes: 404 unknown type or method; 409 application error; 422 malformed
body, name or arguments; 413 body too large; 415 a write without API keys that is
not JSON; 401/403 authentication and ownership; 429 over a quota; 503 retry (the
actor is moving, or Redis did not answer in time); 504 no reply in time; 500 a bug
in an actor (logged with its traceback). Both 429 and 503 carry ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import redis
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.convertors import StringConvertor
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from troth import __version__
from troth.cluster.routing import (
    CLUSTER_BATCH_PATH,
    CLUSTER_HEADER,
    CLUSTER_PATH,
    ForwardedCall,
    Router,
)
from troth.core import jsonsafe, tracing
from troth.core.access import Caller
from troth.core.config import Config
from troth.core.errors import AuthError, ErrorDetail, ForbiddenError, QuotaExceeded, TrothError
from troth.core.metrics import NodeMetrics
from troth.core.names import ActorName, check_method
from troth.edge.sessions import SessionServer

log = logging.getLogger(__name__)

MAX_ARGS = 100

BodyT = TypeVar("BodyT", bound=BaseModel)


class CallBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    args: list[Any] = Field(default_factory=list, max_length=MAX_ARGS)
    kwargs: dict[str, Any] = Field(default_factory=dict, max_length=MAX_ARGS)
    request_id: str | None = Field(None, min_length=1, max_length=200)


class CallReply(BaseModel):
    result: Any


class Health(BaseModel):
    status: str
    node: str | None = None
    shards: int | None = None
    active_actors: int | None = None
    draining: bool | None = None
    error: str | None = None


class ErrorReply(BaseModel):
    error: ErrorDetail


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson, several times faster than the standard library, for the
    hot endpoints (see :func:`troth.core.jsonsafe.dumps`). Their content is strict JSON
    already: an actor's reply is checked by its transaction, and a commitment's view
    comes from checked input."""

    def render(self, content: Any) -> bytes:
        return jsonsafe.dumps(content)


def error_response(
    status: int, kind: str, message: str, data: Any = None, retry_after: int | None = None
) -> JSONResponse:
    """The one error shape: ``{"error": {"type", "message", "data"?}}``; 503 and 429
    say when to retry."""
    err: dict[str, Any] = {"type": kind, "message": message}
    if data is not None:
        err["data"] = data
    if retry_after is None and status in (429, 503):
        retry_after = 1
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": err}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413, streamed or not."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if declares_too_much(scope, self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await too_large(self.max_bytes)(scope, receive, send)


class _TooLarge(Exception):
    pass


def declares_too_much(scope: Scope, max_bytes: int) -> bool:
    """Whether the request's ``Content-Length`` is over ``max_bytes`` (413 before
    reading anything)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.isdigit() and int(value) > max_bytes
    return False


def too_large(max_bytes: int) -> JSONResponse:
    return error_response(413, "PayloadTooLarge", f"request body exceeds {max_bytes} bytes")


class HttpMetrics:
    """Per-route rate, latency and status (``troth_http_requests_total``,
    ``troth_http_request_duration_seconds``). The route label is the matched path
    template (``/v1/actors/{actor_type}/{actor_id}/{method}``), never the raw path,
    and ``unmatched`` for a path no route knows: the label set stays bounded
    whatever clients send. With ``access_log``, one line per request on the
    ``troth.access`` logger (method, path, status, milliseconds, the client's
    ``X-Request-ID`` if it sent one).

    A request is counted just before the last part of its answer is sent: a client
    that has its answer finds it counted in ``/metrics``."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        counted = False

        async def sending(message: Message) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                counted = True
                record_request(self.metrics, self.access_log, scope, status, started)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not counted:  # no complete answer: failed, or the client left
                record_request(self.metrics, self.access_log, scope, status, started)


def record_request(
    metrics: NodeMetrics, access_log: bool, scope: Scope, status: int, started: float
) -> None:
    """Count one answered request (see :class:`HttpMetrics`); ``started`` is its
    ``time.perf_counter()`` when it arrived."""
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    method = scope["method"] if scope["method"] in _METHODS else "OTHER"
    seconds = time.perf_counter() - started
    metrics.http_request(method, route, status, seconds)
    if access_log:
        _access_log(scope, status, seconds)


def _access_log(scope: Scope, status: int, seconds: float) -> None:
    request_id = Headers(scope=scope).get("x-request-id")
    client = scope.get("client") or ("-", 0)
    access_log.info(
        "%s %s %s %d %.1f ms",
        client[0],
        scope["method"],
        scope["path"],
        status,
        seconds * 1000,
        extra={"request_id": request_id[:200] if request_id else None},
    )


access_log = logging.getLogger("troth.access")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def resolve_principal(conn: HTTPConnection) -> str | None:
    """The caller's principal; ``None`` when no API keys are configured (the node then
    serves loopback clients only, see :class:`LocalOnly`). WebSocket clients that
    cannot set headers may pass ``?token=KEY``."""
    keys: dict[str, str] = conn.app.state.api_keys
    if not keys:
        return None
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        token = conn.query_params.get("token", "") if conn.scope["type"] == "websocket" else ""
    if token not in keys:
        raise AuthError("missing or unknown bearer token")
    return keys[token]


async def principal(request: Request) -> str | None:
    return resolve_principal(request)


Principal = Annotated[str | None, Depends(principal)]


def operator_role(conn: HTTPConnection) -> str:
    """What the caller may do as an operator: ``read`` or ``write``
    (``auth.operators``). Without API keys the (loopback) caller may do everything;
    with them, a key whose principal is no operator gets 403."""
    who = resolve_principal(conn)
    if who is None:
        return "write"
    role: str | None = conn.app.state.operators.get(who)
    if role is None:
        raise ForbiddenError(f"principal {who!r} is not an operator (auth.operators)")
    return role


async def _read_operator(request: Request) -> str:
    return operator_role(request)


async def _write_operator(request: Request) -> str:
    role = operator_role(request)
    if role != "write":
        raise ForbiddenError("this operator may only read (auth.operators gives it 'read')")
    return role


#: Endpoints for operators (the console, ``/v1/admin``): any operator reads ...
ReadOperator = Annotated[str, Depends(_read_operator)]
#: ... and only a ``write`` operator changes anything.
WriteOperator = Annotated[str, Depends(_write_operator)]


async def json_body(request: Request, model: type[BodyT]) -> BodyT:
    """Parse the body as strict JSON (:mod:`troth.core.jsonsafe`) and validate it.

    An empty body counts as ``{}``; errors become 422 naming the field.
    """
    raw = await request.body()
    data = jsonsafe.loads(raw) if raw.strip() else {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None


#: Request bodies parsed by :func:`json_body`, by model, for the OpenAPI document.
_BODY_MODELS: dict[str, type[BaseModel]] = {}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for endpoints that parse their body with :func:`json_body`."""
    _BODY_MODELS[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": ref}}}}


def path_parameters(*names: str) -> dict[str, Any]:
    """OpenAPI ``parameters`` for the path parameters of an endpoint that reads them
    from ``request.path_params`` itself. The hottest endpoints do: FastAPI's
    validation of declared parameters and dependencies costs about 35 us a request
    (a third of its share), and these are plain strings checked by the handler."""
    return {
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "title": name.replace("_", " ").title()},
            }
            for name in names
        ]
    }


Endpoint = TypeVar("Endpoint", bound=Callable[[Request], Awaitable[Response]])


def hot(endpoint: Endpoint) -> Endpoint:
    """Marks an endpoint that takes nothing but the request (it parses its body, path
    parameters and principal itself): :class:`HotPath` then serves it directly."""
    endpoint.__dict__["troth_hot"] = True
    return endpoint


class HotPath:
    """Serves the endpoints marked :func:`hot` (actor calls, node-to-node calls,
    commitment creation, events) right inside Starlette's outermost middleware,
    before every other middleware and FastAPI's routing; other requests go on to
    ``app``.

    Each layer of ASGI middleware costs a call and a closure a request, and FastAPI's
    routing and endpoint machinery (exit stacks, dependency solving) about 45 us; at
    thousands of calls a second that was about a fifth of a node's CPU. The checks those
    middlewares make are made here in line, by the same functions, in the same order,
    so the answers are the same either way: the metrics and access log
    (:func:`record_request`), the loopback rule without API keys
    (:func:`local_refusal`), the body limit (413), and the app's exception handlers
    for the errors an endpoint raises (an error without a handler goes on to
    Starlette's, a 500). A hot endpoint's FastAPI route stays: it documents the
    endpoint (OpenAPI).
    """

    def __init__(
        self,
        app: ASGIApp,
        source: FastAPI,
        routers: Sequence[APIRouter],
        metrics: NodeMetrics,
        *,
        access_log: bool,
        local_only: bool,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.local_only = local_only
        self.max_body_bytes = max_body_bytes
        self.routes = [
            Route(route.path, route.endpoint, methods=sorted(route.methods or ()))
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute) and route.endpoint.__dict__.get("troth_hot")
        ]
        #: What ``Route.matches`` reads of each route, at hand: matching that way took
        #: a dozen calls a request (a convertor call per path parameter among them).
        self._table: list[
            tuple[Route, Callable[[str], re.Match[str] | None], Collection[str], tuple[str, ...]]
        ] = [
            (route, route.path_regex.match, route.methods or frozenset(), _converting(route))
            for route in self.routes
        ]
        self.handlers = {
            k: v
            for k, v in source.exception_handlers.items()
            if isinstance(k, type) and k is not Exception
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A request under a root_path goes the whole way (Starlette strips it).
        if scope["type"] == "http" and not scope.get("root_path"):
            path, method = scope["path"], scope["method"]
            for route, match, methods, convertors in self._table:
                found = match(path)
                if found is not None and method in methods:  # Route.matches' Match.FULL
                    params = found.groupdict()
                    for key in convertors:
                        params[key] = route.param_convertors[key].convert(params[key])
                    scope["endpoint"] = route.endpoint  # the scope Starlette's router
                    scope["path_params"] = params  # makes, and the route it records
                    scope["route"] = route
                    await self._serve(route, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            response = await self._answer(route, scope, receive)
        except BaseException:
            record_request(self.metrics, self.access_log, scope, 500, started)
            raise
        # counted before it is sent, as HttpMetrics counts (and a write never waits)
        record_request(self.metrics, self.access_log, scope, response.status_code, started)
        await response(scope, receive, send)

    async def _answer(self, route: Route, scope: Scope, receive: Receive) -> Response:
        if self.local_only and (refusal := local_refusal(scope)) is not None:
            return refusal.response()
        if declares_too_much(scope, self.max_body_bytes):
            return too_large(self.max_body_bytes)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return too_large(self.max_body_bytes)
            if not message.get("more_body", False):
                break
        request = _ReadRequest(scope, bytes(body))
        try:
            response: Response = await route.endpoint(request)
        except Exception as exc:
            handler = next((h for k in type(exc).__mro__ if (h := self.handlers.get(k))), None)
            if handler is None:
                raise
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        return response


def _converting(route: Route) -> tuple[str, ...]:
    """The path parameters of ``route`` whose convertor changes the text (not ``str``)."""
    return tuple(
        key
        for key, convertor in route.param_convertors.items()
        if not isinstance(convertor, StringConvertor)
    )


class _ReadRequest(Request):
    """A request whose body :class:`HotPath` has read already. ``body()`` returns it
    as it is: Starlette's reads it through ``stream()``, an async generator (which
    the loop registers, a weak reference each) that cost a call about 6 us."""

    def __init__(self, scope: Scope, body: bytes) -> None:
        async def receive() -> Message:  # for stream(), which an endpoint may use
            return {"type": "http.request", "body": body, "more_body": False}

        super().__init__(scope, receive)
        self._read = body

    async def body(self) -> bytes:
        return self._read


class NodeApp(FastAPI):
    """FastAPI with a :class:`HotPath` inside Starlette's outermost middleware
    (``ServerErrorMiddleware``, which answers 500 to what nothing else handled). When
    tracing is on, OpenTelemetry's middleware wraps this stack: hot requests get their
    server spans too."""

    hot_path: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.hot_path is not None and isinstance(stack, ServerErrorMiddleware):
            stack.app = self.hot_path(stack.app)
        return stack


#: Error answers every endpoint may give; each is an :class:`ErrorReply`.
ERROR_STATUSES = {
    401: "Missing or unknown API key",
    403: "Not this principal's actor or commitment, or not a loopback request",
    404: "Unknown actor type, method or commitment",
    409: "The application refused (AppError) or the commitment is not in that state",
    413: "Request body too large",
    415: "Writes without API keys must be application/json",
    422: "Malformed body, name or arguments",
    429: "Over a quota; retry after Retry-After seconds",
    500: "A bug in an actor (logged with its traceback on the node)",
    503: "Retry after Retry-After seconds (actor moving, Redis unavailable)",
    504: "No reply in time; retry with the same request_id to learn the outcome",
}


def _openapi(app: FastAPI, secured: bool) -> dict[str, Any]:
    """FastAPI's document, completed: the body models that :func:`json_body` parses by
    hand, the error answers of every operation and, with API keys, the bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, model in _BODY_MODELS.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[name] = body
    schemas["ErrorReply"] = ErrorReply.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas.update(schemas["ErrorReply"].pop("$defs", {}))
    error = {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorReply"}}}
    }
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            for status, text in ERROR_STATUSES.items():
                responses.setdefault(str(status), {"description": text, **error})
            if "422" in responses:
                responses["422"] = {"description": ERROR_STATUSES[422], **error}
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    app.openapi_schema = schema
    return schema


def _host_of(value: str) -> str:
    """``"[::1]:8700"`` -> ``"::1"``; ``"localhost:8700"`` -> ``"localhost"``."""
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


@functools.lru_cache(maxsize=256)
def is_loopback_host(value: str) -> bool:
    """Whether a ``Host`` (or origin's host) names this machine: ``localhost`` or a
    loopback address literal, never a DNS name that merely starts like one. Cached:
    every request asks, nearly always about the same few values."""
    host = _host_of(value.strip().lower())
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalOnly:
    """Without API keys the node trusts whoever reaches it, so it makes sure only local
    programs do: the ``Host`` must be a loopback name (no DNS rebinding), an
    ``Origin`` header, if sent, must be a loopback origin (no cross-site requests
    from a browser), and a write with a body must say ``application/json`` (no HTML
    form posts). Node-to-node calls are exempt: they are authenticated by signature.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = local_refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.message[:120]})
        else:
            await refusal.response()(scope, receive, send)


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str

    def response(self) -> JSONResponse:
        kind = "Forbidden" if self.status == 403 else "UnsupportedMediaType"
        return error_response(self.status, kind, self.message)


_NOT_LOOPBACK = "without API keys this node answers only requests addressed to loopback"


def local_refusal(scope: Scope) -> Refusal | None:
    """Why :class:`LocalOnly` refuses an HTTP or WebSocket request; None if it does not."""
    if scope["path"] in CLUSTER_PATHS:
        return None
    # one pass over the raw headers (names are lower case in ASGI); the first of a
    # repeated header counts, as with Starlette's Headers.get
    headers: dict[bytes, bytes] = dict(reversed(scope["headers"]))
    if not is_loopback_host(headers.get(b"host", b"").decode("latin-1")):
        return Refusal(403, _NOT_LOOPBACK)
    origin = headers.get(b"origin")
    if origin is not None:
        text = origin.decode("latin-1")
        if not is_loopback_host(urlsplit(text).netloc or "null"):
            refused = f"without API keys this node refuses cross-origin requests ({text})"
            return Refusal(403, refused)
    if (
        scope["type"] == "http"
        and scope["method"] in ("POST", "PUT", "PATCH")
        and (headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers)
        and not _is_json(headers.get(b"content-type", b"").decode("latin-1"))
    ):
        return Refusal(415, "without API keys, request bodies must be application/json")
    return None


#: Signed node-to-node endpoints: no loopback rule (nodes reach each other by address).
CLUSTER_PATHS = (CLUSTER_PATH, CLUSTER_BATCH_PATH)


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


#: Answers a health probe: the node's figures while Redis answers, else None.
HealthProbe = Callable[[], Awaitable["dict[str, Any] | None"]]


def create_app(
    *,
    config: Config,
    router: Router,
    sessions: SessionServer,
    health_probe: HealthProbe,
    node_metrics: NodeMetrics,
    routes: Sequence[APIRouter] = (),
) -> FastAPI:
    """The HTTP API of one node: actor calls, sessions, health and metrics, the
    node-to-node endpoint, and the ``routes`` of the node's extensions."""
    app = NodeApp(
        title="troth",
        version=__version__,
        description="Actor calls and Commitment-as-a-Service on a troth node.",
        # FastAPI's own OpenTelemetry hooks cost a check of three providers a request
        # and would add server spans beside those of troth's tracing (troth.core.tracing,
        # which instruments this app when OTEL_* asks for it): off.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.api_keys = config.auth.api_keys
    app.state.operators = config.auth.operators
    app.openapi = lambda: _openapi(app, bool(config.auth.api_keys))  # type: ignore[method-assign]

    @app.exception_handler(TrothError)
    async def _troth_error(_request: Request, exc: TrothError) -> JSONResponse:
        d = exc.to_dict()
        retry_after = exc.retry_after if isinstance(exc, QuotaExceeded) else None
        return error_response(exc.http_status, d["type"], d["message"], d.get("data"), retry_after)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_request: Request, exc: redis.RedisError) -> JSONResponse:
        return error_response(503, "RedisUnavailable", f"Redis unavailable: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, "HTTPError", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return error_response(422, "ValidationError", message, problems)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error answering a request", exc_info=exc)
        return error_response(500, "InternalError", f"{type(exc).__name__}: {exc}")

    @app.websocket("/v1/ws")
    async def session(websocket: WebSocket) -> None:
        try:
            who = resolve_principal(websocket)
        except AuthError as exc:
            await websocket.close(code=1008, reason=str(exc))
            return
        await sessions.serve(websocket, who)

    @app.get("/health", response_model=Health)
    async def health() -> Response:
        """200 while this node reaches Redis; 503 within ``redis.timeout_seconds``
        otherwise (also when Redis is paused rather than down)."""
        figures = await health_probe()
        if figures is None:
            return JSONResponse(
                {"status": "unavailable", "error": "Redis did not answer"},
                status_code=503,
                headers={"retry-after": "1"},
            )
        return JSONResponse({"status": "ok", **figures})

    @app.get("/ready", response_model=Health)
    async def ready() -> Response:
        """Readiness, apart from liveness (``/health``): 200 when this node can serve
        calls now, that is Redis answers and the node owns shards; 503 otherwise (it
        is starting, handing its shards off, or cut off from Redis), so that a load
        balancer sends its traffic elsewhere without restarting it."""
        figures = await health_probe()
        if figures is None:
            reason = "Redis did not answer"
        elif not figures["shards"]:
            reason = "this node owns no shards (starting, draining, or more nodes than shards)"
        else:
            return JSONResponse({"status": "ready", **figures})
        return JSONResponse(
            {"status": "unavailable", "error": reason, **(figures or {})},
            status_code=503,
            headers={"retry-after": "1"},
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text. With ``metrics.require_key`` (and API keys), an operator's
        key only."""
        if config.metrics.require_key:
            operator_role(request)
        return Response(node_metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post(
        "/v1/actors/{actor_type}/{actor_id}/{method}",
        response_model=CallReply,
        openapi_extra={
            **body_schema(CallBody),
            **path_parameters("actor_type", "actor_id", "method"),
        },
    )
    @hot
    async def call_actor(request: Request) -> Response:
        who = resolve_principal(request)
        path = request.path_params
        name = ActorName.of(path["actor_type"], path["actor_id"])
        check_method(path["method"])
        body = await json_body(request, CallBody)
        result = await router.call(
            name, path["method"], body.args, body.kwargs, body.request_id, Caller(who)
        )
        # The transaction checked that the reply encodes as JSON: no second validation.
        return FastJSONResponse({"result": result})

    @app.post(CLUSTER_PATH, include_in_schema=False)
    @hot
    async def cluster_call(request: Request) -> JSONResponse:
        """A call another node forwarded (see :mod:`troth.cluster.routing`): runs here or not
        at all, for the caller the signed body names."""
        call = router.verify(await request.body(), request.headers.get(CLUSTER_HEADER))
        if call is None:
            raise ForbiddenError("not a correctly signed call from a node of this cluster")
        result = await router.run_forwarded(call)
        return FastJSONResponse({"result": result})  # checked by the transaction, as above

    @app.post(CLUSTER_BATCH_PATH, include_in_schema=False)
    @hot
    async def cluster_calls(request: Request) -> JSONResponse:
        """Several forwarded calls: each runs as :func:`cluster_call` would run it, and
        gets its own result or error."""
        batch = router.verify_batch(await request.body(), request.headers.get(CLUSTER_HEADER))
        if batch is None:
            raise ForbiddenError("not a correctly signed batch from a node of this cluster")

        async def one(call: ForwardedCall) -> dict[str, Any]:
            try:
                return {"result": await router.run_forwarded(call)}
            except TrothError as exc:
                return {"error": exc.to_dict(), "status": exc.http_status}
            except Exception as exc:  # a bug of ours: this call fails, not its batch
                log.exception("forwarded call %s.%s failed", call.actor, call.method)
                return {"error": {"type": "InternalError", "message": repr(exc)}, "status": 500}

        results = await asyncio.gather(*(one(call) for call in batch.calls))
        return FastJSONResponse({"results": results})

    # The node's own routes first: a request is matched against routes in order, and
    # actor calls are the hottest.
    for extra in routes:
        app.include_router(extra)
    app.hot_path = functools.partial(
        HotPath,
        source=app,
        routers=[app.router, *routes],
        metrics=node_metrics,
        access_log=config.node.access_log,
        local_only=not config.auth.api_keys,
        max_body_bytes=config.node.max_body_bytes,
    )
    app.add_middleware(BodyLimit, max_bytes=config.node.max_body_bytes)
    if not config.auth.api_keys:
        app.add_middleware(LocalOnly)
    app.add_middleware(HttpMetrics, metrics=node_metrics, access_log=config.node.access_log)
    tracing.instrument_app(app)  # outermost: the request's span covers everything
    return app
