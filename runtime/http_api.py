"""The HTTP API of a node (design section 7), on FastAPI.

This layer only translates: it validates bodies with pydantic, maps the caller's
bearer key to a principal, hands the call to the node and maps troth errors to
status codes. Every error body has the same shape::

    {"error": {"type": "AppError", "message": "...", "data": ...}}

Status codes: 404 unknown type or method; 409 application error; 422 malformed
body or arguments; 413 body too large; 401/403 authentication and ownership;
503 retry (the node does not own the actor now, or Redis is unreachable);
504 no reply in time; 500 a bug in the actor (logged with its traceback).
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import AuthError, BadRequestError, ForbiddenError, TrothError
from .names import ActorName
from .node import Node
from .routing import CLUSTER_HEADER
from .sessions import SessionServer

MAX_ARGS = 100

BodyT = TypeVar("BodyT", bound=BaseModel)


class CallBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    args: list[Any] = Field(default_factory=list, max_length=MAX_ARGS)
    kwargs: dict[str, Any] = Field(default_factory=dict, max_length=MAX_ARGS)
    request_id: str | None = Field(None, min_length=1, max_length=200)


class CallReply(BaseModel):
    result: Any


class ErrorDetail(BaseModel):
    type: str
    message: str
    data: Any = None


class ErrorReply(BaseModel):
    error: ErrorDetail


def error_response(status: int, kind: str, message: str, data: Any = None) -> JSONResponse:
    err: dict[str, Any] = {"type": kind, "message": message}
    if data is not None:
        err["data"] = data
    headers = {"retry-after": "1"} if status == 503 else None
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
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
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
        resp = error_response(
            413, "PayloadTooLarge", f"request body exceeds {self.max_bytes} bytes"
        )
        await resp(scope, receive, send)


class _TooLarge(Exception):
    pass


def resolve_principal(conn: HTTPConnection) -> str | None:
    """The caller's principal; ``None`` when no API keys are configured (loopback only)
    or when another node of the cluster forwards a call it already authenticated.
    WebSocket clients that cannot set headers may pass ``?token=KEY``."""
    keys: dict[str, str] = conn.app.state.api_keys
    if not keys or conn.app.state.node.router.is_cluster_call(conn.headers.get(CLUSTER_HEADER)):
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


async def json_body(request: Request, model: type[BodyT]) -> BodyT:
    """Parse the body as JSON whatever its content type (curl -d sends form type).

    An empty body counts as ``{}``; errors become 422 naming the field.
    """
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        ) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for endpoints that parse their body with :func:`json_body`."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}}}


def create_app(node: Node) -> FastAPI:
    """The FastAPI application of ``node``."""
    app = FastAPI(
        title="troth",
        version="0.1.0",
        description="Actor calls and Commitment-as-a-Service on a troth node.",
    )
    app.state.api_keys = node.config.auth.api_keys
    app.state.node = node

    @app.exception_handler(TrothError)
    async def _troth_error(_request: Request, exc: TrothError) -> JSONResponse:
        d = exc.to_dict()
        return error_response(exc.http_status, d["type"], d["message"], d.get("data"))

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

    from .caas.api import commitments_router

    app.include_router(commitments_router(node))
    sessions = SessionServer(node)
    app.state.sessions = sessions

    @app.websocket("/v1/ws")
    async def session(websocket: WebSocket) -> None:
        try:
            who = resolve_principal(websocket)
        except AuthError as exc:
            await websocket.close(code=1008, reason=str(exc))
            return
        await sessions.serve(websocket, who)

    @app.get("/health")
    async def health() -> Response:
        try:
            await asyncio.to_thread(node.client.ping)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "node": node.node_id,
                "shards": len(node.leases.owned),
                "active_actors": node.active_actors,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post(
        "/v1/actors/{actor_type}/{actor_id}/{method}",
        response_model=CallReply,
        responses={
            404: {"model": ErrorReply},
            409: {"model": ErrorReply},
            422: {"model": ErrorReply},
            503: {"model": ErrorReply},
        },
        openapi_extra=body_schema(CallBody),
    )
    async def call_actor(
        actor_type: str, actor_id: str, method: str, request: Request, who: Principal
    ) -> CallReply:
        body = await json_body(request, CallBody)
        name = ActorName.of(actor_type, actor_id)
        if who is not None and name.owner != who:
            raise ForbiddenError(f"principal {who!r} does not own {name}")
        forwarded = node.router.is_cluster_call(request.headers.get(CLUSTER_HEADER))
        result = await node.router.call(
            name, method, body.args, body.kwargs, body.request_id, forwarded=forwarded
        )
        return CallReply(result=result)

    app.add_middleware(BodyLimit, max_bytes=node.config.node.max_body_bytes)
    return app
