"""Building blocks shared by every layer: RMSNorm, YaRN rotary embeddings, the SwiGLU MLP.

Shape legend: B batch, T query positions, R rotary dims (qk_rope_head_dim), H heads, D model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / rms(x), normalised in fp32 and cast back before the weight (as HF does).

    Through F.rms_norm, one fused kernel forward and one backward where torch has them (CUDA,
    CPU), instead of six element-wise passes over the activations and their casts. It takes one
    dtype: a bf16 x with fp32 weights (a bf16 projection's output under autocast) is normalised
    in fp32, cast back, then weighted, HF's order."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # fp32 math throughout: exactly HF's result
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers, shared and routed experts.
    With `limit` (DeepSeek-V4's swiglu_limit) gate is clamped to <= limit and up to [-limit, limit]
    first, which bounds the activations of outlier tokens."""

    def __init__(self, dim: int, hidden: int, limit: float | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate = self.gate_proj(x).clamp(max=self.limit)
        return self.down_proj(F.silu(gate) * self.up_proj(x).clamp(-self.limit, self.limit))


# ------------------------------------------------------------------ rotary


def rope_inv_freq(config: ModelConfig, kind: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin magnitude factor, with YaRN when configured.

    YaRN keeps the high-frequency dims, divides the low-frequency ones by `factor`, and ramps
    linearly in between (DeepSeek-V3 §4.3; the same math as HF `_compute_yarn_parameters`).
    DeepSeek-V4 has two: `kind` "main" (its sliding-window layers: rope_theta, never scaled) and
    "compress" (its compressed layers and their compressors: compress_rope_theta, with YaRN).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    if kind == "compress":
        base = config.compress_rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = None if kind == "main" else config.yarn
    if kind == "compress" and yarn is not None:  # V4 does not scale cos/sin (DeepseekV4Config's default)
        yarn = {"attention_factor": 1.0, **yarn}
    if yarn is None:
        return inv_freq, 1.0
    factor = float(yarn["factor"])
    orig_len = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if yarn.get("attention_factor") is not None:
        attention_factor = float(yarn["attention_factor"])
    elif mscale and mscale_all:
        attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
    else:
        attention_factor = get_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by absolute position.

    The released DeepSeek weights rotate adjacent pairs (x[2j], x[2j+1]) of the rotary dims (the
    official code's complex multiply). HF's `rope_interleave=True` is the same rotation; with
    `rope_interleave=false` a checkpoint stores them half-split (`apply_rope(..., interleaved=False)`).
    """

    def __init__(self, config: ModelConfig, kind: str | None = None):
        super().__init__()
        self.kind = kind  # DeepSeek-V4's "main" or "compress" tables (rope_inv_freq), None otherwise
        inv_freq, self.attention_factor = rope_inv_freq(config, kind)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin each (B, T, R/2), fp32."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # (B, T, R/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate x (B, T, [H,] R) by cos/sin (B, T, R/2); fp32 math, x's dtype out. The pairs are
    adjacent dims (2j, 2j+1) when `interleaved` (the released DeepSeek weights), else dims j and
    j + R/2 (HF Llama's rotate_half: the dense models, and DeepSeek configs with rope_interleave=false)."""
    if x.dim() == 4:  # per-head rotary part: broadcast over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleaved:
        pairs = x.float().unflatten(-1, (-1, 2))  # (..., R/2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    x0, x1 = x.float().chunk(2, dim=-1)  # (..., R/2) each
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).to(x.dtype)
