"""Dense decoder students in Hugging Face Llama / Qwen2 format (the R1-Distill architecture).

DeepSeek distils R1 into off-the-shelf dense models (Qwen2.5, Llama-3); a nanoseek student is
such a model, small: GQA attention with rotary embeddings in HF Llama's half-split layout
(`rotate_half`: dims j and j + d/2 form a pair, unlike the interleaved pairs of the released
DeepSeek weights; plain, or with Llama 3.1's "llama3" frequency scaling, which R1-Distill-Llama
uses), SwiGLU, RMSNorm, and q/k/v biases for Qwen2. Its checkpoint directory is a
valid `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoint (config.json model_type "llama" or
"qwen2"), and HF Llama / Qwen2 checkpoints load into it.

`DenseTransformer` is the DeepSeek-V3 `Transformer`'s skeleton (decoder.py: block, stack, head,
forward) around other parts, so the trainers, eval and the inference engine use either without
knowing which: `forward(input_ids, positions, cache, labels) -> ModelOutput`,
`config.num_nextn_predict_layers == 0` (no MTP), `lm_head`, `model.embed_tokens`, `model.layers`,
and `cache_dims`. With a cache (a `KVCache`), each layer stores its rotated keys and its values
(K * head_dim values each per token) through the same two-tensor `update` call MLA's
`LatentCache` takes for its latent and rotary key, so the engine's paged cache serves both.

Shape legend: B batch, T query positions, S cached positions, H query heads, K key/value heads,
d head_dim, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import HFConfig
from nanoseek.errors import ConfigError
from nanoseek.model.decoder import CausalLM, DecoderBlock, DecoderStack
from nanoseek.model.layers import MLP, apply_rope

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class DenseConfig(HFConfig):
    """A Llama / Qwen2 decoder, with HF `LlamaConfig` / `Qwen2Config` field names."""

    model_type: str = "llama"  # "llama" or "qwen2": the HF architecture the checkpoint declares
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: query heads share K/V heads in groups of H / K
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    # None: plain RoPE. Llama 3.1's long-context scaling (R1-Distill-Llama): {"rope_type": "llama3",
    # "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama only: biases on q, k, v and o (Qwen2 always biases q, k, v)
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        sizes = (self.hidden_size, self.num_attention_heads)
        if self.head_dim is None and all(isinstance(v, int) and v > 0 for v in sizes):  # else validate names it
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ---------------------------------------------------------------- derived

    @property
    def num_nextn_predict_layers(self) -> int:
        """No multi-token prediction modules: the trainers and the engine skip MTP."""
        return 0

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    def validate(self) -> None:
        def bad(name, why):
            raise ConfigError(f"invalid config field {name}={getattr(self, name)!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"dense students are one of {sorted(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        self.check_number_fields()
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            bad("head_dim", "rotary dims come in pairs, so it must be even")
        if self.hidden_act != "silu":
            bad("hidden_act", 'only "silu" (SwiGLU) is supported')
        if self.model_type == "qwen2" and self.attention_bias:
            bad("attention_bias", "Qwen2 has fixed biases (q, k, v yes, o no); use model_type=llama for o_proj bias")
        if self.rope_scaling is not None:
            if self.rope_scaling.get("rope_type") != "llama3":
                bad("rope_scaling", 'dense models support plain RoPE and "llama3" scaling only')
            missing = [k for k in LLAMA3_ROPE_KEYS if not isinstance(self.rope_scaling.get(k), (int, float))]
            if missing:
                bad("rope_scaling", f"llama3 scaling needs numbers for {missing}")
            if self.rope_scaling["high_freq_factor"] <= self.rope_scaling["low_freq_factor"]:
                bad("rope_scaling", "high_freq_factor must be above low_freq_factor")

    # -------------------------------------------------------- HF config.json

    # Keys of a Llama / Qwen2 config.json that carry no architecture nanoseek models (or that it
    # checks separately below) and are accepted silently.
    _IGNORED_KEYS = frozenset({
        "architectures", "transformers_version", "use_cache", "pretraining_tp", "dtype", "_name_or_path",
        "name_or_path", "rope_parameters", "rope_scaling", "mlp_bias", "use_sliding_window", "sliding_window",
        "max_window_layers", "layer_types", "return_dict", "output_hidden_states", "output_attentions",
        "tokenizer_class", "_attn_implementation_autoset", "id2label", "label2id", "problem_type",
        "chunk_size_feed_forward", "is_encoder_decoder", "num_nextn_predict_layers", "use_mrope",
    })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DenseConfig":
        """Read an HF Llama / Qwen2 config dict; unsupported features and unknown fields are errors."""
        d = dict(d)
        # transformers 5 writes rope_parameters (with rope_theta inside); older files rope_scaling
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope.pop("rope_theta"))
        rope_type = rope.pop("type", None) or rope.get("rope_type", "default")
        if rope_type == "llama3":
            d["rope_scaling"] = {"rope_type": "llama3", **{k: rope.get(k) for k in LLAMA3_ROPE_KEYS}}
        elif rope_type == "default":
            d["rope_scaling"] = None
        else:
            raise ConfigError(f"rope scaling {rope_type!r} is not supported: dense models have plain RoPE or "
                              f"Llama 3.1's \"llama3\" scaling")
        if d.get("use_mrope"):
            raise ConfigError("use_mrope=true (Qwen2-VL's multimodal RoPE) is not supported: text models only")
        if d.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported: student MLPs have no biases")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported: students attend to the whole context")
        if d.get("dtype") and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        return cls(**cls.known_fields(d))

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: loadable by transformers' LlamaConfig / Qwen2Config and by from_dict."""
        d = dataclasses.asdict(self)
        if self.model_type == "qwen2":
            del d["attention_bias"]  # not a Qwen2Config field: its biases are fixed
        if self.rope_scaling is None:
            del d["rope_scaling"]
        return {"architectures": [MODEL_TYPES[self.model_type]], **d, "use_cache": True}


# ------------------------------------------------------------------ presets

DENSE_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: ~35k parameters (at vocab 512), GQA with 2 query heads per K/V head.
    "student-tiny": dict(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    # The CPU distillation student: deeper and narrower than the `small` teacher, and under half
    # its main model (MTP module not counted) at any vocabulary: 2.48M of 5.81M parameters (43%)
    # at vocab 4096, 1.76M of 3.88M (45%) at the 331 ids of a BPE trained on synthetic text only.
    # Initialised at std 0.08 (about 1/sqrt(hidden)), as the `reasoning` preset: at HF's 0.02 the
    # warm-up on the reasoning corpus sat on a loss plateau (1.05) for 1,070 steps without learning the
    # worked chain's running sums (10% chain-forced); at 0.08 it leaves the plateau by step 200-300
    # (val loss 0.79, chain-forced 93-100%).
    "student-small": dict(
        vocab_size=4096, hidden_size=192, intermediate_size=320, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.08,
    ),
}


def dense_preset(name: str, **overrides) -> DenseConfig:
    """A named student preset, with optional field overrides (e.g. model_type="qwen2")."""
    if name not in DENSE_PRESETS:
        raise ConfigError(f"unknown student preset {name!r}; available: {sorted(DENSE_PRESETS)}")
    return DenseConfig(**{**DENSE_PRESETS[name], **overrides})


# ------------------------------------------------------------------ model


def rope_inv_freq(config: DenseConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rotary frequencies (d/2,) in fp32: HF Llama's default, or with Llama 3.1's scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    if config.rope_scaling is None:
        return inv_freq
    # llama3: a rotation slower than the original context (wavelength > L / low_freq_factor) is
    # slowed by `factor`, one faster than L / high_freq_factor is kept, and the band between them
    # blends the two linearly in L / wavelength.
    rs = config.rope_scaling
    context_per_wavelength = rs["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
    keep = ((context_per_wavelength - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"]))
    keep = keep.clamp(0.0, 1.0)  # 0: slowed by factor, 1: unchanged
    return inv_freq * (keep + (1 - keep) / rs["factor"])


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T), inv_freq (d/2,) -> cos, sin (B, T, d/2) in fp32."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # (B, T, d/2)
    return freqs.cos(), freqs.sin()


class KVCache(Protocol):
    """Where a forward with a cache reads and writes each layer's keys and values.

    `update` stores the new tokens' rotated keys and values at their positions and returns every
    cached one of each sequence in position order, from position 0, padded to a common length S
    (MLA's `LatentCache` is the same call on latents)."""

    def update(self, layer_idx: int, positions: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T), keys and values (B, T, K*d) -> keys, values (B, S, K*d)."""
        ...


class GQAttention(nn.Module):
    """Grouped-query attention: H query heads, K key/value heads, query head h reads K/V head h // (H/K)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        D, H, K, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, d
        self.q_proj = nn.Linear(D, H * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, K * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, K * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=config.o_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: KVCache | None = None, layer_idx: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D), positions (B, T), rope = cos/sin (B, T, d/2) -> (B, T, D). `mask` (B, 1, T, T):
        attention allowed (packed documents); default causal."""
        B, T, _ = x.shape
        H, K, d = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, d), *rope, interleaved=False)
        k = apply_rope(self.k_proj(x).view(B, T, K, d), *rope, interleaved=False)
        v = self.v_proj(x).view(B, T, K, d)
        if cache is not None:  # the cache holds rotated keys and values: (B, S, K*d) each
            k_all, v_all = cache.update(layer_idx, positions, k.flatten(2), v.flatten(2))
            S = k_all.shape[1]
            k, v = k_all.view(B, S, K, d), v_all.view(B, S, K, d)
            mask = (torch.arange(S, device=x.device) <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S)
        k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)  # (B, S, H, d)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None)  # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DenseBlock(DecoderBlock):
    """A Llama / Qwen2 decoder layer: grouped-query attention, then SwiGLU."""

    def __init__(self, config: DenseConfig, layer_idx: int):
        attention = GQAttention(config)
        super().__init__(config, attention, MLP(config.hidden_size, config.intermediate_size), layer_idx)


class DenseTransformer(CausalLM):
    """`LlamaForCausalLM` / `Qwen2ForCausalLM`, called like `Transformer` (see CausalLM); it has no
    MTP modules and no balance loss, so mtp_loss and aux_loss stay None."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config, [DenseBlock(config, i) for i in range(config.num_hidden_layers)])
        self.init_head()

    @property
    def cache_dims(self) -> tuple[int, int]:
        """Per token and layer, the widths of the two tensors a KVCache stores: keys and values."""
        width = self.config.num_key_value_heads * self.config.head_dim
        return width, width

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, rope_inv_freq(self.config, positions.device))
