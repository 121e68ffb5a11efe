"""The HTTP API over `PersonaService`: `create_app` builds it, `serve` runs it (OpenAPI description
at /openapi.json; the interactive docs page is off by default, as it loads its script from a CDN:
`create_app(..., docs=True)` serves it at /docs where the browser can reach the internet).

Every /v1 request carries `Authorization: Bearer <token>`. Errors are JSON,
`{"error": "<kind>", "message": "<what went wrong>"}`, with a 4xx status for a bad request and
503 with `Retry-After` when the language model fails, the answer queue is full or slow, or the
store cannot be written (then /healthz is 503 too, saying why). Every status a route can return is
in the OpenAPI description. An answer whose caller disconnected is dropped before the LM, and a
streamed chat reply whose caller disconnects stops the LM at its next token. On
SIGTERM the server stops accepting work, cancels what is queued and exits within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import fields
from http import HTTPStatus
from pathlib import Path as FilePath
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Iterator, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..optimizers.pipeline import CompileConfig
from ..program.persona import PersonaVersion
from .service import (AlignJob, AlignmentRunning, Answer, InvalidRequest, NotFound, PersonaService, ServiceError,
                      Unavailable)

MAX_BODY_BYTES = 64 * 1024
MAX_TEXT_CHARS = 16_000
log = logging.getLogger(__name__)
STATUS = {InvalidRequest: 400, NotFound: 404, AlignmentRunning: 409, Unavailable: 503}
DISCONNECT_POLL_S = 0.25  # how often a waiting answer checks that its caller is still there
GRACEFUL_SHUTDOWN_S = 5  # after SIGTERM, how long requests in progress may take to finish


class ErrorBody(BaseModel):
    error: str = Field(description="the kind of error, from the HTTP status, e.g. not_found")
    message: str = Field(description="what went wrong, for a person")


ERRORS = {
    400: "invalid user id or request",
    401: "missing or wrong bearer token",
    404: "unknown user, job or persona version",
    409: "an alignment of this user is already running",
    413: "request body over the size limit",
    422: "the body does not match the schema",
    500: "unexpected error; the server log has the details",
    503: "the LM failed, the answer queue is full or slow, or the store is not writable; see Retry-After",
}


# Documented, not validated here: the service checks ids and answers 400 (not 422) with the reason,
# including what a JSON-schema pattern cannot say (no "..", no double space, at most 128 UTF-8 bytes).
UserId = Annotated[str, Path(description="the user's id: letters, digits, single spaces or _ . @ ' , : -; "
                                         "at most 128 bytes in UTF-8",
                             json_schema_extra={"pattern": r"^\w(?:[\w .@',:-]*[\w.])?$", "maxLength": 128})]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error")
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """The error shape of the OpenAI-compatible endpoint."""

    error: OpenAIError


def _documented(*statuses: int, model: type[BaseModel] = ErrorBody) -> dict:
    return {status: {"model": model, "description": ERRORS[status]} for status in statuses}


class AnswerRequest(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the question, phrased as the task asks it")


class InteractionRequest(BaseModel):
    input: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="what the user was asked or did")
    output: str | None = Field(None, max_length=MAX_TEXT_CHARS,
                               description="the user's real answer (ground truth), if known")
    timestamp: float | None = Field(None, description="seconds since the epoch; default: now")
    metadata: dict[str, Any] = Field(default_factory=dict)


class InteractionAdded(BaseModel):
    user_id: str
    added: bool = Field(description="false when the same interaction was already recorded")
    ids: list[int]


# The settings an align request may choose (`PersonaService.align`'s), and the most one request may
# ask for: the settings' own bounds would let one request start an alignment of any cost.
ALIGN_SETTINGS = ("n_recent", "iterations", "acceptance", "optimizer")
ALIGN_MAX = {"n_recent": 20, "iterations": 5}


def _align_request() -> type[BaseModel]:
    """The align request's body, made from `CompileConfig`'s fields: their defaults, help, choices
    and minimums."""
    settings = {setting.name: setting for setting in fields(CompileConfig)}

    def body_field(name: str) -> tuple:
        setting = settings[name]
        choices = setting.metadata.get("choices")
        return (Literal[choices] if choices else type(setting.default),
                Field(setting.default, ge=setting.metadata.get("min"), le=ALIGN_MAX.get(name),
                      description=setting.metadata["help"]))

    return create_model("AlignRequest", **{name: body_field(name) for name in ALIGN_SETTINGS})


AlignRequest = _align_request()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    @property
    def text(self) -> str:
        """The content's text (OpenAI also sends a list of parts)."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if isinstance(part, dict))
        return self.content or ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens...: accepted; the server's LM settings hold
    model: str = Field("personaagent", description="echoed back; the server's LM answers")
    messages: list[ChatMessage] = Field(min_length=1, max_length=100)
    user: str | None = Field(None, description="the user whose persona answers")
    stream: bool = False


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[dict]


class RollbackRequest(BaseModel):
    version: int = Field(ge=1, description="a kept version (see the persona's versions) to make current again")


class PersonaInfo(BaseModel):
    user_id: str
    compiled: bool = Field(description="false: no compiled program yet, the default program serves this user")
    task: dict
    current_version: int | None
    persona: dict
    instructions: dict[str, str] = Field(description="per predictor, what the program runs with")
    versions: list[PersonaVersion]
    interactions: int


class Deleted(BaseModel):
    user_id: str
    deleted: bool


class Health(BaseModel):
    status: str = Field(description="ok, or not ready")
    reason: str | None = Field(None, description="why the service is not ready")
    lm: str
    engine: str | None = Field(None, description="the embedded LM engine: ready, restarting (after a crash: "
                                                  "answers get 503 until it is back) or failed; none for a served LM")
    loaded_programs: int
    queued_answers: int
    alignments_queued: int
    alignments_running: int


CHAT_PATH = "/v1/chat/completions"
# OpenAI's error types, by status, for the chat endpoint (its clients read `error.type`).
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
                      503: "service_unavailable_error"}


def _error(status: int, message: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    """Our error shape, or OpenAI's on the OpenAI-compatible endpoint."""
    if path == CHAT_PATH:
        kind = OPENAI_ERROR_TYPES.get(status, "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status, headers)
    kind = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return JSONResponse({"error": kind, "message": message}, status, headers)


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413: at once when its Content-Length says so,
    else (chunked) as soon as the bytes read pass the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over the limit of {self.max_bytes} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, message, path=scope["path"])(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            chunk = await receive()
            received += len(chunk.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, message)  # FastAPI lets an HTTPException out of the body read
            return chunk

        await self.app(scope, limited_receive, send)


class InternalErrors:
    """An unexpected error becomes a JSON 500 and a log entry. (Starlette's own handler for it
    re-raises afterwards, and uvicorn then drops the client's keep-alive connection.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await _error(500, f"internal error ({type(exc).__name__}); the server log has the details",
                         path=scope["path"])(scope, receive, send)


async def _unless_disconnected(future, request: Request, cancel: Callable[[], Any] | None = None):
    """The queued work's result; if the caller disconnects first, it is cancelled (by `cancel`, else
    the future's own: never reaching the LM if it had not started) and nothing is sent."""
    waiting = asyncio.wrap_future(future)
    while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
            (cancel or future.cancel)()
            raise Unavailable("the caller disconnected", 1)
    return waiting.result()


def create_app(service: PersonaService, token: str, max_body_bytes: int = MAX_BODY_BYTES,
               docs: bool = False) -> FastAPI:
    if not token:
        raise ValueError("a bearer token is required: pass --token or set PERSONAAGENT_TOKEN")
    authorize = _authorizer(token)
    app = FastAPI(title="PersonaAgent", description="Per-user personas for LLM agents, served.",
                  docs_url="/docs" if docs else None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(InternalErrors)
    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)],
                    responses=_documented(400, 401, 404, 413, 422, 500, 503))
    _add_error_handlers(app)
    _add_health_route(app, service)
    # In the order the OpenAPI description lists them.
    _add_user_routes(api, service)
    _add_alignment_routes(api, service)
    _add_chat_route(api, service)
    _add_forget_route(api, service)
    app.include_router(api)
    return app


def _authorizer(token: str) -> Callable[..., Awaitable[None]]:
    """The dependency that refuses a /v1 request without the bearer `token`, with 401."""
    bearer = HTTPBearer(auto_error=False, description="the token the server was started with")

    # async: run on the event loop, not handed to a worker thread and back on every request.
    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "wrong bearer token", {"WWW-Authenticate": "Bearer"})

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    """Service errors, HTTP errors and invalid bodies, in our JSON error shape (OpenAI's for chat)."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = next(s for cls, s in STATUS.items() if isinstance(exc, cls))
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
        return _error(status, str(exc), headers, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(422, f"invalid request: {problems}", path=request.url.path)


def _add_health_route(app: FastAPI, service: PersonaService) -> None:
    """/healthz, outside /v1: no token needed."""

    @app.get("/healthz", response_model=Health, tags=["service"],
             responses={503: {"model": Health, "description": "not ready: the reason says why"},
                        **_documented(500)})
    def healthz() -> JSONResponse:
        reason = service.not_ready()
        alignments = service.alignments()
        health = Health(status="not ready" if reason else "ok", reason=reason, lm=service.lm.model,
                        engine=service.engine_state,
                        loaded_programs=service.loaded, queued_answers=service.queued,
                        alignments_queued=alignments["queued"], alignments_running=alignments["running"])
        return JSONResponse(health.model_dump(), 503 if reason else 200)


def _add_user_routes(api: APIRouter, service: PersonaService) -> None:
    """Answering as a user, their memory, their persona and its rollback."""

    @api.post("/users/{user_id}/answer", response_model=Answer, tags=["users"])
    async def answer(user_id: UserId, body: AnswerRequest, request: Request) -> Answer:
        """Answer as the user's program (compiled, or the default one); queued behind other LM work.
        If the caller disconnects while it waits, the answer is dropped before it reaches the LM."""
        return await _unless_disconnected(service.submit_answer(user_id, body.text), request)

    @api.post("/users/{user_id}/interactions", response_model=InteractionAdded, status_code=201, tags=["users"],
              responses={200: {"model": InteractionAdded, "description": "the same interaction was already recorded"}})
    def add_interaction(user_id: UserId, body: InteractionRequest, response: Response) -> InteractionAdded:
        """Append an interaction to the user's memory (creating the user if new)."""
        ids = service.add_interaction(user_id, body.input, body.output, body.timestamp, body.metadata)
        if not ids:
            response.status_code = 200
        return InteractionAdded(user_id=user_id, added=bool(ids), ids=ids)

    @api.get("/users/{user_id}/persona", response_model=PersonaInfo, tags=["users"])
    def persona(user_id: UserId) -> dict:
        """The persona in force, its instructions and its version history."""
        return service.persona(user_id)

    @api.post("/users/{user_id}/persona/rollback", response_model=PersonaInfo, tags=["users"])
    def rollback(user_id: UserId, body: RollbackRequest) -> dict:
        """Make a kept persona version current again, as a new version; the history only grows."""
        return service.rollback(user_id, body.version)


def _add_alignment_routes(api: APIRouter, service: PersonaService) -> None:
    """Starting a user's alignment in the background, and its job's status."""

    @api.post("/users/{user_id}/align", response_model=AlignJob, status_code=202, tags=["alignment"],
              responses=_documented(409))
    def align(user_id: UserId, body: AlignRequest | None = None) -> AlignJob:
        """Start test-time alignment on the latest interactions with a known output, in the background."""
        body = body or AlignRequest()
        return service.align(user_id, **body.model_dump())

    @api.get("/users/{user_id}/align/{job_id}", response_model=AlignJob, tags=["alignment"])
    def align_status(user_id: UserId, job_id: str) -> AlignJob:
        return service.job(user_id, job_id)


def _add_chat_route(api: APIRouter, service: PersonaService) -> None:
    """The OpenAI-compatible chat endpoint."""

    @api.post("/chat/completions", tags=["openai"], response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "with `stream`: chunks as server-sent events"},
                         **_documented(400, 401, 404, 413, 422, 500, 503, model=OpenAIErrorBody)})
    async def chat(body: ChatRequest, request: Request,
                   x_personaagent_user: str | None = Header(
                       None, description="the user, when the body has no `user`")):
        """OpenAI-compatible chat: the `user` field (or the X-PersonaAgent-User header) selects whose
        persona answers; their memory is searched into the context and the turn is added to it. With
        `stream`, the reply's tokens are sent as the LM generates them."""
        user_id = body.user or x_personaagent_user
        if not user_id:
            raise InvalidRequest("name the user: the `user` field or the X-PersonaAgent-User header")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            reply = await _unless_disconnected(service.submit_chat(user_id, messages), request)
            return ChatCompletion(id=completion_id, created=created, model=body.model,
                                  choices=[{"index": 0, "message": {"role": "assistant", "content": reply.reply},
                                            "finish_reason": "stop"}])
        return await _streamed_chat(service, user_id, messages, request, completion_id, created, body.model)


async def _streamed_chat(service: PersonaService, user_id: str, messages: list[dict], request: Request,
                         completion_id: str, created: int, model: str) -> StreamingResponse:
    """A chat reply streamed as server-sent events, OpenAI's chunks."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    stream = service.stream_chat(user_id, messages)
    try:  # the first piece before the response starts: until then a failure is still a 503
        first = await _unless_disconnected(asyncio.ensure_future(anext(stream, None)), request, stream.close)
    except BaseException:
        stream.close()
        raise

    async def events() -> AsyncIterator[str]:
        """Each piece as the LM generates it. A caller who disconnects cancels this (Starlette
        listens for it), and closing the stream stops the LM."""
        try:
            yield chunk({"role": "assistant", "content": ""})
            piece = first
            while piece is not None:
                yield chunk({"content": piece})
                piece = await anext(stream, None)
            yield chunk({}, "stop")
        except ServiceError as exc:  # the status is sent already: the error is OpenAI's error event
            error = {"message": str(exc), "type": OPENAI_ERROR_TYPES[503], "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _add_forget_route(api: APIRouter, service: PersonaService) -> None:
    """Deleting a user and everything stored about them."""

    @api.delete("/users/{user_id}", response_model=Deleted, tags=["users"])
    def delete(user_id: UserId) -> Deleted:
        """Forget the user completely: memory, profile, persona and its versions."""
        service.delete(user_id)
        return Deleted(user_id=user_id, deleted=True)


def serve(store: str | FilePath, *, token: str, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = MAX_BODY_BYTES, **service_options) -> None:
    """Serve the store over HTTP until interrupted; `service_options` go to `PersonaService`."""
    service = PersonaService(store, **service_options)
    try:
        uvicorn.run(create_app(service, token, max_body_bytes), host=host, port=port,
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    finally:
        service.close()


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread (tests, benchmarks, notebooks); yields the base URL.
    Port 0 takes a free port."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}; see the log")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
