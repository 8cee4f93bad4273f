"""The DeepSeek-V3 causal language model: embedding, MLA + (dense | MoE) blocks, norm, head, MTP.

One class serves every stage: pretraining and RL call it without a cache (expanded attention),
the inference engine calls it with a latent cache (absorbed attention). Its state-dict keys are
those of Hugging Face `DeepseekV3ForCausalLM` (plus the MTP layers after the main ones), so
checkpoints move between nanoseek, transformers and vLLM without renaming.

Shape legend: B batch, T positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA, LatentCache
from nanoseek.model.layers import MLP, RMSNorm, RotaryEmbedding
from nanoseek.model.moe import Gate, MoE
from nanoseek.model.mtp import make_mtp_layer, mtp_inputs

IGNORE_INDEX = -100


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is MoE or dense."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, rope, cache: LatentCache | None = None, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, self.layer_idx, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    """The decoder stack (HF's `model.` prefix). layers[:num_hidden_layers] are the main layers,
    the rest are the MTP modules, so the keys read `model.layers.{L}` as in the released files."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Block(config, i) for i in range(n)]
            + [make_mtp_layer(Block, config, n + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D) final-normed hidden state (the MTP modules' depth-0 input)
    loss: torch.Tensor | None = None  # next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths of their cross-entropies
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' sequence-wise balance losses


class Transformer(nn.Module):
    """`DeepseekV3ForCausalLM`: call it with input_ids (B, T); returns a ModelOutput.

    positions default to 0..T-1 per row. With `labels` (B, T) (the next token at each position,
    IGNORE_INDEX where there is none) it also returns the losses, MTP included. With a `cache`
    it writes the new tokens' latents and attends to everything cached (inference engine).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":  # on meta (counting, loading) there is nothing to init
            self.apply(self._init_weights)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.model.layers[self.config.num_hidden_layers:]

    @property
    def cache_dims(self) -> tuple[int, int]:
        """Per token and layer, the widths of the two tensors a LatentCache stores: the latent
        (kv_lora_rank) and the rotary key (qk_rope_head_dim). Dense students store keys and values."""
        return self.config.kv_lora_rank, self.config.qk_rope_head_dim

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        # residual-branch outputs shrink with depth so the residual stream starts near unit scale
        for name in ("o_proj", "down_proj"):
            proj = getattr(module, name, None)
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary_emb(positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, labels: torch.Tensor | None = None,
                logits: bool = True, documents: torch.Tensor | None = None) -> ModelOutput:
        """documents (B, T): for rows packed with several documents, the index of each token's
        document; attention then stays inside a document and positions restart at each one."""
        B, T = input_ids.shape
        mask = None
        if documents is not None:
            positions, mask = document_layout(documents)
        elif positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        rope = self.rope(positions)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, positions, rope, cache, mask)
        hidden = self.model.norm(x)
        out = ModelOutput(logits=self.lm_head(hidden) if logits or labels is not None else None, hidden=hidden)
        if labels is not None:
            out.loss = cross_entropy(out.logits, labels)
            if len(self.mtp_layers) and T > len(self.mtp_layers):
                out.mtp_loss = self._mtp_loss(hidden, labels, positions, rope, mask)
            balance = [m.mlp.balance_loss for m in self.model.layers
                       if isinstance(m.mlp, MoE) and m.mlp.balance_loss is not None]
            if balance and self.training:
                out.aux_loss = torch.stack(balance).sum()
                for m in self.model.layers:
                    if isinstance(m.mlp, MoE):
                        m.mlp.balance_loss = None
        return out

    def mtp_forward(self, depth: int, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    rope=None, cache: LatentCache | None = None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` (0-based): hidden (B, T, D) of the previous depth at positions i and
        next_ids (B, T) = tokens t_{i+depth+1} -> (its hidden (B, T, D), logits for t_{i+depth+2})."""
        layer = self.mtp_layers[depth]
        rope = self.rope(positions) if rope is None else rope
        x = mtp_inputs(layer, self.model.embed_tokens(next_ids), hidden)
        h = layer(x, positions, rope, cache, mask)
        return h, self.lm_head(layer.shared_head.norm(h))

    def _mtp_loss(self, hidden, labels, positions, rope, mask=None) -> torch.Tensor:
        """Depth k (1-based) at position i reads t_{i+k} = labels[i+k-1] and predicts labels[i+k]."""
        T = labels.shape[1]
        losses, h = [], hidden
        for k in range(1, len(self.mtp_layers) + 1):
            n = T - k  # positions with a target at this depth
            ids = labels[:, k - 1: k - 1 + n].clamp(min=0)  # padding positions carry no target anyway
            h, logits = self.mtp_forward(k - 1, h[:, :n], ids, positions[:, :n],
                                         rope=(rope[0][:, :n], rope[1][:, :n]),
                                         mask=None if mask is None else mask[..., :n, :n])
            losses.append(cross_entropy(logits, labels[:, k: k + n]))
        return torch.stack(losses).mean()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n


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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over positions whose label is not IGNORE_INDEX; computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
