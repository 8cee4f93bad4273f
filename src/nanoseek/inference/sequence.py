"""Per-request state: a Request holds its n Sequences (one per sample); the output records.

A Sequence is the unit the scheduler and the cache work with. Its token list is prompt plus
generated tokens; `num_computed` of them have their latents in the cache. Every forward computes
`token_ids[num_computed:]` and samples the next token, which makes prefill, decode and recompute
after preemption one and the same operation (prefill computes many tokens, decode one).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

import torch

from nanoseek.inference.sampling import SamplingParams


MAX_PENDING_MTP = 256  # plain forwards whose hidden states a sequence keeps for its MTP cache


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str  # decoded generated text so far (stop string removed)
    token_ids: list[int]  # generated ids so far
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    logprobs: list[dict] | None  # per generated token: {"token_id", "logprob", "top_logprobs": [(id, lp), ...]}
    cumulative_logprob: float


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # n of them
    finished: bool  # all n samples finished
    num_cached_tokens: int  # prompt tokens served from the prefix cache


class Sequence:
    def __init__(self, seq_id: int, request: "Request", index: int, generator: torch.Generator):
        self.seq_id = seq_id
        self.request = request
        self.index = index  # sample number within the request
        self.params: SamplingParams = request.params
        self.generator = generator
        self.token_ids: list[int] = list(request.prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        # cache bookkeeping (owned by the block manager and the engine)
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose latents are in the cache
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.prefix_hash: bytes | None = None  # chained content digest of those blocks
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        # MTP speculation (engine.py). mtp_last: the MTP module's hidden state (D,) and logits (V,)
        # at the last computed position, what the next drafts come from; None while the MTP cache
        # lags behind the main one. mtp_pending: the plain forwards since the MTP's last run, as
        # (hidden (B, T, D), row, count): the main model's hidden states of the positions whose
        # MTP-cache entries still have to be written (they need the token that followed).
        self.mtp_last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mtp_pending: deque[tuple[torch.Tensor, int, int]] = deque(maxlen=MAX_PENDING_MTP)
        # structured output (structured.py): the outlines Guide that the next token must follow, set
        # by the engine for a request with json_schema / regex; while the model is still inside a
        # <think> block that the prompt opened, the guide waits (not active) for its </think>
        self.guide = None
        self.guide_active = False
        # outputs
        self.logprobs: list[dict] | None = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.final_text: str | None = None  # set at finish when a stop token or string ends the text

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def can_speculate(self) -> bool:
        """No penalties: the target distribution of a drafted position must not depend on the
        drafts before it (penalties count the tokens generated so far). No structured output
        either: its mask at a drafted position depends on the drafts before it too."""
        return not self.params.has_penalties and self.guide is None


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs: list[Sequence] = []

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
