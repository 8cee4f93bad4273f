"""Sampling parameters and the batched sampler.

`SamplingParams` is the per-request knob set (names and defaults follow vLLM / the OpenAI API).
`Sampler` turns one logits row per sequence into one token per sequence for a whole decode batch
at once.

Reproducibility: each sequence owns a `torch.Generator` on the model's device. A sampled token consumes exactly one draw
of V exponential variates from it (the "exponential race": argmax p_i / E_i with E_i ~ Exp(1) is a
draw from p), so the samples of a seeded request depend on its seed only, never on which other
requests share the batch or on preemption. Speculative decoding (`speculative_accept`) keeps the
distribution of every sampled token exact but draws differently (drafts, acceptance tests), so a
seeded request gives other samples with speculation on than off; and since the engine speculates
only while the batch is at most `speculative_max_batch`, with speculation on a seeded request's
samples also depend on how many others run beside it. Greedy output never changes.

Logprobs are those of the model's raw distribution, log_softmax(logits), before penalties,
temperature, truncation and a structured-output mask (vLLM's default "raw_logprobs"); that is the
policy the RL trainer scores. So under a json_schema a token can be chosen whose raw logprob is low,
and top_logprobs can list tokens the schema did not allow.

Structured output (`json_schema`, `regex`; nanoseek.inference.structured): a constrained row's
disallowed tokens get -inf logits before anything else, so greedy picks the likeliest allowed token
and sampling draws from the model's distribution renormalised over the allowed ones. The draw still
consumes one row of noise, so a seeded request stays independent of its batch.

Shape legend: B sequences in the batch, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanoseek.errors import NanoseekError
from nanoseek.inference.structured import allowed_tokens, schema_text

if TYPE_CHECKING:
    from nanoseek.inference.sequence import Sequence


GREEDY_TEMPERATURE = 1e-5  # temperatures below this decode greedily (vLLM's threshold)
MAX_LOGPROBS = 20  # top logprobs per token at most (OpenAI's and vLLM's limit)


class SamplingParamError(NanoseekError):
    """A bad SamplingParams field; `param` names it (the server returns it as the error's param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to sample one request; names and defaults follow vLLM and the OpenAI API.

    - n: samples per prompt; max_tokens: new tokens at most (>= 1).
    - temperature: 0 (or below 1e-5) is greedy. top_p in (0, 1]; top_k: 0 or -1 is no limit; min_p: drop tokens
      below min_p x the likeliest one's probability (0 is off).
    - seed: reproducible sampling for this request, whatever else is in the batch (None: unseeded).
    - stop: a stop string or a list of them, left out of the output text; stop_token_ids: stop
      tokens besides the tokenizer's eos; ignore_eos: do not stop at eos.
    - presence_penalty, frequency_penalty: OpenAI's, in [-2, 2], over generated tokens (0 is off);
      repetition_penalty: HF's, > 0, over prompt and generated tokens (1 is off).
    - logprobs: None for none, 0 for the chosen token's, k <= 20 for the top k as well (of the raw
      distribution, before penalties and temperature).
    - skip_special_tokens: leave special tokens out of the output text.
    - json_schema: the output must be JSON matching this schema (a dict, or its JSON text;
      {"type": "object"} for any JSON object); regex: the output must match this regular
      expression. At most one of them (vLLM's structured-output `json` / `regex`). Where the prompt
      opens a `<think>` block, the constraint applies after the model's `</think>`. A constrained
      output stops once it is complete (nothing may follow), ignore_eos or not. See
      nanoseek.inference.structured.

    `validate()` raises a NanoseekError naming the first bad field.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    json_schema: dict | str | None = None
    regex: str | None = None

    def validate(self) -> None:
        """Raise NanoseekError naming the first bad field."""
        def bad(name: str, why: str):
            raise SamplingParamError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}", name)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                bad(name, "must be a number")
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not 0 <= self.temperature < math.inf:  # inf divides every logit to 0: uniform noise, not a choice
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be an integer >= 1, or 0 / -1 for no limit")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0 < self.repetition_penalty < math.inf:
            bad("repetition_penalty", "must be a finite number > 0 (1 means off)")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be None or an integer from 0 to {MAX_LOGPROBS}")
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                bad("stop", "must be a string, a list of strings, or None")
        if any(s == "" for s in self.stop_strings):
            bad("stop", "stop strings must not be empty")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
                bad("stop_token_ids", "must be a list of integer token ids, or None")
        if self.json_schema is not None:
            if self.regex is not None:
                bad("regex", "set json_schema or regex, not both")
            try:
                schema_text(self.json_schema)
            except ValueError as e:
                raise SamplingParamError(f"invalid sampling parameter json_schema: {e}", "json_schema") from None
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            bad("regex", "must be a non-empty string (a regular expression), or None")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def greedy(self) -> bool:
        # below GREEDY_TEMPERATURE, logits / temperature overflow to inf (and softmax to NaN): argmax
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def constrained(self) -> bool:
        """The output must match a JSON schema or a regex (structured output)."""
        return self.json_schema is not None or self.regex is not None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


class Sampler:
    """Masks constrained rows to their guide's allowed tokens, applies each sequence's penalties,
    temperature, top-k/top-p/min-p, then picks its token.

    The common cases stay cheap: an all-greedy batch is one argmax; masks are built only for the
    rows that ask for them.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, seqs: list["Sequence"]) -> tuple[list[int], torch.Tensor | None]:
        """logits (B, V) -> (one token id per row, raw logprobs (B, V) if any row wants logprobs)."""
        logits = logits.float()
        logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        guided = [i for i, s in enumerate(seqs) if s.guide_active]
        if guided:  # after the raw logprobs: those stay the model's (see the module docstring)
            allowed = allowed_tokens([seqs[i].guide for i in guided], self.vocab_size, logits.device)  # (b, V)
            logits = logits.clone()
            logits[guided] = logits[guided].masked_fill(~allowed, -math.inf)
        params = [s.params for s in seqs]
        if all(p.greedy and not p.has_penalties for p in params):
            return logits.argmax(dim=-1).tolist(), logprobs

        if any(p.has_penalties for p in params):
            logits = logits.clone()  # penalties work in place; the caller's logits stay as they are
            for i, s in enumerate(seqs):
                if s.params.has_penalties:
                    self._apply_penalties(logits[i], s)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        greedy_ids = logits[greedy_rows].argmax(dim=-1).tolist() if greedy_rows else []

        rows = [i for i, p in enumerate(params) if not p.greedy]
        tokens = [0] * len(seqs)
        for i, t in zip(greedy_rows, greedy_ids):
            tokens[i] = t
        if rows:
            probs = self.probs(logits[rows], [params[i] for i in rows])  # (b, V)
            for i, t in zip(rows, draw(probs, [seqs[i].generator for i in rows]).tolist()):
                tokens[i] = t
        return tokens, logprobs

    def probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """logits (b, V) of non-greedy rows -> the truncated, renormalised sampling distribution (b, V).

        Only what the rows ask for is computed: untruncated rows at one temperature cost a
        division and a softmax (this runs several times per speculative step)."""
        dev = logits.device
        temps = {p.temperature for p in params}
        if len(temps) == 1:
            temp = temps.pop()
            probs = (logits if temp == 1 else logits / temp).softmax(dim=-1)
        else:
            probs = (logits / torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)).softmax(dim=-1)
        # a top_k past the vocabulary is no limit (and one past int64, which the API accepts,
        # would overflow the tensor below and fail the whole batch's step)
        top_k = [min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size for p in params]
        truncated = False
        if any(k < self.vocab_size for k in top_k) or any(p.top_p < 1 for p in params):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(self.vocab_size, device=dev).unsqueeze(0)  # (1, V)
            drop = rank >= torch.tensor(top_k, device=dev).unsqueeze(1)
            # top-p keeps the smallest prefix whose mass reaches top_p: drop a token once the mass
            # strictly before it already does (so the most likely token always stays).
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop |= mass_before >= torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
            truncated = True
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
            truncated = True
        return probs / probs.sum(dim=-1, keepdim=True) if truncated else probs

    def _apply_penalties(self, logits: torch.Tensor, seq: "Sequence") -> None:
        """In place on one row (V,), in vLLM's order: repetition over prompt and generated tokens
        (CTRL / HF: divide positive logits, multiply negative), then presence/frequency over
        generated tokens (OpenAI)."""
        p = seq.params
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device),
                                    minlength=self.vocab_size)[: self.vocab_size].float()
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs (b, V), each from its own generator -> (b,) on probs' device.
    The rows need not be normalised (only their ratios matter).

    The exponential race: argmax p_i / E_i with E_i ~ Exp(1) is a draw from p. One draw consumes
    V exponential variates of the row's generator, whatever the batch, which keeps seeded
    requests independent of their neighbours. The noise is drawn where the generators live (the
    engine's device), so a GPU's seeded samples differ from a CPU's."""
    noise = torch.empty(len(generators), probs.shape[-1], device=generators[0].device)
    for row, g in zip(noise, generators):  # each row in place: no per-row allocation, no stack copy
        row.exponential_(generator=g)
    return (probs / noise.to(probs.device)).argmax(dim=-1)


def speculative_accept(target: torch.Tensor, draft: torch.Tensor, draft_ids: torch.Tensor,
                       generators: list[torch.Generator]) -> tuple[list[int], list[int]]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): k drafted tokens per row,
    drawn from the draft distributions, checked against the target model's distributions.

    target (b, k+1, V): the target's sampling distributions at the k draft positions and one past
    them; draft (b, k, V): the distributions the drafts were drawn from; draft_ids (b, k).
    Draft j is kept with probability min(1, p_j(x) / q_j(x)) while all before it were kept. At the
    first rejection the next token is drawn from the residual max(0, p_j - q_j), renormalised;
    when all k are kept, from p_k. Every emitted token is then distributed exactly as if drawn
    from the target alone. Returns, per row, the number of drafts kept and the token after them.
    """
    b, k, V = draft.shape
    index = draft_ids.unsqueeze(-1)  # (b, k, 1)
    p = target[:, :k].gather(2, index)  # (b, k, 1)
    q = draft.gather(2, index)  # (b, k, 1), > 0: the drafts were drawn from it
    where = generators[0].device
    u = torch.stack([torch.rand(k, 1, generator=g, device=where) for g in generators]) if b > 1 \
        else torch.rand(1, k, 1, generator=generators[0], device=where)  # (b, k, 1)
    kept = (u.to(p.device) * q < p).view(b, k).tolist()  # u < p/q, without dividing
    accepted = [next((j for j in range(k) if not row[j]), k) for row in kept]
    rows, at = torch.arange(b, device=target.device), torch.tensor(accepted, device=target.device)
    p_next = target[rows, at]  # (b, V)
    # after a rejection at j: the residual max(0, p_j - q_j); when all k are kept: p_k itself
    residual = (p_next - draft[rows, at.clamp(max=k - 1)]).clamp(min=0).masked_fill((at == k).unsqueeze(1), 0)
    # where p == q no residual is left (and no rejection can happen): p_next keeps draw() defined
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    return accepted, draw(residual, generators).tolist()  # draw() needs no normalised residual


def top_logprobs(logprobs_row: torch.Tensor, token_id: int, k: int) -> dict:
    """The contract's per-token logprob record from one row of raw logprobs (V,)."""
    record = {"token_id": token_id, "logprob": float(logprobs_row[token_id]), "top_logprobs": []}
    if k > 0:
        values, ids = logprobs_row.topk(min(k, logprobs_row.shape[-1]))  # a vocabulary smaller than k: all of it
        record["top_logprobs"] = list(zip(ids.tolist(), values.tolist()))
    return record
