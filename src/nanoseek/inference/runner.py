"""Runs the model on a batch of sequences over the paged latent cache.

The pool is one tensor (layers, slots, C + R): per token and layer, the normed latent (C =
kv_lora_rank values) next to the rotary key (R = qk_rope_head_dim values), i.e. MLA's
"576 values per token per layer" at V3 size. A DeepSeek-V3.2 model's rows carry its DSA indexer
key after the rotary key (R = qk_rope_head_dim + index_head_dim: 704 values at V3.2 size); MLA
splits them, so nothing here knows about it. The MTP modules have their own layers in the pool
(index num_hidden_layers + depth), so speculation keeps its own cache too. The widths come from
`model.cache_dims`: a dense student (`nanoseek.model.dense`) stores its keys and values there instead,
a DeepSeek-V4 model its K=V rows and its compressors' per-token projections (model/attention_v4.py;
its layers' rows differ in width, the pool has the widest and a narrower row fills the first columns).

A forward takes, per sequence, a run of new tokens starting at some position (a whole prompt, one
decode token, or a pending token plus speculative drafts), pads the runs to a common length T, and
hands the model a `PagedLatentCache` that knows where each new token is written and which slots
make up each sequence's past. Both are index tensors built from the block tables with tensor ops,
once per forward, and shared by every layer; padding tokens write to a scratch block that no
sequence owns, and the attention mask (visible iff s <= query position) hides every slot past a
sequence's own length.

CUDA graphs (vLLM's and nano-vllm's decode trick). On a GPU an eager decode step is bound by
launching its kernels, not by running them: at batch 64 the `gpu` preset launched 1,561 kernels
in 46 ms of CPU time for 13.8 ms of GPU time (H100, torch.profiler). So a forward whose runs all
have one short length T (a decode step, T = 1, or a speculative verify, T = k+1; never a prefill)
is recorded once as a CUDA graph per shape and replayed (5.4 ms a step at batch 64): a padded
batch size (1, 2, 4, 8, then multiples of 16 up to max_num_seqs), T, and a cache span S rounded
up to a power of two of blocks. Its inputs (token ids, positions, slots) live in static tensors
that each step overwrites with one host-to-device copy; padding rows write to the scratch block
and read nothing else. Graphs are captured when a shape is first met (tens of ms each) and share
one memory pool. Other forwards run eagerly. Capturing needs a forward with no host syncs and no
shapes that depend on data: the MoE's grouped-GEMM form (bf16 on CUDA) is one, its expert loop
is not, so a model with MoE replays graphs only where it computes in bf16: bf16 weights, or fp32
weights under bf16 autocast (RL's rollouts on the trainer's own weights). Under autocast a graph is
captured with autocast's weight cache off, so the casts of the weights are recorded in the graph
and each replay reads the weights as the optimizer has since updated them in place; graphs are
keyed by the autocast dtype too, so one captured under autocast never replays outside it.
A speculative verify graph gets a companion for the MTP module's run over the verified positions
(`mtp_replay`), which reads the verify's static hidden states and slots: at k = 1 a speculative
step is two replays. Chained drafts (k > 1) and the MTP catch-up after plain steps run eagerly.

Shape legend: B sequences, T new tokens (padded), S cached positions (padded), D hidden size,
C kv_lora_rank, R the key row's width (qk_rope_head_dim, + index_head_dim with DSA), V vocabulary.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from nanoseek.inference.sequence import Sequence
from nanoseek.model.mtp import mtp_block
from nanoseek.model.transformer import Transformer


class PagedLatentCache:
    """The `LatentCache` the model sees during an engine forward (see model/attention.py)."""

    def __init__(self, num_layers: int, num_slots: int, latent_dim: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.latent_dim = latent_dim
        self.pool = torch.zeros(num_layers, num_slots, latent_dim + rope_dim, dtype=dtype, device=device)
        self.write_slots: torch.Tensor | None = None  # (B*T,) slot of each new token
        self.read_slots: torch.Tensor | None = None  # (B, S) slot of each sequence's positions 0..S-1

    def update(self, layer_idx, positions, latent, k_pe):
        """Write the new tokens' latent (B,T,C) and k_pe (B,T,R); return all of them, (B,S,C), (B,S,R).
        A narrower row (a DeepSeek-V4 layer's) fills the pool's first C+R columns."""
        pool = self.pool[layer_idx]  # (slots, C+R)
        new = torch.cat([latent, k_pe], dim=-1).flatten(0, 1).to(pool.dtype)  # (B*T, C+R)
        if new.shape[-1] < pool.shape[-1]:
            pool = pool[:, : new.shape[-1]]
        pool.index_copy_(0, self.write_slots, new)
        B, S = self.read_slots.shape
        # (B, S, C+R). index_select on flat ids is ~8x faster on CPU than advanced indexing pool[ids]
        kv = pool.index_select(0, self.read_slots.flatten()).view(B, S, -1)
        return kv[..., : self.latent_dim], kv[..., self.latent_dim:]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, cuda_graphs: bool = False, max_num_seqs: int = 64,
                 graph_tokens: int = 1, graphs_need_bf16: bool = False):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        num_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        # one extra block at the end: the scratch block that padding tokens write to
        self.scratch_block = num_blocks
        self.cache = PagedLatentCache(num_layers, (num_blocks + 1) * block_size, *model.cache_dims, dtype, device)
        self._offsets = torch.arange(block_size)
        # looked up once: model.mtp_layers slices a ModuleList, building a new one per call
        self.mtp_layer = model.mtp_layers[0] if cfg.num_nextn_predict_layers else None
        self.positions: torch.Tensor | None = None  # (B, T) of the last prepare()
        self.replayed: DecodeGraph | None = None  # the graph of the last forward, when it was one
        self.cuda_graphs = cuda_graphs
        self.graphs_need_bf16 = graphs_need_bf16  # MoE: only its bf16 grouped GEMMs are free of host syncs
        self.graph_tokens = graph_tokens  # the longest run a graph is captured for: 1 + speculative drafts
        # the padded batch sizes graphs are captured at (nano-vllm's choice)
        self.graph_batch_sizes = sorted({b for b in (1, 2, 4, 8) if b < max_num_seqs}
                                        | set(range(16, max_num_seqs, 16)) | {max_num_seqs})
        self.graphs: dict[tuple, DecodeGraph] = {}  # (rows, T, S, autocast dtype or None) -> its graph
        self.graph_pool = None  # the memory pool every graph shares
        self.capture_stream = None  # the stream every capture runs on (one, as pool sharing wants)

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        return block_size * layers * sum(model.cache_dims) * dtype.itemsize

    def layout(self, seqs: list[Sequence], starts: list[int], lengths: list[int], rows: int | None = None,
               span: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where a forward's runs of `lengths` new tokens at positions from `starts` live in the
        cache, as CPU tensors: positions (rows, T) (0 for padding), the slot each new token is
        written to (rows*T,), and the slots of each sequence's positions 0..span-1 (rows, span).
        rows and span default to the batch and its longest context; extra rows are padding, and
        padding tokens write to the scratch block."""
        bs, scratch = self.block_size, self.scratch_block
        T = max(lengths)
        span = span or max(s + n for s, n in zip(starts, lengths))
        rows = rows or len(seqs)
        blocks = -(-span // bs)
        pad_rows = rows - len(seqs)
        tables = torch.tensor([s.block_table[:blocks] + [scratch] * (blocks - len(s.block_table)) for s in seqs]
                              + [[scratch] * blocks] * pad_rows)  # (rows, blocks)
        slots = (tables.unsqueeze(-1) * bs + self._offsets).flatten(1)  # (rows, blocks*bs): slot of each position
        starts_t = torch.tensor(list(starts) + [0] * pad_rows).unsqueeze(1)
        positions = starts_t + torch.arange(T)  # (rows, T)
        if pad_rows or min(lengths) < T:  # padding: position 0, written to the scratch block
            valid = torch.arange(T) < torch.tensor(list(lengths) + [0] * pad_rows).unsqueeze(1)  # (rows, T)
            positions = positions.masked_fill(~valid, 0)
            write = slots.gather(1, positions).masked_fill(~valid, scratch * bs)
        else:
            write = slots.gather(1, positions)
        return positions, write.flatten(), slots[:, :span]

    def prepare(self, seqs: list[Sequence], starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Set the cache's write/read slots for runs of `lengths` new tokens at positions from
        `starts`; returns the positions (B, T), 0 for padding. Every forward until the next call
        uses these slots: the MTP run after a verify forward reuses the verify's."""
        positions, write, read = (t.to(self.device) for t in self.layout(seqs, starts, lengths))
        self.cache.write_slots, self.cache.read_slots, self.positions = write, read, positions
        self.replayed = None
        return positions

    def forward(self, seqs: list[Sequence], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Main model on tokens[i] at positions starts[i].. of each sequence -> hidden (B, T, D)
        (final-normed; rows past len(tokens[i]) are padding)."""
        lengths = [len(t) for t in tokens]
        T = max(lengths)
        if self.cuda_graphs and min(lengths) == T <= self.graph_tokens and len(seqs) <= self.graph_batch_sizes[-1]:
            amp = self._autocast_dtype()
            if not self.graphs_need_bf16 or (amp or self.cache.pool.dtype) == torch.bfloat16:
                try:
                    return self._replay(seqs, tokens, starts, amp)
                except CaptureError as e:  # a capture CUDA refused (nothing ran): go on eagerly
                    self._give_up_graphs(e)
        positions = self.prepare(seqs, starts, lengths)
        ids = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=self.device)  # (B, T)
        return self.model(ids, positions, cache=self.cache, logits=False).hidden

    def _autocast_dtype(self) -> torch.dtype | None:
        kind = torch.device(self.device).type
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

    def _replay(self, seqs: list[Sequence], tokens: list[list[int]], starts: list[int],
                amp: torch.dtype | None = None) -> torch.Tensor:
        """`forward` through the CUDA graph of its padded shape and autocast dtype `amp` (captured on
        first use)."""
        B, T = len(tokens), len(tokens[0])
        rows = next(b for b in self.graph_batch_sizes if b >= B)
        blocks = -(-(max(starts) + T) // self.block_size)
        span = (1 << (blocks - 1).bit_length()) * self.block_size  # blocks rounded up to a power of two
        graph = self.graphs.get((rows, T, span, amp)) or self._capture(rows, T, span, amp)
        positions, write, read = self.layout(seqs, starts, [T] * B, rows, span)
        ids = torch.tensor(tokens + [[0] * T] * (rows - B))  # (rows, T)
        graph.inputs.copy_(torch.cat([ids.flatten(), positions.flatten(), write, read.flatten()]))
        graph.graph.replay()
        # what `prepare` leaves behind, for an MTP run on the same slots
        self.cache.write_slots, self.cache.read_slots = graph.write[: B * T], graph.read[:B]
        self.positions, self.replayed = graph.positions[:B], graph
        return graph.hidden[:B].clone()  # the static output is overwritten by the next replay

    def _capture(self, rows: int, T: int, span: int, amp: torch.dtype | None) -> "DecodeGraph":
        graph = DecodeGraph(rows, T, span, self.device)
        graph.amp = amp
        # the static inputs start as padding: every row writes to the scratch block and reads it
        graph.write.fill_(self.scratch_block * self.block_size)
        graph.read.fill_(self.scratch_block * self.block_size)

        def run() -> torch.Tensor:
            self.cache.write_slots, self.cache.read_slots = graph.write, graph.read
            return self.model(graph.ids, graph.positions, cache=self.cache, logits=False).hidden

        graph.graph, graph.hidden = self._capture_run(run, amp)  # its warm-up writes the scratch block only
        self.graphs[rows, T, span, amp] = graph
        return graph

    def _capture_run(self, run, amp: torch.dtype | None):
        """`_record` under the autocast the graph is for. Autocast's cache would hand the capture
        bf16 copies of the weights made outside it, which it frees on exit: with it off, the casts
        are part of the graph and read the live weights."""
        kind = torch.device(self.device).type
        try:
            with torch.autocast(kind, dtype=amp, cache_enabled=False) if amp else nullcontext():
                return self._record(run)
        except RuntimeError as e:
            # a sync inside the capture raises, then capture_end raises "operation failed due to a
            # previous error during capture" with the first error as its context: name the first
            cause = e.__context__ if isinstance(e.__context__, RuntimeError) else e
            raise CaptureError(f"CUDA graph capture failed ({str(cause).splitlines()[0]})") from e

    def _record(self, run):
        """Capture `run` (a forward on static inputs) -> (the CUDA graph, the static outputs it rewrites).

        The warm-up runs with torch's sync debug mode on "error": a host sync (a `.cpu()`, `.tolist()`,
        a D2H copy, e.g. F.grouped_mm's fallback off sm90/sm100) raises there, before the capture
        begins. Inside a capture it would also raise, but torch.cuda.graph's exit then fails in
        capture_end before ending the allocator's capture mode (endAllocateToPool), before leaving
        the capture stream, and (torch 2.4-era) before the default CUDA generator's capture
        epilogue: the process would go on half inside a capture."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)  # warm up off the capture (lazy initialisations, autotuning)
        side.wait_stream(current)
        debug_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                run()
        finally:
            torch.cuda.set_sync_debug_mode(debug_mode)
            current.wait_stream(side)
        if self.capture_stream is None:
            self.capture_stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        # the outer stream context gives the caller its stream back even when the graph's exit raises
        with torch.cuda.stream(self.capture_stream), \
                torch.cuda.graph(graph, pool=self.graph_pool, stream=self.capture_stream):
            outputs = run()
        self.graph_pool = graph.pool()
        return graph, outputs

    def _give_up_graphs(self, error: CaptureError) -> None:
        """After a refused capture: decode eagerly from now on, and free the graphs and their pool."""
        self.cuda_graphs = False
        self.graphs.clear()
        self.graph_pool = self.replayed = None
        print(f"nanoseek: {error}; decoding eagerly from now on (enforce_eager=True skips the attempt)",
              file=sys.stderr)

    def mtp_replay(self, next_ids: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`mtp_forward` on the batch of the forward just replayed (`self.replayed`), through that
        graph's companion: it reads the forward's static hidden states, positions and slots, so a
        speculative step at k = 1 (V3's one MTP module) is two replays, verify and MTP, with no
        eager forward. next_ids (B, T), last (B,) as for mtp_forward."""
        graph = self.replayed
        B, (rows, T) = len(next_ids), graph.ids.shape
        inputs = torch.cat([next_ids.flatten(), next_ids.new_zeros((rows - B) * T), last, last.new_zeros(rows - B)])
        if graph.mtp is None:  # captured on first use, with this step's inputs: its warm-up writes what the replay does
            graph.mtp_inputs = inputs.to(self.device, copy=True)
            ids, rows_last = graph.mtp_inputs[: rows * T].view(rows, T), graph.mtp_inputs[rows * T:]

            def run() -> tuple[torch.Tensor, torch.Tensor]:
                self.cache.write_slots, self.cache.read_slots = graph.write, graph.read
                return self.mtp_forward(graph.hidden, ids, graph.positions, rows_last)

            try:
                graph.mtp, graph.mtp_outputs = self._capture_run(run, graph.amp)
            except CaptureError as e:  # the same MTP run, eagerly, on the verify's slots
                self._give_up_graphs(e)
                self.cache.write_slots, self.cache.read_slots = graph.write[: B * T], graph.read[:B]
                return self.mtp_forward(graph.hidden[:B], next_ids, graph.positions[:B], last)
        graph.mtp_inputs.copy_(inputs)
        graph.mtp.replay()
        h, logits = graph.mtp_outputs
        return h[:B].clone(), logits[:B].clone()

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module 0 on the slots of the last `prepare`: hidden (B, T, D) of the main model (or
        of the previous draft step) at `positions` (B, T) and next_ids (B, T), the tokens one
        position ahead -> at row last[i] of each sequence (default: the last row) the MTP hidden
        (B, D) and its logits (B, V), which predict the token two positions ahead."""
        # Transformer.mtp_forward, with the head applied to one row per sequence (prefill runs are long)
        layer = self.mtp_layer
        embedded = self.model.model.embed_tokens(next_ids.to(self.device))
        h = mtp_block(layer, embedded, hidden, positions, self.model.rope(positions), self.cache)  # (B, T, D)
        h = h[:, -1] if last is None else h[torch.arange(len(h), device=self.device), last.to(self.device)]
        return h, self.model.lm_head(layer.shared_head.norm(h))


class CaptureError(RuntimeError):
    """A forward that CUDA could not record as a graph."""


class DecodeGraph:
    """One captured forward: static inputs (one flat int64 tensor: token ids, positions, write
    slots, read slots, so that a step fills them with one copy) and the hidden state it writes."""

    def __init__(self, rows: int, T: int, span: int, device: torch.device | str):
        n = rows * T
        self.inputs = torch.zeros(3 * n + rows * span, dtype=torch.long, device=device)
        self.ids = self.inputs[:n].view(rows, T)
        self.positions = self.inputs[n: 2 * n].view(rows, T)
        self.write = self.inputs[2 * n: 3 * n]
        self.read = self.inputs[3 * n:].view(rows, span)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None  # (rows, T, D), rewritten by each replay
        self.amp: torch.dtype | None = None  # the autocast dtype it was captured under
        # the MTP module's run on this forward's hidden states (`ModelRunner.mtp_replay`)
        self.mtp: torch.cuda.CUDAGraph | None = None
        self.mtp_inputs: torch.Tensor | None = None  # next ids (rows*T), then the row each sequence drafts from (rows)
        self.mtp_outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, D), (rows, V)
