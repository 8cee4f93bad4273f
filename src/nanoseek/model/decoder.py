"""The decoder skeleton both model families share: block, stack, head, forward, losses.

A DeepSeek-V3 `Transformer` (transformer.py) and a Llama / Qwen2 `DenseTransformer` (dense.py) are
the same causal LM around different parts: a pre-norm block of (attention, feed-forward), a stack
of them under HF's `model.` prefix, a final norm and an output head (optionally tied to the
embedding). What differs, and all that differs, is in their own files: MLA vs grouped-query
attention, MoE vs a dense FFN, YaRN interleaved RoPE vs Llama's half-split RoPE, and V3's MTP
modules and balance loss (`CausalLM.extra_losses`).

The residual around each sub-block is a plain sum, or, with a config's `hc_mult` set,
DeepSeek-V4's hyper-connections (hyper.py): n residual streams (B, T, n, D) that the block
collapses into each sub-block's input and updates with its output (`residual`).

Packed training rows (`documents=`) live here too, used by both. The losses are loss.py's; with
`fused_loss` set (the recipes' `fused_loss=true`) and `logits=False` the head is fused into the loss
(`linear_cross_entropy`), so a training step never holds the full (B, T, V) logits.

Shape legend: B batch, T positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nanoseek.model.hyper import HyperConnection, HyperHead, expand_streams, hc_mult
from nanoseek.model.layers import RMSNorm
from nanoseek.model.loss import cross_entropy, linear_cross_entropy
from nanoseek.model.moe import MoE


class DecoderBlock(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)). `cache` is the model's
    per-layer cache (MLA: LatentCache; dense: KVCache), passed through to the attention.
    With mHC (config.hc_mult) x is the residual streams (B, T, n, D), and attn_hc / ffn_hc make
    each residual sum (hyper.py); otherwise they are None and x is (B, T, D)."""

    def __init__(self, config, attention: nn.Module, mlp: nn.Module, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp
        self.attn_hc = HyperConnection(config) if hc_mult(config) else None
        self.ffn_hc = HyperConnection(config) if hc_mult(config) else None

    def forward(self, x, positions, rope, cache=None, mask=None, token_mask=None, input_ids=None) -> torch.Tensor:
        """token_mask (B, T) bool: the real tokens of a padded batch, for an MoE's load statistics.
        input_ids (B, T): the tokens, which route a DeepSeek-V4 hash-routed MoE."""
        def attention(h):  # (B, T, D) -> (B, T, D)
            return self.self_attn(self.input_layernorm(h), positions, rope, cache, self.layer_idx, mask)

        def ffn(h):  # (B, T, D) -> (B, T, D)
            h = self.post_attention_layernorm(h)
            return self.mlp(h, token_mask, input_ids) if isinstance(self.mlp, MoE) else self.mlp(h)

        x = residual(self.attn_hc, x, attention)
        return residual(self.ffn_hc, x, ffn)


def residual(hc: HyperConnection | None, x: torch.Tensor, sublayer) -> torch.Tensor:
    """x + sublayer(x), or with mHC the hyper-connection's update of the streams x (B, T, n, D)."""
    return x + sublayer(x) if hc is None else hc(x, sublayer)


class DecoderStack(nn.Module):
    """HF's `model.` prefix: the embedding, the layers (V3 appends its MTP modules), the final norm,
    and with mHC the head that collapses the residual streams before it (None without)."""

    def __init__(self, config, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hc_head = HyperHead(config) if hc_mult(config) else None


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D) final-normed hidden state (the MTP modules' depth-0 input)
    loss: torch.Tensor | None = None  # next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths of their cross-entropies
    mtp_loss_sum: torch.Tensor | None = None  # the same over depths of their summed (not mean) losses
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' sequence-wise balance losses
    indexer_loss: torch.Tensor | None = None  # DSA: mean over layers of the indexer's KL loss (dsa_mode set)
    indexer_recall: torch.Tensor | None = None  # DSA: mean over layers of the attention mass on the top-k


class CausalLM(nn.Module):
    """`...ForCausalLM`: call it with input_ids (B, T); returns a ModelOutput.

    positions default to 0..T-1 per row. With `labels` (B, T) (the next token at each position,
    IGNORE_INDEX where there is none) it also returns the losses; with `fused_loss` set, `logits=False`
    then computes the loss without the (B, T, V) logits (loss.py) and returns none. With a `cache` it
    writes the new tokens' entries and attends to everything cached (inference engine). A subclass builds
    `self.model` (a DecoderStack) before calling `init_head()`, and supplies `rope(positions)`.
    """

    # Activation checkpointing (the training recipes' `activation_checkpointing`): keep only each main
    # layer's input in the forward and recompute its activations in the backward, about a third more
    # compute for a fraction of the activation memory (torchtitan's "full" mode, HF's gradient checkpointing).
    activation_checkpointing = False
    # The head fused into the loss (the recipes' `fused_loss`; loss.py): a forward with labels and
    # logits=False never holds the (B, T, V) logits; one more head-sized matmul in the backward.
    fused_loss = False

    def init_head(self) -> None:
        config = self.config
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":  # on meta (counting, loading) there is nothing to init
            self.apply(self._init_weights)

    @property
    def layers(self) -> nn.ModuleList:
        """The main decoder layers (V3's MTP modules follow them in model.layers)."""
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.model.layers[self.config.num_hidden_layers:]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, (HyperConnection, HyperHead)):
            module.reset_parameters(std)
        # residual-branch outputs shrink with depth so the residual stream starts near unit scale
        for name in ("o_proj", "o_b_proj", "down_proj"):
            proj = getattr(module, name, None)
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                labels: torch.Tensor | None = None, logits: bool = True,
                documents: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                mtp: bool = True) -> ModelOutput:
        """documents (B, T): for rows packed with several documents, the index of each token's
        document; attention then stays inside a document and positions restart at each one.
        token_mask (B, T) bool: False at the padding of a padded batch, which then counts in no
        MoE load statistics (the expert-bias update) or balance loss; None: every token is real.
        mtp=False: no MTP loss with the labels (a stage that leaves the MTP modules untrained
        saves their forward and backward, a third of a small V3's step)."""
        B, T = input_ids.shape
        mask = None
        if documents is not None:
            positions, mask = document_layout(documents)
        elif positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        rope = self.rope(positions)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if self.model.hc_head is not None:
            x = expand_streams(x, self.config.hc_mult)  # mHC: (B, T, n, D), n copies of the embedding
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # compiled, AOTAutograd recomputes inside the graph, where the MoE's count is a buffer
                # mutation applied once (and Dynamo accepts no context_fn but selective checkpointing's)
                contexts = {} if torch.compiler.is_compiling() else {"context_fn": _Recomputing(layer).contexts}
                x = checkpoint(layer, x, positions, rope, cache, mask, token_mask, input_ids, use_reentrant=False,
                               **contexts)
            else:
                x = layer(x, positions, rope, cache, mask, token_mask, input_ids)
        hidden = self.model.norm(x if self.model.hc_head is None else self.model.hc_head(x))
        fused = labels is not None and not logits and self.fused_loss
        out = ModelOutput(logits=None if fused or not (logits or labels is not None) else self.lm_head(hidden),
                          hidden=hidden)
        if labels is not None:
            out.loss = (linear_cross_entropy(hidden, self.lm_head.weight, labels) if fused
                        else cross_entropy(out.logits, labels))
            self.extra_losses(out, input_ids, labels, positions, rope, mask, token_mask, mtp)
        return out

    def extra_losses(self, out: ModelOutput, input_ids, labels, positions, rope, mask, token_mask=None,
                     mtp: bool = True) -> None:
        """Losses beyond next-token prediction, set on `out` (V3: MTP and the balance loss)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied head is counted once


class _Recomputing:
    """The backward's rerun of a checkpointed layer: its MoE must not count its tokens twice, and
    the indexer statistics a V3.2 attention leaves (dsa_mode set: the forward's were collected
    already) must not outlive it, holding their graph until the next forward.
    A class, not a generator, so that a second backward (retain_graph=True) can enter it again."""

    def __init__(self, layer: nn.Module):
        self.moe = layer.mlp if isinstance(layer.mlp, MoE) else None
        self.attention = layer.self_attn

    def contexts(self):
        return contextlib.nullcontext(), self

    def __enter__(self):
        if self.moe is not None:
            self.moe.recomputing = True

    def __exit__(self, *exc):
        if self.moe is not None:
            self.moe.recomputing = False
        if getattr(self.attention, "indexer_stats", None) is not None:
            self.attention.indexer_stats = None


def documents_of(input_ids: torch.Tensor, bos_id: int | None) -> torch.Tensor | None:
    """(B, T) document index of each token of packed rows whose documents start with bos
    (None without a bos id: the row is one sequence)."""
    return None if bos_id is None else (input_ids == bos_id).cumsum(dim=1)


def document_layout(documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """documents (B, T) of non-decreasing document indices -> positions (B, T) counted from each
    document's first token, and the attention mask (B, 1, T, T): causal and inside one document.

    Packed training rows hold several documents; without the mask a token also attends to the
    documents before it, a context inference never gives it (a prompt starts alone, at position 0).
    """
    T = documents.shape[1]
    index = torch.arange(T, device=documents.device)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) index of the document's first token
    same_document = documents.unsqueeze(2) == documents.unsqueeze(1)  # (B, T, T)
    mask = same_document & (index.unsqueeze(1) >= index.unsqueeze(0))
    return index - first, mask.unsqueeze(1)

