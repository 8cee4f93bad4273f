"""Runs the model on a batch of sequences over the paged latent cache.

The pool is one tensor (layers, slots, C + R): per token and layer, the normed latent (C =
kv_lora_rank values) next to the rotary key (R = qk_rope_head_dim values), i.e. MLA's
"576 values per token per layer" at V3 size. The MTP modules have their own layers in the pool
(index num_hidden_layers + depth), so speculation keeps its own cache too. The widths come from
`model.cache_dims`: a dense student (`nanoseek.model.dense`) stores its keys and values there instead.

A forward takes, per sequence, a run of new tokens starting at some position (a whole prompt, one
decode token, or a pending token plus speculative drafts), pads the runs to a common length T, and
hands the model a `PagedLatentCache` that knows where each new token is written and which slots
make up each sequence's past. Both are index tensors built from the block tables with tensor ops,
once per forward, and shared by every layer; padding tokens write to a scratch block that no
sequence owns, and the attention mask (visible iff s <= query position) hides every slot past a
sequence's own length.

Shape legend: B sequences, T new tokens (padded), S cached positions (padded), D hidden size,
C kv_lora_rank, R qk_rope_head_dim, V vocabulary.
"""

from __future__ import annotations

import torch

from nanoseek.inference.sequence import Sequence
from nanoseek.model.mtp import mtp_inputs
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
        """Write the new tokens' latent (B,T,C) and k_pe (B,T,R); return all of them, (B,S,C), (B,S,R)."""
        pool = self.pool[layer_idx]  # (slots, C+R)
        new = torch.cat([latent, k_pe], dim=-1).flatten(0, 1).to(pool.dtype)  # (B*T, C+R)
        pool.index_copy_(0, self.write_slots, new)
        B, S = self.read_slots.shape
        # (B, S, C+R). index_select on flat ids is ~8x faster on CPU than advanced indexing pool[ids]
        kv = pool.index_select(0, self.read_slots.flatten()).view(B, S, -1)
        return kv[..., : self.latent_dim], kv[..., self.latent_dim:]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        num_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        # one extra block at the end: the scratch block that padding tokens write to
        self.scratch_block = num_blocks
        self.cache = PagedLatentCache(num_layers, (num_blocks + 1) * block_size, *model.cache_dims, dtype, device)
        self._offsets = torch.arange(block_size, device=device)
        # looked up once: model.mtp_layers slices a ModuleList, building a new one per call
        self.mtp_layer = model.mtp_layers[0] if cfg.num_nextn_predict_layers else None
        self.positions: torch.Tensor | None = None  # (B, T) of the last prepare()

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        return block_size * layers * sum(model.cache_dims) * dtype.itemsize

    def prepare(self, seqs: list[Sequence], starts: list[int], lengths: list[int]) -> torch.Tensor:
        """Set the cache's write/read slots for runs of `lengths` new tokens at positions from
        `starts`; returns the positions (B, T), 0 for padding. Every forward until the next call
        uses these slots: the MTP run after a verify forward reuses the verify's."""
        dev, bs = self.device, self.block_size
        T = max(lengths)
        S = max(s + n for s, n in zip(starts, lengths))
        num_table = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [self.scratch_block] * (num_table - len(s.block_table))
                               for s in seqs], device=dev)  # (B, blocks)
        slots = (tables.unsqueeze(-1) * bs + self._offsets).flatten(1)  # (B, blocks*bs): slot of each position
        positions = torch.tensor(starts, device=dev).unsqueeze(1) + torch.arange(T, device=dev)  # (B, T)
        if min(lengths) < T:  # padding: position 0, written to the scratch block
            valid = torch.arange(T, device=dev) < torch.tensor(lengths, device=dev).unsqueeze(1)  # (B, T)
            positions = positions.masked_fill(~valid, 0)
            write = slots.gather(1, positions).masked_fill(~valid, self.scratch_block * bs)
        else:
            write = slots.gather(1, positions)
        self.cache.write_slots = write.flatten()
        self.cache.read_slots = slots[:, :S]
        self.positions = positions
        return positions

    def forward(self, seqs: list[Sequence], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Main model on tokens[i] at positions starts[i].. of each sequence -> hidden (B, T, D)
        (final-normed; rows past len(tokens[i]) are padding)."""
        lengths = [len(t) for t in tokens]
        positions = self.prepare(seqs, starts, lengths)
        T = max(lengths)
        ids = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=self.device)  # (B, T)
        return self.model(ids, positions, cache=self.cache, logits=False).hidden

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module 0 on the slots of the last `prepare`: hidden (B, T, D) of the main model (or
        of the previous draft step) at `positions` (B, T) and next_ids (B, T), the tokens one
        position ahead -> at row last[i] of each sequence (default: the last row) the MTP hidden
        (B, D) and its logits (B, V), which predict the token two positions ahead."""
        # Transformer.mtp_forward, with the head applied to one row per sequence (prefill runs are long)
        layer = self.mtp_layer
        x = mtp_inputs(layer, self.model.model.embed_tokens(next_ids.to(self.device)), hidden)
        h = layer(x, positions, self.model.rope(positions), self.cache)  # (B, T, D)
        h = h[:, -1] if last is None else h[torch.arange(len(h), device=self.device), last.to(self.device)]
        return h, self.model.lm_head(layer.shared_head.norm(h))
