"""The HTTP application: OpenAI's `/v1/models`, `/v1/chat/completions` and `/v1/completions`
(streamed as server-sent events or not), the swarm view `/v1/swarm`, `/metrics` and the
dashboard at `/`.

Bodies are parsed here rather than by FastAPI's signature magic, so that every refusal
(bad JSON, a missing field, an unknown model) is an OpenAI-shaped error that the official
clients raise as `BadRequestError` and friends. Nothing here blocks the event loop: the
SDK runs in the relay's workers, the swarm view in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from node.api.relay import Generation, Job, Relay, api_error, sampling_of
from node.api.schemas import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_request,
    usage,
)
from node.api.swarm import SwarmView
from node.errors import ApiError, MoemeshError

__all__ = ["build_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def build_app(relay: Relay, swarm: SwarmView, started: Callable[[], None] = lambda: None) -> FastAPI:
    """The app over one relay (the SDK client and its workers) and one swarm view. `started` is
    called once the app is up; its lifespan's end closes the relay and the view."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, _close, relay, swarm)

    app = FastAPI(title="moemesh", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = relay.metrics

    async def blocking(call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(relay.pool, call)

    def answer(endpoint: str, body: dict[str, Any], status: int = 200) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError) -> JSONResponse:
        metrics.errors.labels(e.type).inc()
        return answer(request.url.path, error_body(e.message, e.type, e.param, e.code), e.status)

    @app.exception_handler(MoemeshError)
    async def failed(request: Request, e: MoemeshError) -> JSONResponse:
        return await refused(request, api_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await refused(request, ApiError(f"{request.method} {request.url.path}: {e.detail}",
                                               status=e.status_code, type=kind))  # fmt: skip

    async def model_of(request: GenerationRequest) -> str:
        model_id, name = await blocking(relay.model)
        if request.model not in (model_id, name):
            raise ApiError(f"The model `{request.model}` does not exist (this swarm serves {model_id}, {name})",
                           status=404, param="model", code="model_not_found")  # fmt: skip
        return request.model

    def job(request: GenerationRequest, prompt_ids: list[int], max_tokens: int | None) -> Job:
        sampling = sampling_of(request.temperature, request.top_p, request.seed)
        return Job(prompt_ids, max_tokens or relay.config.default_max_tokens, sampling, request.stops())

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        model_id, name = await blocking(relay.model)
        entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "moemesh", "name": name}
        return answer("/v1/models", {"object": "list", "data": [entry]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(ChatRequest, await _json(request))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        codec = await blocking(lambda: relay.text)  # fetched from the swarm the first time
        model = await model_of(body)
        ids = codec.encode(codec.render_chat(messages))
        generation = relay.start(job(body, ids, body.token_limit()))
        rid = new_id("chatcmpl")
        if body.stream:
            return _stream(relay, "/v1/chat/completions", _chat_events(rid, model, generation, body.include_usage()))
        text = await _unless_disconnected(request, relay, generation.text())
        if text is None:
            return Response(status_code=499)  # nobody to answer; nginx's code for it, for the logs
        counts = (len(ids), generation.completion_tokens)
        return answer("/v1/chat/completions", chat_response(rid, model, text, generation.finish_reason, *counts))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_request(CompletionRequest, await _json(request))
        prompt = body.one_prompt()
        model = await model_of(body)
        codec = await blocking(lambda: relay.text)  # fetched from the swarm the first time
        ids = codec.encode(prompt, raw=True) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ApiError("the prompt encodes to no tokens", param="prompt")
        generation = relay.start(job(body, ids, body.token_limit() or 16))  # 16: OpenAI's default here
        rid = new_id("cmpl")
        if body.stream:
            return _stream(relay, "/v1/completions", _completion_events(rid, model, generation, body.include_usage()))
        text = await _unless_disconnected(request, relay, generation.text())
        if text is None:
            return Response(status_code=499)  # nobody to answer; nginx's code for it, for the logs
        counts = (len(ids), generation.completion_tokens)
        return answer("/v1/completions", completion_response(rid, model, text, generation.finish_reason, *counts))

    @app.get("/v1/swarm")
    async def swarm_view() -> JSONResponse:
        view = dict(await asyncio.get_running_loop().run_in_executor(None, swarm.get))
        view["api"] = {
            "active_streams": metrics.registry.get_sample_value("moemesh_api_active_streams") or 0,
            "generated_tokens": metrics.registry.get_sample_value("moemesh_api_generated_tokens_total") or 0,
            "recoveries": len(relay.client.recoveries),
        }
        return answer("/v1/swarm", view)

    @app.get("/health")
    async def health() -> JSONResponse:
        return answer("/health", {"status": "ok"})

    @app.get("/metrics")
    async def scrape() -> Response:
        from node.api.metrics import CONTENT_TYPE

        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def dashboard() -> HTMLResponse:
        page = resources.files("node.api").joinpath("static/dashboard.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    return app


def _close(relay: Relay, swarm: SwarmView) -> None:
    swarm.close()
    relay.close()


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(f"the body is not valid JSON: {e}") from None


async def _unless_disconnected(request: Request, relay: Relay, work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it (and so stop the generation) and return None when the client
    hangs up first."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            relay.metrics.disconnects.inc()
    if not task.done() or task.cancelled():
        return None
    return task.result()


def _stream(relay: Relay, endpoint: str, events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    relay.metrics.requests.labels(endpoint, "200").inc()

    async def counted() -> AsyncIterator[dict[str, str]]:
        try:
            async for event in events:
                yield {"data": json.dumps(event) if isinstance(event, dict) else event}
        except asyncio.CancelledError:  # the client went away: the generation's finally stops it
            relay.metrics.disconnects.inc()
            raise
        yield {"data": "[DONE]"}

    return EventSourceResponse(counted(), ping=15)


async def _failing(generation: Generation, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Pass the chunks on; an error after the stream began becomes an error event (headers are sent)."""
    try:
        async for chunk in chunks:
            yield chunk
    except MoemeshError as e:
        error = api_error(e)
        log.warning("stream failed after %d tokens: %s", generation.completion_tokens, error)
        yield error_body(error.message, error.type, error.param, error.code)


async def _chat_events(rid: str, model: str, generation: Generation, with_usage: bool) -> AsyncIterator[dict[str, Any]]:
    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield chat_chunk(rid, model, {"role": "assistant", "content": ""})
        async for piece in generation:
            yield chat_chunk(rid, model, {"content": piece})
        yield chat_chunk(rid, model, {}, generation.finish_reason)
        if with_usage:
            yield chat_chunk(
                rid, model, None, usage_counts=usage(len(generation.job.prompt_ids), len(generation.tokens))
            )

    async for chunk in _failing(generation, chunks()):
        yield chunk


async def _completion_events(
    rid: str, model: str, generation: Generation, with_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async for piece in generation:
            yield completion_chunk(rid, model, piece)
        yield completion_chunk(rid, model, "", generation.finish_reason)
        if with_usage:
            counts = usage(len(generation.job.prompt_ids), len(generation.tokens))
            yield completion_chunk(rid, model, None, usage_counts=counts)

    async for chunk in _failing(generation, chunks()):
        yield chunk
