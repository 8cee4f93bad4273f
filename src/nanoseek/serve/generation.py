"""The engine side of one HTTP request, and the state every request shares.

A `Generation` admits a request's prompts into the engine (through the engine loop's thread),
relays their outputs as per-choice updates, and always cleans up: however the request ends
(finished, client gone, error) it aborts what is unfinished, which frees the engine slots and
cache blocks at once, and gives the capacity back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from nanoseek.errors import NanoseekError
from nanoseek.serve.engine_loop import EngineDeadError, EngineLoop
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.protocol import APIError, bad_request
from nanoseek.tokenizer import TokenText


@dataclass
class ServerState:
    """Everything the handlers share. Mutated only on the event loop (no locks needed)."""

    engine_loop: EngineLoop
    tokenizer: object
    model_name: str
    max_model_len: int
    separate_reasoning: bool = True
    sampling_defaults: dict = field(default_factory=dict)  # generation_config.json's, for unset fields
    chat_template_kwargs: dict = field(default_factory=dict)  # --default-chat-template-kwargs, under a request's
    tool_format: object = None  # ToolCallFormat the model's tool calls are read in (None: none)
    max_running: int = 64     # sequences the engine runs at once (its max_num_seqs)
    max_waiting: int = 256    # sequences allowed to queue beyond that before we answer 503
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0        # sequences admitted and not finished (running + waiting)
    metrics: Metrics | None = None

    def __post_init__(self):
        self.metrics = self.metrics or Metrics(self.model_name)
        self.token_text = TokenText(self.tokenizer)


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
        """`params`: one SamplingParams for every prompt, or a list with one per prompt (the same n)."""
        self.state, self.endpoint, self.prompts = state, endpoint, prompts
        self.params = params if isinstance(params, list) else [params] * len(prompts)
        self.n = self.params[0].n
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
        # how the response reports a choice's finish, for the metrics (the chat format reports
        # "tool_calls" where a choice called tools; the engine's reason otherwise)
        self.reported_finish_reason = lambda choice: choice.finish_reason

    async def start(self) -> None:
        """Admit the request, or raise APIError: 503 when the queue is full, 400 for bad input."""
        state, needed = self.state, len(self.prompts) * self.n
        if state.engine_loop.dead is not None:
            raise APIError(503, "the inference engine has failed; restart the server", "server_error",
                           code="engine_dead")
        capacity = state.max_running + state.max_waiting
        if needed > capacity:  # a 503 says "retry later", but no retry would ever fit
            raise bad_request(f"this request needs {needed} sequences ({len(self.prompts)} prompt(s) x n={self.n}), "
                              f"but the server holds at most {capacity} at once; lower n or send fewer prompts",
                              "n" if len(self.prompts) == 1 else "prompt")
        if state.in_flight + needed > capacity:
            raise APIError(503, f"server overloaded: {state.in_flight} sequences in flight; retry later",
                           "server_error", code="server_overloaded")
        state.in_flight += needed
        self.admitted = needed
        try:
            for request_id, prompt, params in zip(self.request_ids, self.prompts, self.params):
                self.unfinished.add(request_id)  # first: even a cancelled add gets aborted by close()
                await state.engine_loop.add(prompt, params, request_id, self.queue)
        except BaseException as e:
            # Bad input, a dead engine, or the client leaving mid-admission: undo what was admitted.
            self.close(record_metrics=False)
            if isinstance(e, (NanoseekError, ValueError, TypeError)):
                raise bad_request(str(e), getattr(e, "param", None)) from e  # SamplingParams names its field
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
            reasons = {self.reported_finish_reason(c) for c in self.choices}
            outcome = "aborted" if self.unfinished else ",".join(sorted(r for r in reasons if r))
            self.state.metrics.record_finished(self.endpoint, outcome, usage["prompt_tokens"],
                                               usage["completion_tokens"], usage["prompt_cache_hit_tokens"],
                                               time.monotonic() - self.arrival)
