"""One thread that owns the engine, so many HTTP requests share its continuous batching.

The engine (`nanoseek.LLM`) is single-threaded by contract: `add_request`, `abort_request` and `step`
must never run concurrently. The server therefore never calls it from a request handler. Handlers
send commands (add, abort) into a thread-safe queue; one background thread drains that queue between
engine steps, runs `step()` while there is work, and hands every `RequestOutput` back to the asyncio
event loop with `call_soon_threadsafe`, into the asyncio queue of the request it belongs to.

Why a thread and not an asyncio task: a step is a model forward that can take tens of milliseconds
or more; on the event loop it would stall every other connection (health checks, SSE writes, new
requests). PyTorch releases the GIL inside its kernels, so the event loop stays responsive while the
engine thread computes.

When there is no work the thread blocks on the command queue, so an idle server uses no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("nanoseek.serve")


class EngineDeadError(RuntimeError):
    """The engine raised an unexpected exception in `step()`; the server can no longer generate."""


@dataclass
class _Add:
    prompt: Any                                   # str or list[int]
    params: Any                                   # SamplingParams
    request_id: str
    outputs: asyncio.Queue                        # where this request's RequestOutputs go
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future = field(repr=False)  # resolved once add_request returned (or raised)


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class EngineLoop:
    """Runs `engine.step()` in a background thread and routes outputs to per-request asyncio queues.

    Usage from async code:
        await loop.add(prompt_ids, params, request_id, outputs_queue)   # raises what add_request raises
        out = await outputs_queue.get()   # a RequestOutput, or an EngineDeadError instance
        loop.abort(request_id)            # non-blocking; frees the request's cache blocks at once
    """

    def __init__(self, engine):
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.routes: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}  # loop thread only
        self.dead: EngineDeadError | None = None
        self.stats: dict = self._safe_stats()  # last snapshot, read by /metrics from the event loop
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    # ---- called from the event loop ----

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and join the thread (server shutdown)."""
        if self.thread.is_alive():
            self.commands.put(_STOP)
            self.thread.join(timeout)

    async def add(self, prompt, params, request_id: str, outputs: asyncio.Queue) -> None:
        """Queue a request for the engine and wait until the engine accepted it.

        Waiting matters: `add_request` validates the request (prompt length, sampling values) and
        raises `NanoseekError` for bad input, which the server must turn into a 400 before it starts
        a 200 streaming response.
        """
        if self.dead is not None:
            raise self.dead
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        self.commands.put(_Add(prompt, params, request_id, outputs, loop, accepted))
        await accepted

    def abort(self, request_id: str) -> None:
        """Ask the engine to drop a request (client gone). Safe to call for finished requests."""
        self.commands.put(_Abort(request_id))

    # ---- the engine thread ----

    def _run(self) -> None:
        while True:
            # Block only when there is no step to take (idle, or dead after a failed step: its
            # requests stay unfinished, and spinning on them would burn a core); otherwise take what
            # has arrived and keep stepping.
            idle = self.dead is not None or not self.engine.has_unfinished_requests()
            try:
                commands = [self.commands.get(block=idle)]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self.commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is _STOP:
                    self._abort_all()
                    return
                self._execute(command)
            if self.dead is None and self.engine.has_unfinished_requests():
                self._step()
            self.stats = self._safe_stats()

    def _execute(self, command) -> None:
        if isinstance(command, _Abort):
            if self.routes.pop(command.request_id, None) is not None:
                self.engine.abort_request(command.request_id)
            return
        if self.dead is not None:
            _resolve(command.loop, command.accepted, self.dead)
            return
        try:
            self.engine.add_request(command.prompt, command.params, request_id=command.request_id)
        except Exception as e:  # NanoseekError for bad input; the handler decides the status code
            _resolve(command.loop, command.accepted, e)
            return
        self.routes[command.request_id] = (command.outputs, command.loop)
        _resolve(command.loop, command.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            # A bug, not bad input (that is rejected in add_request). Fail every request loudly rather
            # than hang them, and report the engine dead so /health turns 503.
            logger.error("engine step failed; the server cannot generate any more:\n%s", traceback.format_exc())
            self.dead = EngineDeadError("the inference engine failed; see the server log")
            for outputs_queue, loop in self.routes.values():
                loop.call_soon_threadsafe(outputs_queue.put_nowait, self.dead)
            self.routes.clear()
            return
        for out in outputs:
            route = self.routes.get(out.request_id)
            if route is None:
                continue  # aborted while the step ran
            if out.finished:
                del self.routes[out.request_id]
            outputs_queue, loop = route
            loop.call_soon_threadsafe(outputs_queue.put_nowait, out)

    def _abort_all(self) -> None:
        """Shutdown: drop every request and tell its handler, so no client waits forever."""
        self.dead = EngineDeadError("the server is shutting down")
        for request_id, (outputs_queue, loop) in self.routes.items():
            self.engine.abort_request(request_id)
            loop.call_soon_threadsafe(outputs_queue.put_nowait, self.dead)
        self.routes.clear()

    def _safe_stats(self) -> dict:
        try:
            return dict(self.engine.stats(), updated_at=time.time())
        except Exception:  # metrics must never take the server down
            return {}


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: BaseException | None) -> None:
    """Complete `future` on its own event loop, from the engine thread."""

    def done():
        if future.done():  # the handler was cancelled (client left) while we were adding
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    loop.call_soon_threadsafe(done)
