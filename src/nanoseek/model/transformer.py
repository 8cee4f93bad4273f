"""The DeepSeek-V3 causal language model: embedding, MLA + (dense | MoE) blocks, norm, head, MTP.
With a config's index_* fields set it is DeepSeek-V3.2 (`DeepseekV32ForCausalLM`): every MLA, the
MTP modules' included, has a DSA indexer (model/attention.py) and caches its key; `set_dsa_mode`
turns on the indexer's training loss, returned with the labels' losses.

One class serves every stage: pretraining and RL call it without a cache (expanded attention),
the inference engine calls it with a latent cache (absorbed attention). Its state-dict keys are
those of Hugging Face `DeepseekV3ForCausalLM` (plus the MTP layers after the main ones), so
checkpoints move between nanoseek, transformers and vLLM without renaming.

The skeleton (block, stack, head, forward) is decoder.py's, shared with the dense students; what
is DeepSeek's is here: MLA and MoE in the block, YaRN RoPE, the MTP modules and their loss, and
the sequence-wise balance loss.

Shape legend: B batch, T positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA, LatentCache, latent_cache_dims
from nanoseek.model.attention_v4 import V4Attention
from nanoseek.model.decoder import CausalLM, DecoderBlock, DecoderStack, ModelOutput
from nanoseek.model.layers import MLP, RotaryEmbedding
from nanoseek.model.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy
from nanoseek.model.moe import Gate, MoE
from nanoseek.model.mtp import make_mtp_layer, mtp_block


class Block(DecoderBlock):
    """A DeepSeek-V3 decoder layer: MLA, then an MoE or (the first_k_dense_replace layers) a dense FFN.
    A DeepSeek-V4 one: V4's attention of the layer's type (attention_v4.py), then an MoE, hash-routed
    where mlp_layer_types says "hash_moe"."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        if config.is_v4:
            attention = V4Attention(config, layer_idx)
            ffn = MoE(config, hashed=config.mlp_layer_types[layer_idx] == "hash_moe")
        else:
            attention = MLA(config)
            ffn = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        super().__init__(config, attention, ffn, layer_idx)


class Transformer(CausalLM):
    """`DeepseekV3ForCausalLM`: call it with input_ids (B, T); returns a ModelOutput (see CausalLM).
    With labels it also returns the MTP loss, with aux_loss_alpha > 0 the balance loss and, for a
    V3.2 model after `set_dsa_mode("dense" | "sparse")`, the indexer's loss and recall.

    model.layers[:num_hidden_layers] are the main layers, the rest the MTP modules, so the keys
    read `model.layers.{L}` as in the released files.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers
        self.model = DecoderStack(config, [Block(config, i) for i in range(n)] + [
            make_mtp_layer(Block, config, n + k) for k in range(config.num_nextn_predict_layers)])
        if config.is_v4:  # V4's two RoPE tables: sliding-window layers and compressed ones
            self.model.rotary_emb = RotaryEmbedding(config, "main")
            self.model.compress_rotary_emb = RotaryEmbedding(config, "compress")
        else:
            self.model.rotary_emb = RotaryEmbedding(config)
        self.init_head()

    @property
    def cache_dims(self) -> tuple[int, int]:
        """Per token and layer, the widths of the two tensors a LatentCache stores: the latent
        (kv_lora_rank) and the key row, the rotary key (qk_rope_head_dim) plus, for a V3.2 model,
        the DSA indexer key (index_head_dim); for a V4 model its K=V row and its compressors'
        per-token projections (latent_cache_dims)."""
        return latent_cache_dims(self.config)

    def set_dsa_mode(self, mode: str | None) -> None:
        """How a V3.2 model's forwards without a cache treat the indexer (model/attention.py):
        None: top-k attention, no indexer loss (inference, and training with a frozen indexer);
        "dense": dense attention, the indexer's KL loss against it (DeepSeek's dense warm-up);
        "sparse": top-k attention, the KL loss on the selected tokens (sparse training)."""
        if mode not in (None, "dense", "sparse"):
            raise ValueError(f"dsa_mode {mode!r}: expected None, 'dense' or 'sparse'")
        if mode is not None and not self.config.sparse_attention:
            raise ValueError("dsa_mode is for a DeepSeek-V3.2 model (index_topk set)")
        for layer in self.model.layers:
            layer.self_attn.dsa_mode = mode

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Gate):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.hashed:
                module.reset_hash()

    def rope(self, positions: torch.Tensor):
        """cos/sin (B, T, R/2) at positions (B, T); for V4 a dict of its two tables, "main" and "compress",
        and "compress_at", the compress table itself (a cached forward's entries sit before `positions`)."""
        if self.config.is_v4:
            return {"main": self.model.rotary_emb(positions), "compress": self.model.compress_rotary_emb(positions),
                    "compress_at": self.model.compress_rotary_emb}
        return self.model.rotary_emb(positions)

    def extra_losses(self, out: ModelOutput, input_ids, labels, positions, rope, mask, token_mask=None,
                     mtp: bool = True) -> None:
        T = labels.shape[1]
        if mtp and len(self.mtp_layers) and T > len(self.mtp_layers):
            out.mtp_loss, out.mtp_loss_sum = self._mtp_loss(out.hidden, input_ids, labels, positions, rope, mask,
                                                            token_mask)
        if self.config.sparse_attention:  # the indexer's loss and recall, left by each MLA that ran (dsa_mode set)
            ran = list(self.layers) + (list(self.mtp_layers) if out.mtp_loss is not None else [])
            stats = [m.self_attn.indexer_stats for m in ran if m.self_attn.indexer_stats is not None]
            if stats:
                out.indexer_loss = torch.stack([loss for loss, _ in stats]).mean()
                out.indexer_recall = torch.stack([recall for _, recall in stats]).mean()
            for m in self.model.layers:
                m.self_attn.indexer_stats = None
        moes = [m.mlp for m in self.model.layers if isinstance(m.mlp, MoE)]
        balance = [moe.balance_loss for moe in moes if moe.balance_loss is not None]
        if balance and self.training:
            out.aux_loss = torch.stack(balance).sum()
            for moe in moes:
                moe.balance_loss = None

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    rope=None, cache: LatentCache | None = None, mask=None,
                    token_mask=None, logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (0-based): hidden (B, T, D) of the previous depth at positions i and
        next_ids (B, T) = tokens t_{i+depth+1} -> (its hidden (B, T, D), logits for t_{i+depth+2}),
        or with logits=False the head's input (B, T, D) in place of the logits (for the fused loss)."""
        layer = self.mtp_layers[depth]
        rope = self.rope(positions) if rope is None else rope
        h = mtp_block(layer, self.model.embed_tokens(next_ids), hidden, positions, rope, cache, mask, token_mask)
        head_input = layer.shared_head.norm(h)
        return h, self.lm_head(head_input) if logits else head_input

    def _mtp_loss(self, hidden, input_ids, labels, positions, rope, mask=None,
                  token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean over depths of the per-depth mean loss, and of the per-depth summed loss: SFT
        normalises that by the targets of the whole step, as its next-token loss).
        Depth k (1-based) at position i reads t_{i+k} = input_ids[i+k] and predicts labels[i+k].
        The input, not labels[i+k-1]: SFT's labels hide its prompt tokens (IGNORE_INDEX), which the
        MTP modules still read. Right-padded rows: position i is real when t_{i+k} is (token_mask[i+k])."""
        T = labels.shape[1]
        losses, sums, h = [], [], hidden
        for k in range(1, len(self.mtp_layers) + 1):
            n = T - k  # positions with a target at this depth
            ids = input_ids[:, k: k + n]
            h, head_out = self.mtp_forward(k - 1, h[:, :n], ids, positions[:, :n],
                                           rope=(rope[0][:, :n], rope[1][:, :n]),
                                           mask=None if mask is None else mask[..., :n, :n],
                                           token_mask=None if token_mask is None else token_mask[:, k: k + n],
                                           logits=not self.fused_loss)
            targets = labels[:, k: k + n]
            losses.append(linear_cross_entropy(head_out, self.lm_head.weight, targets) if self.fused_loss
                          else cross_entropy(head_out, targets))
            sums.append(losses[-1] * (targets != IGNORE_INDEX).sum())
        return torch.stack(losses).mean(), torch.stack(sums).mean()
