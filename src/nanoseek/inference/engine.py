"""`LLM`: the inference engine behind `from nanoseek import LLM, SamplingParams`.

nano-vllm's split: `sequence` (per-request state), `block_manager` (paged latent cache, prefix
cache), `scheduler` (continuous batching, preemption), `runner` (tensors in, hidden states out),
and this file, which owns the loop: schedule, run, sample, check stops, report.

    llm = LLM("runs/small")                      # a checkpoint directory (model + tokenizer)
    outs = llm.generate(["The sky is"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text

Decoding runs MLA's absorbed path straight on the cached latents (kv_lora_rank + qk_rope_head_dim
values per token and layer, + index_head_dim for a DeepSeek-V3.2 model's indexer key: `model.cache_dims`),
for all running sequences in one forward. A DeepSeek-V4 model caches its K=V row and its compressors'
per-token projections in the same rows (model/attention_v4.py), and runs eagerly (no CUDA graphs).

MTP speculative decoding (`speculative_mtp=k`): each decode step, the MTP module drafts k tokens
per sequence (chained: draft j feeds draft j+1, as vLLM does with DeepSeek's single MTP layer),
one main-model forward verifies all k+1 positions, and the accepted drafts plus one token of the
main model's are kept, so each step yields 1..k+1 tokens. Greedy sequences keep the longest prefix
of drafts equal to the main model's argmax: the output is that of plain decoding. Sampled
sequences draw their drafts from the MTP head's distribution (with the request's temperature,
top-k, top-p, min-p) and keep them by rejection sampling (`sampling.speculative_accept`): every
token is distributed exactly as in plain decoding. Sequences with penalties ride along without
drafts. The MTP layer's cache entry at position i needs the main model's hidden state at i and the
token at i+1, so it can only be written once i+1 is known: every speculative step ends by running
the MTP module over the positions it verified, on the cache slots of the verify forward, and the
row at the last accepted position yields the next step's first draft. So a step costs one main
forward of k+1 tokens and k MTP-module forwards, never a second main forward. After plain forwards
(a prefill; decode steps with speculation off) the next speculative step first runs the MTP module
over the positions they computed.

Speculation pays while verifying k+1 positions costs about as much as one, i.e. while a decode
step is bound by reading the weights, not by arithmetic. With many sequences in the batch it is
not, so above `speculative_max_batch` running sequences a decode step is plain (the MTP entries
then wait, and are caught up by the next speculative step; meanwhile a step costs no more than
with speculation off).

Text prompts get the tokenizer's bos prepended where the tokenizer adds one (`Tokenizer.add_bos`;
a nanoseek BPE does, matching how pretraining documents are stored) unless they already start with
it (the chat template writes it itself; `Tokenizer.encode_prompt`). Token-id prompts are used as
given. Every request is checked here, in `_check` (prompt: `prompt_ids`; sampling:
`SamplingParams.validate`), and only here: the server calls the same methods and maps their errors
to HTTP.

Structured output (`SamplingParams.json_schema` / `regex`, nanoseek.inference.structured): each
constrained sequence gets a guide; the sampler masks its logits to what the guide allows (outside
any CUDA graph: the mask applies to the logits the graph's hidden states give), `_append` advances
it, and the sequence finishes ("stop") once the guide allows nothing but eos. Constrained sequences
ride along without MTP drafts. The pattern is compiled when the request is checked (`prepare_constraint`,
cached per tokenizer), so a bad schema is an error before anything is queued.

Output text is decoded incrementally: each step decodes only a sequence's new tokens (with a
few tokens of context, as vLLM's detokenizer does), not its whole output again.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from nanoseek.device import pack_linears, quantize_model, resolve_device, resolve_dtype
from nanoseek.errors import ContextLengthError, NanoseekError
from nanoseek.inference.block_manager import BlockManager
from nanoseek.inference.runner import ModelRunner
from nanoseek.inference.sampling import Sampler, SamplingParams, draw, speculative_accept, top_logprobs
from nanoseek.inference.scheduler import Scheduler
from nanoseek.inference.sequence import CompletionOutput, Request, RequestOutput, Sequence
from nanoseek.inference.structured import guide_complete, guide_factory
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import Transformer

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

DEFAULT_CACHE_BYTES = 1 << 30  # cap of the default cache budget
# Above this many running sequences a decode step is plain even with speculative_mtp > 0: where
# verifying k+1 positions per sequence stops being nearly free. Measured on the CPU (1 thread,
# CPU-time clock, plain and speculative timed in turn): the `small` MoE (7M, 100 pretraining steps,
# sampled, k=1/2) breaks even at batch 2-4 (0.94-1.03x) and loses at 8 (0.83-0.97x), since each
# extra verified token wakes up to K more experts per MoE layer and the step is bound by per-expert
# calls; the 1.42M reasoning model still gains at 2-8 (1.05-1.12x), loses at 32 (0.83-0.92x). So 1.
# On a GPU an eager step is bound by kernel launches, which verification barely adds to: 32. With
# CUDA graphs (the default there) a plain decode step is one replay while the MTP module's run was
# eager: batch 1 of the `gpu` preset ran at 0.39x plain decoding (H100, random weights, acceptance 0;
# k=1 yields at most 2 tokens a step, so at most 0.78x), hence 0: never by default. Since then the
# MTP run after a graphed verify replays a graph too (runner.mtp_replay); not yet measured on a GPU,
# and a gain needs a trained MTP module, so the default stays 0.
DEFAULT_SPECULATIVE_MAX_BATCH = {"cpu": 1, "cuda": 32, "cuda_graphs": 0}

# A text prompt longer than this many characters per token of the context is first measured on
# that prefix (`LLM._check_prefix`): English runs about 4 characters a token, so a prompt this long
# overflows the context unless its tokens average 16 characters.
PREFIX_CHARS_PER_TOKEN = 16


class LLM:
    """The engine. `model` is a checkpoint directory (model and tokenizer are loaded from it) or an
    in-memory Transformer (RL: the trainer keeps updating its weights in place; call
    reset_prefix_cache() after each update, since cached latents were computed with the old ones).

    `device` and `dtype` apply when loading a checkpoint directory ("auto": a CUDA GPU in bfloat16
    when there is one, else the CPU in float32; see nanoseek.device), and so does `quantize`
    ("fp16": float16-weight linear layers on the CPU, "int8": weight-only int8 ones, "int8-dynamic":
    torch.ao's dynamic int8 ones;
    `nanoseek.device.quantize_model`); on the CPU in float32 the loaded model's linear layers are
    packed for oneDNN (`nanoseek.device.pack_linears`). The cache holds
    `num_cache_blocks` blocks of `block_size` tokens (in the model's dtype); by default as many as
    `cache_memory_bytes` buys, or enough for max_num_seqs sequences of max_model_len tokens (at most
    1 GiB). max_model_len (default: the model's max_position_embeddings) is capped at what the cache
    can hold, so a sequence alone always fits. `speculative_max_batch` (default: by device, see
    DEFAULT_SPECULATIVE_MAX_BATCH; 0: never) is the largest decode batch that speculates. On a GPU,
    decode and verify forwards replay CUDA graphs (see nanoseek.inference.runner), and speculation
    is off unless speculative_max_batch is given; `enforce_eager=True` (vLLM's name) runs every
    forward eagerly instead.
    """

    def __init__(self, model: "str | Path | Transformer", tokenizer=None, *, max_num_seqs: int = 64,
                 max_model_len: int | None = None, block_size: int = 64, cache_memory_bytes: int | None = None,
                 num_cache_blocks: int | None = None, enable_prefix_caching: bool = True,
                 speculative_mtp: int = 0, speculative_max_batch: int | None = None, dtype="auto",
                 device="auto", quantize: str | None = None, max_num_batched_tokens: int = 4096,
                 enforce_eager: bool = False):
        if speculative_mtp < 0:  # before a checkpoint loads
            raise NanoseekError(f"speculative_mtp={speculative_mtp}: draft a positive number of tokens per step "
                                "with the MTP module, or 0 to turn speculation off")
        if isinstance(model, (str, Path)):
            from nanoseek.checkpoint import load_config, load_model
            from nanoseek.train.checkpointing import checkpoint_path

            path = checkpoint_path(model)  # a run directory: the checkpoint its `latest` names
            load_config(path)  # a file, a missing path, no config.json: said before anything loads
            if tokenizer is None and (path / "tokenizer.json").is_file():  # first: its errors come at once
                from nanoseek.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_dir(path)
            device = resolve_device(device)
            model = load_model(path, dtype=resolve_dtype(dtype, device), device=device, quantize=quantize)
            model = pack_linears(model)  # CPU float32: oneDNN-packed linear layers (nanoseek.device)
            if device.type == "cuda":  # the grouped GEMMs read the experts' weights stacked, in place
                for moe in (m for m in model.modules() if isinstance(m, MoE)):
                    moe.stack_experts()
        elif quantize not in (None, "none"):
            model = quantize_model(model, quantize)
        cfg = model.config
        if speculative_mtp and cfg.num_nextn_predict_layers < 1:
            raise NanoseekError(f"speculative_mtp={speculative_mtp} needs a model with MTP modules "
                                f"(num_nextn_predict_layers={cfg.num_nextn_predict_layers}); use 0 to turn it off")
        if max_model_len is not None and max_model_len < 1:  # 0 would silently mean the model's
            raise NanoseekError(f"max_model_len={max_model_len} must be a positive number of tokens "
                                f"(None: the model's {cfg.max_position_embeddings})")
        for name, value, least in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                   ("speculative_max_batch", speculative_max_batch, 0)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise NanoseekError(f"{name}={value!r} must be an integer >= {least}"
                                    + (" (0: never speculate)" if name == "speculative_max_batch" else ""))
        device = next(model.parameters()).device
        cache_dtype = next(model.parameters()).dtype  # the latents are stored as the model computes them
        # CUDA graphs need a forward without host syncs: with MoE, its grouped GEMMs, which run in bf16
        # (bf16 weights, or fp32 ones under bf16 autocast: the runner checks at each forward)
        has_moe = any(isinstance(m, MoE) for m in model.modules())
        # DeepSeek-V4 runs eagerly: its cached forward is untried under graph capture
        cuda_graphs = device.type == "cuda" and not enforce_eager and not getattr(cfg, "is_v4", False)
        if speculative_max_batch is None:
            graphed = cuda_graphs and (not has_moe or cache_dtype == torch.bfloat16)
            speculative_max_batch = DEFAULT_SPECULATIVE_MAX_BATCH[
                "cuda_graphs" if graphed else "cpu" if device.type == "cpu" else "cuda"]
        self.model = model
        self.tokenizer = tokenizer
        self.speculative_mtp = speculative_mtp
        self.speculative_max_batch = speculative_max_batch

        max_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        block_bytes = ModelRunner.bytes_per_block(model, block_size, cache_dtype)
        if num_cache_blocks is None:
            want = max_num_seqs * -(-(max_len + speculative_mtp) // block_size) * block_bytes
            budget = cache_memory_bytes if cache_memory_bytes is not None else min(want, DEFAULT_CACHE_BYTES)
            num_cache_blocks = budget // block_bytes
        capacity = num_cache_blocks * block_size - speculative_mtp
        if capacity < 2:
            raise NanoseekError(f"the latent cache budget holds {num_cache_blocks} blocks of {block_size} tokens "
                                f"({block_bytes} bytes each): too small; raise cache_memory_bytes or num_cache_blocks")
        self.max_model_len = min(max_len, capacity)

        self.block_manager = BlockManager(num_cache_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, speculative_mtp)
        self.runner = ModelRunner(model, num_cache_blocks, block_size, cache_dtype, device, cuda_graphs, max_num_seqs,
                                  graph_tokens=1 + speculative_mtp, graphs_need_bf16=has_moe)
        self.sampler = Sampler(cfg.vocab_size)
        # every stop token: the tokenizer's eos and generation_config.json's eos_token_id list
        self.eos_ids = set(tokenizer.eos_token_ids) if tokenizer is not None else (
            {cfg.eos_token_id} if cfg.eos_token_id is not None else set())
        self._detokenizers: dict[int, IncrementalText] = {}  # seq_id -> its output text so far
        self.requests: dict[str, Request] = {}
        self._request_counter = itertools.count()
        self._seq_counter = itertools.count()
        self._stats = dict(prefix_cache_hit_tokens=0, prompt_tokens=0, generation_tokens=0,
                           spec_draft_tokens=0, spec_accepted_tokens=0)

    # ------------------------------------------------------------ public API

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (a string, a token-id list, or a list of either) to completion; one
        RequestOutput per prompt, in order. Every input is checked before any is queued.

        Runs the engine loop itself: don't mix it with step() callers in flight."""
        prompts = self._as_prompt_list(prompts)
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise NanoseekError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params or SamplingParams()] * len(prompts)
        checked = [self._check(p, sp) for p, sp in zip(prompts, params)]
        ids = [self._enqueue(p, ids, sp, None) for p, ids, sp in checked]
        wanted, final = set(ids), {}
        with self._eval_mode():  # once for the whole loop, not once per step
            while len(final) < len(ids):
                for req in self._step():
                    if req.finished and req.request_id in wanted:
                        final[req.request_id] = self._output(req)
        return [final[i] for i in ids]

    def add_request(self, prompt: "str | list[int]", params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request; returns its id. Bad input raises NanoseekError and queues nothing."""
        if request_id is not None and request_id in self.requests:
            raise NanoseekError(f"request id {request_id!r} is already in use")
        return self._enqueue(*self._check(prompt, params or SamplingParams()), request_id)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now (finish_reason "abort") and free its cache blocks; unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else []:
            self._detokenizers.pop(seq.seq_id, None)
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"

    def step(self) -> list[RequestOutput]:
        """One scheduler step: a prefill or a decode forward. Returns the outputs of the requests
        that got new tokens (cumulative, like vLLM's: text and token_ids so far)."""
        with self._eval_mode():
            return [self._output(req) for req in self._step()]

    def has_unfinished_requests(self) -> bool:
        """True while a queued request has not finished (run step() until it is False)."""
        return bool(self.requests)

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """One request, yielding its output after every step that extends it. Closing the
        generator early aborts the request."""
        request_id = self.add_request(prompt, params)
        try:
            while request_id in self.requests:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
        finally:
            self.abort_request(request_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix: call it after changing the model's weights in place."""
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        """Counters so far: requests running and waiting, KV-cache usage, tokens, preemptions, MTP acceptance."""
        s = self._stats
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "cache_usage": self.block_manager.usage(),
            "prefix_cache_hit_tokens": s["prefix_cache_hit_tokens"],
            "prompt_tokens": s["prompt_tokens"],
            "generation_tokens": s["generation_tokens"],
            "num_preemptions": self.scheduler.num_preemptions,
            "spec_acceptance_rate": s["spec_accepted_tokens"] / max(s["spec_draft_tokens"], 1),
            "spec_draft_tokens": s["spec_draft_tokens"],
            "spec_accepted_tokens": s["spec_accepted_tokens"],
        }

    # ------------------------------------------------------- input checking

    def _as_prompt_list(self, prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise NanoseekError("prompts must be a string, a token-id list, or a non-empty list of either")
        return list(prompts)

    def _check(self, prompt, params: SamplingParams) -> tuple[str | None, list[int], SamplingParams]:
        """Validate one request; returns (prompt text, prompt ids, params) or raises NanoseekError."""
        if not isinstance(params, SamplingParams):
            raise NanoseekError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if params.stop_strings and self.tokenizer is None:
            raise NanoseekError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        self.prepare_constraint(params)
        return (prompt if isinstance(prompt, str) else None), self.prompt_ids(prompt), params

    def prepare_constraint(self, params: SamplingParams) -> None:
        """Compile a request's json_schema / regex into its index (cached per tokenizer; nothing to
        do without one). Raises a NanoseekError naming the field when it cannot be enforced. Safe
        from any thread: the server calls it off the engine's thread, since a large pattern takes
        seconds to compile."""
        if not params.constrained:
            return
        if self.tokenizer is None:
            raise NanoseekError("structured output (json_schema, regex) needs a tokenizer; this engine has none")
        guide_factory(self.tokenizer).index(params.json_schema, params.regex)

    def _opens_reasoning(self, prompt_ids: list[int]) -> bool:
        """The prompt leaves the model inside a <think> block (R1's template ends with "<think>\n"):
        a constraint then starts after the model's </think>."""
        from nanoseek.serve.reasoning import prompt_opens_reasoning  # the server's rule, one place for it

        if self.tokenizer is None or self.tokenizer.think_end_id is None:
            return False
        return prompt_opens_reasoning(self.tokenizer.decode(prompt_ids[-8:]))

    def prompt_ids(self, prompt: "str | list[int]", add_bos: bool = True) -> list[int]:
        """The token ids a prompt runs as: a text prompt tokenized with bos in front where the
        tokenizer adds one (`Tokenizer.encode_prompt`; `add_bos=False`: as it is, for a chat
        template's text, which writes bos itself), token ids as given. Raises
        NanoseekError for an empty prompt or ids outside the vocabulary, and ContextLengthError when
        no token would fit after it. Pure: safe from any thread."""
        if isinstance(prompt, str):
            if not prompt:
                raise NanoseekError("empty prompt: give at least one token")
            if self.tokenizer is None:
                raise NanoseekError("this engine has no tokenizer: pass prompts as token-id lists")
            self._check_prefix(prompt, add_bos)
            ids = self.tokenizer.encode_prompt(prompt) if add_bos else self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise NanoseekError("empty prompt: give at least one token")
            vocab = self.model.config.vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
                raise NanoseekError(f"prompt token ids must be integers in [0, {vocab})")
            ids = list(prompt)
        else:
            raise NanoseekError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(f"prompt has {len(ids)} tokens, but the context holds {self.max_model_len} "
                                     "(prompt and at least one generated token); shorten the prompt",
                                     tokens=len(ids), limit=self.max_model_len)
        return ids

    def _check_prefix(self, text: str, add_bos: bool) -> None:
        """Refuse a text far longer than the context from a prefix, before tokenizing all of it:
        tokenizing takes about a second per 2 MB, and the server does it on its event loop, so a
        10 MB prompt stalled every other request for 7 s only to be refused. A text's tokens are at
        least its prefix's (give or take one at the cut, far from the limit here)."""
        cut = PREFIX_CHARS_PER_TOKEN * self.max_model_len
        if len(text) <= cut:
            return
        prefix = text[:cut]
        n = len(self.tokenizer.encode_prompt(prefix) if add_bos else self.tokenizer.encode(prefix))
        if n >= self.max_model_len:
            raise ContextLengthError(f"prompt has at least {n} tokens (its first {cut:,} of {len(text):,} "
                                     f"characters alone), but the context holds {self.max_model_len} (prompt and "
                                     "at least one generated token); shorten the prompt", tokens=n,
                                     limit=self.max_model_len)

    def _enqueue(self, text, ids, params, request_id) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._request_counter)}"
        req = Request(request_id, text, ids, params)
        in_reasoning = params.constrained and self._opens_reasoning(ids)
        for i in range(params.n):
            # on the model's device: on a GPU the noise of a batch of 256 x 32k vocabulary drawn on the
            # host took longer than the graphed decode step it follows
            generator = torch.Generator(self.runner.device)
            # sample 0 of seed s is the n=1 sample of seed s; unseeded requests draw from torch's RNG
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
            generator.manual_seed(seed if i == 0 else hash((seed, i)) & (2**63 - 1))
            seq = Sequence(next(self._seq_counter), req, i, generator)
            if params.constrained:
                seq.guide = guide_factory(self.tokenizer).guide(params.json_schema, params.regex)
                seq.guide_active = not in_reasoning
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self._stats["prompt_tokens"] += len(ids)
        return request_id

    # ------------------------------------------------------------- the loop

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Run the model in eval mode (an RL trainer's model is in training mode: no MoE load
        counting or balance loss here), and give it back in the mode it was in. Switching walks
        every module (about 1 ms for the 1.4M reasoning model, as long as a decode step of 128
        sequences), so generate() switches once for its whole loop, not once per step."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    def _step(self) -> list[Request]:
        """Schedule and run one forward (the model in eval mode: see `_eval_mode`); returns the
        requests that changed, finished ones removed."""
        with torch.inference_mode():
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs:
                return []
            if is_prefill or not self.speculative_mtp or len(seqs) > self.speculative_max_batch:
                self._plain_step(seqs, is_prefill)
            else:
                self._speculative_step(seqs)
        changed = list({id(s.request): s.request for s in seqs}.values())
        for seq in seqs:
            if not seq.finished:
                self.block_manager.register_full_blocks(seq, seq.num_computed)
        for req in changed:
            if req.finished:
                self.requests.pop(req.request_id, None)
        return changed

    def _plain_step(self, seqs: list[Sequence], is_prefill: bool) -> None:
        """Compute every sequence's uncached tokens (a prompt, or the last sampled token) and
        sample one token each from the last position."""
        starts = [s.num_computed for s in seqs]
        if is_prefill:
            for s in seqs:
                if s.num_cached_tokens is None:  # first admission (not a recompute)
                    s.num_cached_tokens = s.num_computed
                    self._stats["prefix_cache_hit_tokens"] += s.num_computed
        tokens = [s.token_ids[s.num_computed:] for s in seqs]
        hidden = self.runner.forward(seqs, tokens, starts)  # (B, T, D)
        lengths = torch.tensor([len(t) for t in tokens])
        last = hidden[torch.arange(len(seqs)), lengths - 1]  # (B, D)
        logits = self.model.lm_head(last)  # (B, V)
        ids, logprobs = self.sampler(logits, seqs)
        for i, s in enumerate(seqs):
            s.num_computed = len(s)
            if self.speculative_mtp:
                # These positions' MTP-cache entries wait for the next speculative step, which
                # needs their hidden states: kept as (this forward's hidden, row, count) and sliced
                # only then, so that a decode step with speculation off (batch too large) costs no
                # tensor op per sequence. The deque keeps the latest MAX_PENDING_MTP forwards:
                # older positions then keep stale MTP-cache entries, which can only cost draft
                # acceptance, never correctness.
                s.mtp_last = None
                s.mtp_pending.append((hidden, i, len(tokens[i])))
            self._append(s, ids[i], None if logprobs is None else logprobs[i])

    def _speculative_step(self, seqs: list[Sequence]) -> None:
        """Draft k tokens per sequence with the MTP module, verify them in one main forward, then
        run the MTP module once over the verified positions: what the next step drafts from."""
        k = self.speculative_mtp
        behind = [s for s in seqs if s.mtp_last is None]
        if behind:  # after a prefill or plain decode steps
            self._mtp_catch_up(behind)
        # 1. draft: the MTP state at each sequence's last computed position gives draft 1; chain
        # the rest, each from the MTP's own hidden state and the draft before, one position on
        sampled = [i for i, s in enumerate(seqs) if s.can_speculate() and not s.params.greedy]
        all_sampled = len(sampled) == len(seqs)  # the usual sampling batch: no row gathers then
        rows = slice(None) if all_sampled else sampled
        h = torch.stack([s.mtp_last[0] for s in seqs])  # (B, D)
        logits = torch.stack([s.mtp_last[1] for s in seqs])  # (B, V)
        drafts, draft_probs = [], []  # per draft: ids (B,), and (len(sampled), V) the sampled ones were drawn from
        for j in range(k):
            if j:
                positions = self.runner.prepare(seqs, [s.num_computed + j - 1 for s in seqs], [1] * len(seqs))
                h, logits = self.runner.mtp_forward(h.unsqueeze(1), drafts[-1].unsqueeze(1), positions)
            if sampled:
                q = self.sampler.probs(logits[rows].float(), [seqs[i].params for i in sampled])
                draft_probs.append(q)
                picked = draw(q, [seqs[i].generator for i in sampled])
                if all_sampled:
                    ids = picked
                else:
                    ids = logits.argmax(dim=-1)
                    ids[sampled] = picked
            else:
                ids = logits.argmax(dim=-1)
            drafts.append(ids)
        draft_ids = torch.stack(drafts, dim=1)  # (B, k)
        draft_rows = draft_ids.tolist()
        # 2. verify: the pending token and the k drafts at positions n..n+k in one forward
        tokens = [[s.token_ids[-1]] + d for s, d in zip(seqs, draft_rows)]
        starts = [s.num_computed for s in seqs]
        hidden = self.runner.forward(seqs, tokens, starts)  # (B, k+1, D)
        positions = self.runner.positions
        logits = self.model.lm_head(hidden).float()  # (B, k+1, V)
        target = logits.argmax(dim=-1).tolist()  # (B, k+1)
        # greedy: keep drafts while they equal the main model's argmax; its next argmax is the bonus
        accepted = [next((j for j in range(k) if d[j] != t[j]), k) for d, t in zip(draft_rows, target)]
        new_tokens = [t[: a + 1] for t, a in zip(target, accepted)]
        if sampled:
            params = [seqs[i].params for i in sampled for _ in range(k + 1)]
            target_probs = self.sampler.probs(logits[rows].flatten(0, 1), params).view(len(sampled), k + 1, -1)
            kept, extra = speculative_accept(target_probs, torch.stack(draft_probs, dim=1), draft_ids[rows],
                                             [seqs[i].generator for i in sampled])
            for i, a, token in zip(sampled, kept, extra):
                accepted[i], new_tokens[i] = a, draft_rows[i][:a] + [token]
        plain = [i for i, s in enumerate(seqs) if not s.can_speculate()]  # penalties: no drafts
        if plain:
            ids, _ = self.sampler(logits[plain, 0], [seqs[i] for i in plain])
            for i, token in zip(plain, ids):
                accepted[i], new_tokens[i] = 0, [token]
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        for i, s in enumerate(seqs):
            if s.can_speculate():
                self._stats["spec_draft_tokens"] += k
                self._stats["spec_accepted_tokens"] += accepted[i]
            s.num_computed += 1 + accepted[i]
            for j, token in enumerate(new_tokens[i]):
                self._append(s, token, None if logprobs is None else logprobs[i, j])
                if s.finished:
                    break
        # 3. the MTP module over the verified positions n..n+accepted, now that the token after
        # each is known (the accepted drafts, then the new token), on the slots the verify forward
        # used: it writes their MTP-cache entries, and its row at n+accepted drafts the next step.
        # Rows past it (rejected drafts) write entries that the next step overwrites before any read.
        live = [i for i, s in enumerate(seqs) if not s.finished]
        if not live:
            return
        if len(live) < len(seqs):  # a finished sequence's blocks are freed: prepare the others' slots
            hidden = hidden[live]
            positions = self.runner.prepare([seqs[i] for i in live], [starts[i] for i in live], [k + 1] * len(live))
        next_ids = torch.tensor([new_tokens[i] + [0] * (k - accepted[i]) for i in live])  # (b, k+1)
        last = torch.tensor([accepted[i] for i in live])
        if self.runner.replayed is not None:  # the verify was a graph replay, and no sequence finished
            h, logits = self.runner.mtp_replay(next_ids, last)
        else:
            h, logits = self.runner.mtp_forward(hidden, next_ids, positions, last)
        for row, i in enumerate(live):
            seqs[i].mtp_last = (h[row], logits[row])

    def _mtp_catch_up(self, seqs: list[Sequence]) -> None:
        """Run the MTP module over the positions that plain forwards (a prefill, decode steps with
        speculation off) computed since its last run: the MTP-cache entry at position i needs the
        main model's hidden state at i and the token at i+1, known only once i+1 was sampled. The
        last row gives each sequence's MTP state for drafting."""
        rows = [torch.cat([h[i, :n] for h, i, n in s.mtp_pending]) for s in seqs]  # (P_i, D) each
        pending = [len(r) for r in rows]
        starts = [s.num_computed - p for s, p in zip(seqs, pending)]
        hidden = rows[0].new_zeros(len(seqs), max(pending), rows[0].shape[-1])  # (b, P, D)
        for i, r in enumerate(rows):
            hidden[i, : len(r)] = r
        P = max(pending)
        next_ids = torch.tensor([s.token_ids[st + 1: s.num_computed + 1] + [0] * (P - p)
                                 for s, st, p in zip(seqs, starts, pending)])  # (b, P)
        positions = self.runner.prepare(seqs, starts, pending)
        h, logits = self.runner.mtp_forward(hidden, next_ids, positions, torch.tensor(pending) - 1)
        for row, s in enumerate(seqs):
            s.mtp_pending.clear()
            s.mtp_last = (h[row], logits[row])

    # ------------------------------------------------------ tokens and text

    def _append(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> None:
        """Add a generated token and finish the sequence if it hits a stop condition."""
        seq.token_ids.append(token)
        self._stats["generation_tokens"] += 1
        p = seq.params
        if seq.logprobs is not None:
            record = top_logprobs(logprobs, token, p.logprobs)
            seq.logprobs.append(record)
            seq.cumulative_logprob += record["logprob"]
        if seq.guide is not None:
            self._advance_guide(seq, token)
        if (token in self.eos_ids and not p.ignore_eos) or (p.stop_token_ids and token in p.stop_token_ids):
            self._finish(seq, "stop", self._decode(seq, seq.output_ids[:-1]))
        elif p.stop:
            text = self._decode(seq, seq.output_ids)
            cut = min((i for i in (text.find(stop) for stop in p.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(seq, "stop", text[:cut])
        if not seq.finished and seq.guide_active and guide_complete(seq.guide, self.tokenizer.eos_id):
            self._finish(seq, "stop", None)  # the text matches and nothing may follow: as if eos came next
        if not seq.finished and (seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len):
            self._finish(seq, "length", None)

    def _advance_guide(self, seq: Sequence, token: int) -> None:
        """Move a constrained sequence's guide on by the token it sampled (the mask allowed it), or,
        while the sequence still reasons, start the guide at its </think>. eos is not a move:
        the guide allows it only where the text is complete, and the sequence stops there."""
        if not seq.guide_active:
            seq.guide_active = token == self.tokenizer.think_end_id
        elif token not in self.eos_ids:
            seq.guide.advance(token, return_tokens=False)

    def _finish(self, seq: Sequence, reason: str, text: str | None) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        seq.final_text = text

    def _decode(self, seq: Sequence, ids: list[int]) -> str:
        """Text of `ids`, a prefix of the sequence's output. The whole output so far comes from its
        incremental detokenizer (new tokens only); a shorter prefix (the text before a stop token)
        is decoded once, when the sequence finishes."""
        if self.tokenizer is None:
            return ""
        if len(ids) == seq.num_output_tokens and not seq.finished:
            detok = self._detokenizers.setdefault(seq.seq_id, IncrementalText(self.tokenizer,
                                                                              seq.params.skip_special_tokens))
            return detok.update(seq.output_ids)
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _text(self, seq: Sequence) -> str:
        """Output text so far. While running, an incomplete UTF-8 character at the end and any tail
        that could be the start of a stop string are held back, so streamed text only grows."""
        if seq.finished:
            self._detokenizers.pop(seq.seq_id, None)
            if seq.final_text is None:  # decoded in full once, when it finishes
                seq.final_text = self._decode(seq, seq.output_ids)
            return seq.final_text
        text = self._decode(seq, seq.output_ids)
        for stop in seq.params.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
        return text

    def _output(self, req: Request) -> RequestOutput:
        outputs = [CompletionOutput(index=s.index, text=self._text(s), token_ids=s.output_ids,
                                    finish_reason=s.finish_reason,
                                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                    cumulative_logprob=s.cumulative_logprob) for s in req.seqs]
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=list(req.prompt_ids),
                             outputs=outputs, finished=req.finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens or 0)


class IncrementalText:
    """A sequence's output text, extended by decoding only the tokens added since the last call.

    Decoding a token alone can differ from its part of the whole text: a multi-byte character
    split over tokens decodes to U+FFFD until its last byte arrives, and some decoders drop a
    leading space. So, as vLLM's detokenizer does, new tokens are decoded together with a few
    tokens before them, and the text grows by the difference, once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.text = ""
        self.prefix_offset = 0  # the context tokens start here
        self.read_offset = 0  # tokens before this are in self.text

    def update(self, ids: list[int]) -> str:
        if len(ids) > self.read_offset:
            decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=self.skip_special_tokens)
            before = decode(ids[self.prefix_offset: self.read_offset])
            after = decode(ids[self.prefix_offset:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return self.text
