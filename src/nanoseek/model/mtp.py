"""Multi-token prediction (DeepSeek-V3 §2.2).

MTP module k (k = 1..D) extends the main model's prediction one more token into the future. At
position i it combines the previous depth's hidden state h^{k-1}_i with the embedding of token
t_{i+k}: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding first: the order the
released eh_proj expects), runs one decoder block on it, and predicts t_{i+k+1} through the shared
output head after its own norm. Depth 0 is the main model's final-normed hidden state, as vLLM and
HF feed it when drafting with the released weights.

Training adds lambda * mean_k CE_k to the loss. At inference the modules draft tokens for
speculative decoding. Checkpoints store module k as `model.layers.{num_hidden_layers + k - 1}.*`,
including copies of the shared embedding and head, exactly like the released V3 weights. A V3.2
model's MTP block is a V3.2 block: its attention has a DSA indexer (`self_attn.indexer.*`), as the
released V3.2 checkpoint's model.layers.61 holds (transformers drops the MTP layers on load).

With mHC (config.hc_mult = n) the MTP block is an mHC block, and the module keeps its (B, T, D)
interface: the eh_proj output is expanded to n equal streams (as the main model expands its
embedding), the block updates them, and the module's own HyperHead (`hc_head.*`, beside its
shared_head) collapses them to the hidden state the next depth and the head read. The main model's
state enters as it does without mHC, as its final-normed hidden state, already collapsed by the
main model's head: so depth k's input is always one (B, T, D) tensor, which the inference
engine's drafting passes around unchanged. (V4's released MTP layout may differ; transformers
drops V4's MTP weights, so there is no reference to match.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanoseek.config import ModelConfig
from nanoseek.model.hyper import HyperHead, expand_streams
from nanoseek.model.layers import RMSNorm


class SharedHead(nn.Module):
    """Holds only the MTP module's final norm; the head itself is the main model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def make_mtp_layer(block_cls, config: ModelConfig, layer_idx: int) -> nn.Module:
    """A decoder block (same structure as main layer `layer_idx`) plus the MTP projections.

    Built as one module so that its state-dict keys are exactly the released checkpoint's
    `model.layers.{L}.{enorm, hnorm, eh_proj, shared_head.norm, self_attn.*, mlp.*, ...}`
    (with mHC also `attn_hc.*`, `ffn_hc.*` and its own `hc_head.*`).
    """
    layer = block_cls(config, layer_idx)
    layer.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    layer.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    layer.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
    layer.shared_head = SharedHead(config)
    if config.hc_mult is not None:
        layer.hc_head = HyperHead(config)
    return layer


def mtp_inputs(layer: nn.Module, embedded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """embedded (B, T, D) of tokens t_{i+k}, hidden (B, T, D) of depth k-1 -> block input (B, T, D)."""
    return layer.eh_proj(torch.cat([layer.enorm(embedded), layer.hnorm(hidden)], dim=-1))


def mtp_block(layer: nn.Module, embedded: torch.Tensor, hidden: torch.Tensor, positions, rope, cache=None,
              mask=None, token_mask=None) -> torch.Tensor:
    """MTP module `layer` on embedded (B, T, D) of tokens t_{i+k} and hidden (B, T, D) of depth
    k-1 -> its hidden state (B, T, D), before the shared head's norm."""
    x = mtp_inputs(layer, embedded, hidden)
    if layer.attn_hc is None:
        return layer(x, positions, rope, cache, mask, token_mask)
    streams = expand_streams(x, layer.attn_hc.n)  # (B, T, n, D)
    return layer.hc_head(layer(streams, positions, rope, cache, mask, token_mask))
