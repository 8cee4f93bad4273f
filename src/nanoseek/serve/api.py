"""`nanoseek serve`: an OpenAI / DeepSeek-compatible HTTP API over the inference engine.

    nanoseek serve --model runs/small --port 8000 [--api-key KEY] [--served-model-name NAME]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    r = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "2+3?"}])
    r.choices[0].message.reasoning_content, r.choices[0].message.content

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus text) and a chat page at /. The wire format is OpenAI's (vLLM's where OpenAI is silent):
SSE chunks that start with a role delta, end with a finish_reason chunk, an optional usage chunk and
`data: [DONE]`; errors are `{"error": {"message", "type", "param", "code"}}` with 400 / 401 / 404 / 503.
Like DeepSeek's API, reasoning (`<think>...</think>`) is returned as `reasoning_content`, and usage
carries `prompt_cache_hit_tokens` / `prompt_cache_miss_tokens` from the engine's prefix cache.

This module is only the HTTP layer: request parsing, streaming and response encoding. Generation is
the engine's (`nanoseek.LLM`), which a single background thread drives (see engine_loop.py), so all
concurrent requests share its continuous batching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.device import add_device_arguments
from nanoseek.errors import NanoseekError
from nanoseek.serve.engine_loop import EngineDeadError, EngineLoop
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.protocol import ChatCompletionRequest, CompletionRequest
from nanoseek.serve.reasoning import ReasoningSplitter, prompt_opens_reasoning

logger = logging.getLogger("nanoseek.serve")
STATIC_DIR = Path(__file__).parent / "static"


# ------------------------------------------------------------------ errors


class APIError(Exception):
    """An error to return in OpenAI's shape; raised anywhere in a handler before streaming starts."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ------------------------------------------------------------------ server state


@dataclass
class ServerState:
    """Everything the handlers share. Mutated only on the event loop (no locks needed)."""

    engine_loop: EngineLoop
    tokenizer: object
    model_name: str
    max_model_len: int
    api_key: str | None = None
    separate_reasoning: bool = True
    max_running: int = 64     # sequences the engine runs at once (its max_num_seqs)
    max_waiting: int = 256    # sequences allowed to queue beyond that before we answer 503
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0        # sequences admitted and not finished (running + waiting)
    metrics: Metrics | None = None

    def __post_init__(self):
        self.metrics = self.metrics or Metrics(self.model_name)
        self.token_text = TokenText(self.tokenizer)


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs, cached.

    With a byte-level BPE one token may be half of a multi-byte character, so decoding a single
    token gives U+FFFD; OpenAI's `bytes` field exists for exactly that, and we recover the exact bytes
    by inverting the byte-level alphabet (the GPT-2 bytes_to_unicode table).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        chars, extra = dict(), 0
        for b in range(256):
            if b in printable:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        self.byte_of_char = chars

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tokenizer.tk.id_to_token(token_id) if hasattr(self.tokenizer, "tk") else None
            if piece is not None and all(c in self.byte_of_char for c in piece):
                raw = bytes(self.byte_of_char[c] for c in piece)
            else:  # special and added tokens are stored as plain text
                raw = self.tokenizer.decode([token_id]).encode()
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]


# ------------------------------------------------------------------ one request's generation


@dataclass
class ChoiceUpdate:
    """What one choice produced since the last update."""

    index: int
    text: str                       # newly released text
    logprobs: list[dict]            # engine records of the newly generated tokens
    finish_reason: str | None


@dataclass
class _Choice:
    """The latest state of one choice (cumulative, as the engine reports it)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    """The engine side of one HTTP request: admit its prompts, relay their outputs, always clean up.

    A request can hold several engine requests (a batch of prompts on /v1/completions); each prompt
    has `n` choices, numbered prompt_index * n + sample_index as OpenAI does. All of them report into
    one asyncio queue. `close()` runs however the request ends (finished, client gone, error) and
    aborts whatever is unfinished, which frees the engine slots and cache blocks at once.
    """

    def __init__(self, state: ServerState, endpoint: str, prompts: list[list[int]], params):
        self.state, self.endpoint, self.prompts, self.params = state, endpoint, prompts, params
        self.n = params.n
        self.arrival = time.monotonic()
        self.id_prefix = uuid.uuid4().hex
        self.request_ids = [f"{self.id_prefix}-{i}" for i in range(len(prompts))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice(i) for i in range(len(prompts) * self.n)]
        self.unfinished: set[str] = set()
        self.num_cached = [0] * len(prompts)
        self.admitted = 0
        self.first_token_at: float | None = None
        self.closed = False

    async def start(self) -> None:
        """Admit the request, or raise APIError: 503 when the queue is full, 400 for bad input."""
        state, needed = self.state, len(self.prompts) * self.n
        if state.engine_loop.dead is not None:
            raise APIError(503, "the inference engine has failed; restart the server", "server_error",
                           code="engine_dead")
        if state.in_flight + needed > state.max_running + state.max_waiting:
            raise APIError(503, f"server overloaded: {state.in_flight} sequences in flight; retry later",
                           "server_error", code="server_overloaded")
        state.in_flight += needed
        self.admitted = needed
        try:
            for request_id, prompt in zip(self.request_ids, self.prompts):
                self.unfinished.add(request_id)  # first: even a cancelled add gets aborted by close()
                await state.engine_loop.add(prompt, self.params, request_id, self.queue)
        except BaseException as e:
            # Bad input, a dead engine, or the client leaving mid-admission: undo what was admitted.
            self.close(record_metrics=False)
            if isinstance(e, (NanoseekError, ValueError, TypeError)):
                raise _bad_request(str(e)) from e
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), "server_error", code="engine_dead") from e
            raise

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Yield the choices' updates until every choice has finished.

        Outputs that piled up while the client was slow are coalesced: RequestOutput text is
        cumulative, so only the newest per engine request matters.
        """
        while self.unfinished:
            latest = {}
            for out in await self._drain():
                if isinstance(out, Exception):
                    raise out
                latest[out.request_id] = out
            updates = []
            for out in latest.values():
                if out.finished:
                    self.unfinished.discard(out.request_id)
                updates.extend(self._updates_of(out))
            if updates:
                yield updates

    async def collect(self) -> None:
        """Run to completion without streaming (the non-streaming endpoints)."""
        async for _ in self.updates():
            pass

    async def _drain(self) -> list:
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    def _updates_of(self, out) -> list[ChoiceUpdate]:
        prompt_index = self.request_ids.index(out.request_id)
        self.num_cached[prompt_index] = out.num_cached_tokens
        updates = []
        for completion in out.outputs:
            choice = self.choices[prompt_index * self.n + completion.index]
            if choice.finish_reason is not None:
                continue
            finished = completion.finish_reason is not None
            # The engine's text only grows: it holds back a trailing half UTF-8 character and any
            # tail that may be the start of a stop string until the next token settles it.
            new_text = completion.text[len(choice.text):]
            new_logprobs = (completion.logprobs or [])[len(choice.logprobs):]
            choice.text, choice.token_ids = completion.text, completion.token_ids
            choice.logprobs = completion.logprobs or []
            choice.finish_reason = completion.finish_reason
            if completion.token_ids and self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.state.metrics.ttft.observe(self.first_token_at - self.arrival)
            if new_text or new_logprobs or finished:
                updates.append(ChoiceUpdate(choice.index, new_text, new_logprobs, completion.finish_reason))
        return updates

    def usage(self) -> dict:
        """OpenAI usage plus DeepSeek's cache fields (prompt_tokens = hit + miss)."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        hit = sum(self.num_cached)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_cache_hit_tokens": hit,
            "prompt_cache_miss_tokens": prompt_tokens - hit,
            "prompt_tokens_details": {"cached_tokens": hit},
        }

    def close(self, record_metrics: bool = True) -> None:
        """Abort what is unfinished, give the capacity back, record metrics. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for request_id in self.unfinished:
            self.state.engine_loop.abort(request_id)
        self.state.in_flight -= self.admitted
        if self.admitted and record_metrics:
            usage = self.usage()
            reasons = {c.finish_reason for c in self.choices}
            outcome = "aborted" if self.unfinished else ",".join(sorted(r for r in reasons if r))
            self.state.metrics.record_finished(self.endpoint, outcome, usage["prompt_tokens"],
                                               usage["completion_tokens"], usage["prompt_cache_hit_tokens"],
                                               time.monotonic() - self.arrival)


# ------------------------------------------------------------------ request preparation


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found")


def _check_length(state: ServerState, prompt_ids: list[int], max_tokens: int | None, default: int | None,
                  prompt_param: str) -> int:
    """Validate the prompt against the context window and return the max_tokens to use.

    An explicit max_tokens that does not fit is an error (as in vLLM); a default is shrunk to fit.
    """
    limit, n = state.max_model_len, len(prompt_ids)
    if n == 0:
        raise _bad_request("the prompt is empty", prompt_param)
    if n >= limit:
        raise _bad_request(f"This model's maximum context length is {limit} tokens. However, your request has "
                           f"{n} input tokens. Please reduce the length of the input.", prompt_param,
                           "context_length_exceeded")
    if max_tokens is not None:
        if n + max_tokens > limit:
            raise _bad_request(f"max_tokens is too large: {max_tokens}. This model's maximum context length is "
                               f"{limit} tokens and your request has {n} input tokens ({limit - n} tokens are left "
                               "for the completion).", "max_tokens", "context_length_exceeded")
        return max_tokens
    return limit - n if default is None else min(default, limit - n)


def _sampling_params(body, max_tokens: int, logprobs: int | None):
    from nanoseek.inference.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **body.sampling_kwargs())
    try:
        params.validate()
    except NanoseekError as e:
        raise _bad_request(str(e)) from e
    return params


def _encode_prompt(state: ServerState, prompt) -> list[int]:
    """Token ids of a /v1/completions prompt. Text gets bos in front (as the engine does for text
    prompts, and as pretraining documents are stored); token ids are used as given."""
    if isinstance(prompt, str):
        ids = state.tokenizer.encode(prompt)
        return ids if ids[:1] == [state.tokenizer.bos_id] else [state.tokenizer.bos_id] + ids
    vocab = state.tokenizer.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise _bad_request(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
    return list(prompt)


# ------------------------------------------------------------------ response encoding


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_logprobs(state: ServerState, records: list[dict]) -> dict:
    def entry(token_id, logprob):
        text, raw = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [
        {**entry(r["token_id"], r["logprob"]), "top_logprobs": [entry(t, lp) for t, lp in r.get("top_logprobs", [])]}
        for r in records
    ]}


def _completion_logprobs(state: ServerState, records: list[dict], offset: int) -> dict:
    tokens, offsets = [], []
    for r in records:
        offsets.append(offset)
        text = state.token_text(r["token_id"])[0]
        tokens.append(text)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [r["logprob"] for r in records],
        "top_logprobs": [{state.token_text(t)[0]: lp for t, lp in r.get("top_logprobs", [])} for r in records],
        "text_offset": offsets,
    }


def _reasoning_tokens(token_ids: list[int], think_end_id: int | None, saw_reasoning: bool) -> int:
    """Generated tokens spent thinking: up to and including </think> (all of them if it never came)."""
    if not saw_reasoning:
        return 0
    if think_end_id is not None and think_end_id in token_ids:
        return token_ids.index(think_end_id) + 1
    return len(token_ids)


class GenerationStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its Generation however the stream ends.

    Starlette cancels the body iterator when the client disconnects; an async generator that has
    not started yet would then never run its `finally`, so the cleanup lives here instead.
    """

    def __init__(self, content, generation: Generation):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


async def _run_unless_disconnected(request: Request, generation: Generation) -> bool:
    """Run a non-streaming generation; False if the client disconnected first (we stop at once).

    After the body has been read, the next ASGI `receive()` returns only on disconnect, so waiting
    on it next to the generation notices a client that hung up without polling.
    """

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(generation.collect())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        return False
    work.result()  # re-raise EngineDeadError and friends
    return True


def _in_band_error(e: Exception) -> str:
    """An error after the 200 header went out: sent as an SSE event, as vLLM and OpenAI do."""
    if isinstance(e, EngineDeadError):
        err = APIError(503, str(e), "server_error", code="engine_dead")
    else:
        logger.exception("error while streaming")
        err = APIError(500, "internal error while streaming; see the server log", "server_error",
                       code="internal_error")
    return _sse(err.body())


# ------------------------------------------------------------------ endpoints


async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    _check_model(state, body.model)
    try:
        prompt_text = state.tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=True)
    except NanoseekError as e:
        raise _bad_request(str(e), "messages") from e
    prompt_ids = state.tokenizer.encode(prompt_text)
    max_tokens = _check_length(state, prompt_ids, body.max_completion_tokens or body.max_tokens, None, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(body, max_tokens, logprobs)
    split = state.separate_reasoning if body.separate_reasoning is None else body.separate_reasoning
    in_reasoning = prompt_opens_reasoning(prompt_text)

    generation = Generation(state, "chat", [prompt_ids], params)
    await generation.start()
    request_id, created, model = f"chatcmpl-{generation.id_prefix}", int(time.time()), state.model_name
    splitters = [ReasoningSplitter(in_reasoning) if split else None for _ in generation.choices]
    think_end = _token_id_or_none(state.tokenizer, "think_end_id")

    def usage():
        u = generation.usage()
        if split:
            u["completion_tokens_details"] = {"reasoning_tokens": sum(
                _reasoning_tokens(c.token_ids, think_end, s.saw_reasoning) for c, s in zip(generation.choices, splitters))}
        return u

    if not body.stream:
        try:
            if not await _run_unless_disconnected(request, generation):
                return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from e
        finally:
            generation.close()
        choices = []
        for c, splitter in zip(generation.choices, splitters):
            message = {"role": "assistant", "content": c.text}
            if splitter is not None:
                out = splitter.feed(c.text)
                out += splitter.finish()
                message["content"] = (out.content or None) if splitter.saw_reasoning else out.content
                message["reasoning_content"] = out.reasoning if splitter.saw_reasoning else None
            choices.append({"index": c.index, "message": message,
                            "logprobs": _chat_logprobs(state, c.logprobs) if logprobs is not None else None,
                            "finish_reason": c.finish_reason})
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage()})

    include_usage = body.include_usage

    def chunk(index, delta, finish_reason=None, lp=None):
        c = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def events():
        pending_lp = {c.index: [] for c in generation.choices}  # logprobs waiting for the next chunk

        def lp_of(index):
            if logprobs is None:
                return None
            records, pending_lp[index] = pending_lp[index], []
            return _chat_logprobs(state, records)

        try:
            for c in generation.choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
            async for updates in generation.updates():
                for u in updates:
                    pending_lp[u.index].extend(u.logprobs)
                    splitter = splitters[u.index]
                    if splitter is None:
                        parts = [("content", u.text)]
                    else:
                        out = splitter.feed(u.text)
                        if u.finish_reason is not None:
                            out += splitter.finish()
                        # Separate chunks for the two fields: DeepSeek's clients read one or the other.
                        parts = [("reasoning_content", out.reasoning), ("content", out.content)]
                    for key, text in parts:
                        if text:
                            yield chunk(u.index, {key: text}, lp=lp_of(u.index))
                    if u.finish_reason is not None:
                        yield chunk(u.index, {}, u.finish_reason, lp=lp_of(u.index) if pending_lp[u.index] else None)
            if include_usage:
                yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage()})
        except Exception as e:  # noqa: BLE001 - headers are sent; report in band, then end the stream
            yield _in_band_error(e)
        yield "data: [DONE]\n\n"

    return GenerationStreamingResponse(events(), generation)


async def completions(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.server
    _check_model(state, body.model)
    prompts = body.prompts()
    if not prompts:
        raise _bad_request("the prompt is empty", "prompt")
    prompt_ids = [_encode_prompt(state, p) for p in prompts]
    # OpenAI's default of 16 tokens is shrunk to fit the context; an explicit value must fit.
    max_tokens = min(_check_length(state, ids, body.max_tokens, 16, "prompt") for ids in prompt_ids)
    params = _sampling_params(body, max_tokens, body.logprobs)
    prompt_texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts] if body.echo else None

    generation = Generation(state, "completions", prompt_ids, params)
    await generation.start()
    request_id, created, model = f"cmpl-{generation.id_prefix}", int(time.time()), state.model_name
    echo = [prompt_texts[c.index // params.n] if body.echo else "" for c in generation.choices]

    if not body.stream:
        try:
            if not await _run_unless_disconnected(request, generation):
                return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from e
        finally:
            generation.close()
        choices = [{"index": c.index, "text": echo[c.index] + c.text,
                    "logprobs": _completion_logprobs(state, c.logprobs, len(echo[c.index]))
                    if body.logprobs is not None else None,
                    "finish_reason": c.finish_reason} for c in generation.choices]
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": generation.usage()})

    include_usage = body.include_usage

    def chunk(index, text, finish_reason=None, lp=None):
        c = {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def events():
        offsets = [len(e) for e in echo]
        try:
            for c in generation.choices:
                if echo[c.index]:
                    yield chunk(c.index, echo[c.index])
            async for updates in generation.updates():
                for u in updates:
                    lp = None
                    if body.logprobs is not None:
                        lp = _completion_logprobs(state, u.logprobs, offsets[u.index])
                    offsets[u.index] += len(u.text)
                    if u.text or u.finish_reason is not None or u.logprobs:
                        yield chunk(u.index, u.text, u.finish_reason, lp)
            if include_usage:
                yield _sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [], "usage": generation.usage()})
        except Exception as e:  # noqa: BLE001
            yield _in_band_error(e)
        yield "data: [DONE]\n\n"

    return GenerationStreamingResponse(events(), generation)


def _token_id_or_none(tokenizer, attribute: str) -> int | None:
    try:
        return getattr(tokenizer, attribute)
    except NanoseekError:
        return None


# ------------------------------------------------------------------ the app


def create_app(engine, *, model_name: str = "nanoseek", api_key: str | None = None,
               separate_reasoning: bool = True, max_waiting: int = 256, max_running: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (a `nanoseek.LLM` with a tokenizer).

    The engine is driven by a background thread that starts with the app (lifespan) and stops with
    it; the app must be the engine's only user while it runs.
    """
    if engine.tokenizer is None:
        raise NanoseekError("the server needs a tokenizer: load a checkpoint directory that has tokenizer.json")
    engine_loop = EngineLoop(engine)
    state = ServerState(
        engine_loop=engine_loop, tokenizer=engine.tokenizer, model_name=model_name,
        max_model_len=engine.max_model_len, api_key=api_key, separate_reasoning=separate_reasoning,
        max_running=max_running or getattr(engine, "max_num_seqs", None) or 64, max_waiting=max_waiting,
    )

    @asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state

    async def check_api_key(request: Request):
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), state.api_key.encode()):
            message = "Missing API key: send 'Authorization: Bearer <key>'." if not auth else "Incorrect API key provided."
            raise APIError(401, message, "authentication_error", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    v1.add_api_route("/chat/completions", chat_completions, methods=["POST"])
    v1.add_api_route("/completions", completions, methods=["POST"])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "nanoseek", "max_model_len": state.max_model_len}]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if engine_loop.dead is not None or not engine_loop.thread.is_alive():
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(engine_loop.stats, state.in_flight),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        state.metrics.rejected[e.code or str(e.status)] += 1
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        # FastAPI's default is a 422 with its own shape; OpenAI clients expect a 400 in the error envelope.
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            err = _bad_request(f"The request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
        else:
            where = ".".join(loc)
            msg = first.get("msg", "invalid request")
            err = _bad_request(f"{where}: {msg}" if where else msg, loc[0] if loc else None,
                               "missing_required_parameter" if first.get("type") == "missing" else "invalid_value")
        return await api_error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        types = {404: "not_found_error", 405: "invalid_request_error"}
        err = APIError(e.status_code, str(e.detail), types.get(e.status_code, "invalid_request_error"),
                       code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error")
        err = APIError(500, "internal server error; see the server log", "server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    return app


class ServerThread:
    """Run an app with uvicorn in a background thread on a loopback port (tests, benchmarks).

        with ServerThread(app) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="x")

    Port 0 asks the OS for a free port, so parallel runs never collide; `url` has the real one.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="nanoseek-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ------------------------------------------------------------------ CLI: nanoseek serve


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback by default)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 0-65535 (0: any free one)")
    parser.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOSEEK_API_KEY, else open)")
    parser.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    parser.add_argument("--no-reasoning-split", action="store_true",
                        help="return <think>...</think> inside content instead of as reasoning_content")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences the engine batches at once")
    parser.add_argument("--max-waiting", type=int, default=256,
                        help="sequences that may queue beyond --max-num-seqs before requests get 503")
    parser.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the engine's prefix cache off")
    parser.add_argument("--speculative-mtp", type=int, default=0, help="draft tokens per step from the MTP heads")
    add_device_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def port_number(text: str) -> int:
    """argparse type for --port: an integer in 0-65535, or a usage error naming the range."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give an integer from 0 to 65535")
    return int(text)


def check_bindable(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be bound (in use, or no such interface)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NanoseekError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise NanoseekError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                                "(or stop what holds it)") from None


def run(args) -> int:
    import uvicorn

    from nanoseek.inference.engine import LLM

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise NanoseekError(f"--model {args.model}: no such directory; point it at a checkpoint directory")
    check_bindable(args.host, args.port)
    engine = LLM(model_dir, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                 enable_prefix_caching=not args.no_prefix_caching, speculative_mtp=args.speculative_mtp,
                 device=args.device, dtype=args.dtype)
    name = args.served_model_name or model_dir.resolve().name
    app = create_app(engine, model_name=name, api_key=args.api_key, separate_reasoning=not args.no_reasoning_split,
                     max_waiting=args.max_waiting, max_running=args.max_num_seqs)
    print(f"nanoseek serve: {name} (max_model_len {engine.max_model_len}) on http://{args.host}:{args.port}  "
          f"chat page at /, API at /v1{'  (API key required)' if args.api_key else ''}")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
