"""Response encoding: a finished or streaming `Generation` as OpenAI's JSON or SSE chunks.

One builder, `respond`, serves both endpoints and both modes; what differs between
/v1/chat/completions and /v1/completions (choice shape, reasoning split, logprobs shape, echo) is
in `ChatFormat` and `CompletionFormat`. Streams start with each choice's opening chunk (chat: the
role delta; completions: the echoed prompt), end with a finish_reason chunk per choice, an optional
usage chunk and `data: [DONE]`; an error after the 200 header went out is sent in band.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanoseek.errors import NanoseekError
from nanoseek.serve.engine_loop import EngineDeadError
from nanoseek.serve.generation import ChoiceUpdate, Generation, ServerState, _Choice
from nanoseek.serve.protocol import APIError
from nanoseek.serve.reasoning import ReasoningSplitter
from nanoseek.serve.tools import ToolCallFormat, parse_tool_calls

logger = logging.getLogger("nanoseek.serve")


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


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _reasoning_tokens(token_ids: list[int], think_end_id: int | None, saw_reasoning: bool) -> int:
    """Generated tokens spent thinking: up to and including </think> (all of them if it never came)."""
    if not saw_reasoning:
        return 0
    if think_end_id is not None and think_end_id in token_ids:
        return token_ids.index(think_end_id) + 1
    return len(token_ids)


def _tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatFormat:
    """How /v1/chat/completions writes a generation: `message` / `delta` choices, reasoning split
    into `reasoning_content` (one ReasoningSplitter per choice), tool calls parsed out of the answer
    into `tool_calls` (one ToolCallParser per choice, when the request offers tools), chat-shaped
    logprobs. A choice that called tools finishes with "tool_calls"."""

    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, state: ServerState, generation: Generation, split: bool, in_reasoning: bool,
                 logprobs: int | None, tool_format: ToolCallFormat | None = None, parallel_tool_calls: bool = True):
        self.state, self.generation, self.logprobs = state, generation, logprobs
        self.splitters = [ReasoningSplitter(in_reasoning) if split else None for _ in generation.choices]
        self.pending = {c.index: [] for c in generation.choices}  # logprobs waiting for the next chunk
        self.tool_format, self.parallel_tool_calls = tool_format, parallel_tool_calls
        self.tool_parsers = [tool_format.parser() if tool_format else None for _ in generation.choices]
        self.called = [False] * len(generation.choices)  # the choice's output was tool calls
        generation.reported_finish_reason = self.finish_reason  # the metrics count "tool_calls" as sent

    def opening(self, choice: _Choice) -> list[dict]:
        return [{"delta": {"role": "assistant", "content": ""}}]

    def chunks(self, u: ChoiceUpdate) -> list[tuple[dict, dict | None, str | None]]:
        """(choice body, logprobs, finish_reason) of each chunk an update makes."""
        self.pending[u.index].extend(u.logprobs)
        finished = u.finish_reason is not None
        splitter = self.splitters[u.index]
        reasoning, content = "", u.text
        if splitter is not None:
            out = splitter.feed(u.text)
            if finished:
                out += splitter.finish()
            reasoning, content = out.reasoning, out.content
        # Separate chunks for the fields: DeepSeek's clients read one or the other.
        deltas = [{"reasoning_content": reasoning}] if reasoning else []
        parser = self.tool_parsers[u.index]
        if parser is None:
            deltas += [{"content": content}] if content else []
        else:
            deltas += self._tool_deltas(parser.feed(content) + (parser.finish() if finished else []))
            self.called[u.index] = parser.succeeded
        chunks = [({"delta": delta}, self._take_logprobs(u.index), None) for delta in deltas]
        if finished:
            logprobs = self._take_logprobs(u.index) if self.pending[u.index] else None
            chunks.append(({"delta": {}}, logprobs, self.finish_reason(self.generation.choices[u.index])))
        return chunks

    def _tool_deltas(self, events: list[tuple]) -> list[dict]:
        """Deltas of a tool-call parser's events: content, a call's opening chunk (index, id, type,
        name, empty arguments: what vLLM and OpenAI send first), then its arguments as they come."""
        deltas = []
        for event in events:
            if event[0] == "content":
                deltas.append({"content": event[1]})
            elif event[1] > 0 and not self.parallel_tool_calls:
                continue  # parallel_tool_calls false: the first call only
            elif event[0] == "call":
                deltas.append({"tool_calls": [{"index": event[1], "id": _tool_call_id(), "type": "function",
                                               "function": {"name": event[2], "arguments": ""}}]})
            else:
                deltas.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return deltas

    def finish_reason(self, choice: _Choice) -> str | None:
        return "tool_calls" if self.called[choice.index] else choice.finish_reason

    def _take_logprobs(self, index: int) -> dict | None:
        if self.logprobs is None:
            return None
        records, self.pending[index] = self.pending[index], []
        return self._encode_logprobs(records)

    def _encode_logprobs(self, records: list[dict]) -> dict:
        def entry(token_id, logprob):
            text, raw = self.state.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [{**entry(r["token_id"], r["logprob"]),
                             "top_logprobs": [entry(t, lp) for t, lp in r.get("top_logprobs", [])]}
                            for r in records]}

    def whole(self, choice: _Choice) -> dict:
        message = {"role": "assistant", "content": choice.text}
        splitter = self.splitters[choice.index]
        if splitter is not None:
            out = splitter.feed(choice.text)
            out += splitter.finish()
            message["content"] = (out.content or None) if splitter.saw_reasoning else out.content
            message["reasoning_content"] = out.reasoning if splitter.saw_reasoning else None
        if self.tool_format is not None and message["content"]:
            content, calls = parse_tool_calls(message["content"], self.tool_format)
            if calls:
                calls = calls if self.parallel_tool_calls else calls[:1]
                message["content"] = content if content.strip() else None
                message["tool_calls"] = [{"id": _tool_call_id(), **call} for call in calls]
                self.called[choice.index] = True
        return {"message": message, "logprobs": self._encode_logprobs(choice.logprobs) if self.logprobs is not None
                else None}

    def usage(self) -> dict:
        usage = self.generation.usage()
        if self.splitters[0] is not None:
            think_end = _token_id_or_none(self.state.tokenizer, "think_end_id")
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(
                _reasoning_tokens(c.token_ids, think_end, s.saw_reasoning)
                for c, s in zip(self.generation.choices, self.splitters))}
        return usage


class CompletionFormat:
    """How /v1/completions writes a generation: `text` choices (after the echoed prompt, if asked),
    completion-shaped logprobs with text offsets."""

    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, state: ServerState, generation: Generation, echo: list[str], logprobs: int | None):
        self.state, self.generation, self.echo, self.logprobs = state, generation, echo, logprobs
        self.offsets = [len(e) for e in echo]  # text offset of each choice's next token

    def opening(self, choice: _Choice) -> list[dict]:
        return [{"text": self.echo[choice.index]}] if self.echo[choice.index] else []

    def chunks(self, u: ChoiceUpdate) -> list[tuple[dict, dict | None, str | None]]:
        logprobs = None
        if self.logprobs is not None:
            logprobs = self._encode_logprobs(u.logprobs, self.offsets[u.index])
            # the next offset follows these tokens' own texts, as in `whole`: the text released in
            # this chunk lags them while a split character or a possible stop string is held back
            self.offsets[u.index] += sum(map(len, logprobs["tokens"]))
        if u.text or u.finish_reason is not None or u.logprobs:
            return [({"text": u.text}, logprobs, u.finish_reason)]
        return []

    def _encode_logprobs(self, records: list[dict], offset: int) -> dict:
        token_text = self.state.token_text
        tokens, offsets = [], []
        for r in records:
            offsets.append(offset)
            text = token_text(r["token_id"])[0]
            tokens.append(text)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [r["logprob"] for r in records],
            "top_logprobs": [{token_text(t)[0]: lp for t, lp in r.get("top_logprobs", [])} for r in records],
            "text_offset": offsets,
        }

    def whole(self, choice: _Choice) -> dict:
        echo = self.echo[choice.index]
        return {"text": echo + choice.text,
                "logprobs": self._encode_logprobs(choice.logprobs, len(echo)) if self.logprobs is not None else None}

    def finish_reason(self, choice: _Choice) -> str | None:
        return choice.finish_reason

    def usage(self) -> dict:
        return self.generation.usage()


async def respond(request: Request, generation: Generation, fmt: ChatFormat | CompletionFormat, stream: bool,
                  include_usage: bool) -> Response:
    """The response to an admitted generation, in either endpoint's format (`fmt`): one JSON body,
    or an SSE stream of chunks (opening chunks, then one per piece of each update, an optional
    usage chunk, `[DONE]`). Errors after the 200 header went out are reported in band."""
    request_id, created = f"{fmt.id_prefix}-{generation.id_prefix}", int(time.time())
    model = generation.state.model_name

    if not stream:
        try:
            if not await _run_unless_disconnected(request, generation):
                return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
            choices = []
            for c in generation.choices:
                body = fmt.whole(c)  # first: it decides whether the choice called tools
                choices.append({"index": c.index, **body, "finish_reason": fmt.finish_reason(c)})
        except EngineDeadError as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from e
        finally:
            generation.close()  # after `whole`: the metrics record the finish reasons the response sends
        return JSONResponse({"id": request_id, "object": fmt.object, "created": created, "model": model,
                             "choices": choices, "usage": fmt.usage()})

    def chunk(index, body, logprobs=None, finish_reason=None):
        c = {"id": request_id, "object": fmt.chunk_object, "created": created, "model": model,
             "choices": [{"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def events():
        try:
            for c in generation.choices:
                for body in fmt.opening(c):
                    yield chunk(c.index, body)
            async for updates in generation.updates():
                for u in updates:
                    for body, logprobs, finish_reason in fmt.chunks(u):
                        yield chunk(u.index, body, logprobs, finish_reason)
            if include_usage:
                yield _sse({"id": request_id, "object": fmt.chunk_object, "created": created, "model": model,
                            "choices": [], "usage": fmt.usage()})
        except Exception as e:  # noqa: BLE001 - headers are sent; report in band, then end the stream
            yield _in_band_error(e)
        yield "data: [DONE]\n\n"

    return GenerationStreamingResponse(events(), generation)


def _token_id_or_none(tokenizer, attribute: str) -> int | None:
    try:
        return getattr(tokenizer, attribute)
    except NanoseekError:
        return None
