"""`nanoseek info`: what a model costs. Parameters (total and activated per token, MTP apart) and
KV-cache bytes per token for MLA's latent cache against the multi-head cache it replaces (a V3.2
model's cache also holds each token's DSA indexer key, index_head_dim values per layer: counted).
An mHC model's hyper-connection parameters are counted with its blocks and head (all active); its
residual streams are activations, not cache: the cache is MLA's as without mHC. A dense
Llama / Qwen2 checkpoint (a distilled student) has no experts and no MTP, and its cache is
grouped-query attention's keys and values, set against the same multi-head cache.

Counts come from blocks built on the meta device, so even V3's 671B parameters cost no memory.
With --model, the checkpoint's stored formats are listed too (bf16, fp32, FP8 with its scales,
DeepSeek-V4's FP4 experts; from the safetensors headers, nothing else read).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import ModelConfig, preset
from nanoseek.errors import NanoseekError
from nanoseek.model.dense import DenseConfig
from nanoseek.train.checkpointing import checkpoint_argument


@dataclass
class ModelStats:
    total_params: int  # main model (embedding and head included)
    active_params: int  # main model, per token: everything but the routed experts not chosen
    mtp_params: int  # the MTP modules (their embedding and head are shared, so not counted)
    mtp_active_params: int
    cache_elems: float  # per token per layer, what the model caches: MLA kv_lora_rank + qk_rope_head_dim
    #                     (+ index_head_dim with DSA), GQA 2 * K * d; DeepSeek-V4 the compressed entries'
    #                     growth averaged over the layers (its sliding window is a fixed size besides)
    mha_cache_elems: int  # per token per layer: H * (qk_head_dim + v_head_dim)
    num_layers: int
    attention: str = "MLA"  # "MLA" (DeepSeek), "DeepSeek-V4" or "GQA" (dense Llama / Qwen2)


def model_stats(config: ModelConfig | DenseConfig) -> ModelStats:
    """Count one block of each kind on the meta device and multiply: V3's 61 layers of 256 experts
    would take seconds to build, one dense and one MoE block take milliseconds."""
    if isinstance(config, DenseConfig):
        return _dense_stats(config)
    from nanoseek.model.attention import latent_cache_dims
    from nanoseek.model.hyper import HyperHead
    from nanoseek.model.moe import MoE
    from nanoseek.model.mtp import make_mtp_layer
    from nanoseek.model.transformer import Block

    def count(module, active: bool) -> int:
        n = sum(p.numel() for p in module.parameters())
        if active:
            for moe in (m for m in module.modules() if isinstance(m, MoE)):
                per_expert = sum(p.numel() for p in moe.experts[0].parameters())
                n -= per_expert * (moe.n_experts - moe.top_k)
        return n

    L, D = config.num_hidden_layers, config.num_nextn_predict_layers
    kinds: dict[bool, int] = {}  # is_moe -> number of main layers of that kind
    for i in range(L):
        kinds[config.is_moe_layer(i)] = kinds.get(config.is_moe_layer(i), 0) + 1
    embed = config.vocab_size * config.hidden_size
    total = active = embed * (1 if config.tie_word_embeddings else 2) + config.hidden_size  # + final norm
    mtp_total = mtp_active = 0
    with torch.device("meta"):
        if config.hc_mult is not None:  # mHC's head, collapsing the streams before the final norm
            head = count(HyperHead(config), False)
            total, active = total + head, active + head
        if config.is_v4:  # each layer's attention type and routing shape its parameters: count them all
            for i in range(L):
                block = Block(config, i)
                total, active = total + count(block, False), active + count(block, True)
        for is_moe, n in ({} if config.is_v4 else kinds).items():
            block = Block(config, next(i for i in range(L) if config.is_moe_layer(i) == is_moe))
            total += n * count(block, False)
            active += n * count(block, True)
        for k in range(D):
            mtp = make_mtp_layer(Block, config, L + k)
            mtp_total += count(mtp, False)
            mtp_active += count(mtp, True)
    if config.is_v4:  # a fixed window per layer, and compressed entries that grow with the context
        return ModelStats(total_params=total, active_params=active, mtp_params=mtp_total, mtp_active_params=mtp_active,
                          cache_elems=_v4_cache_growth(config),
                          mha_cache_elems=config.num_attention_heads * 2 * config.head_dim, num_layers=L,
                          attention="DeepSeek-V4")
    return ModelStats(
        total_params=total, active_params=active, mtp_params=mtp_total, mtp_active_params=mtp_active,
        cache_elems=sum(latent_cache_dims(config)),  # what the engine's cache rows hold
        mha_cache_elems=config.num_attention_heads * (config.qk_head_dim + config.v_head_dim),
        num_layers=L,
    )


def _dense_stats(config: DenseConfig) -> ModelStats:
    """A Llama / Qwen2 model: every layer alike and every weight active; its cache is the rotated
    keys and the values of K key/value heads, where multi-head attention would cache H of each."""
    from nanoseek.model.dense import DenseTransformer

    with torch.device("meta"):  # the whole model costs no memory there, even at 70B
        total = DenseTransformer(config).num_parameters()
    L, d = config.num_hidden_layers, config.head_dim
    return ModelStats(total_params=total, active_params=total, mtp_params=0, mtp_active_params=0,
                      cache_elems=2 * config.num_key_value_heads * d, mha_cache_elems=2 * config.num_attention_heads * d,
                      num_layers=L, attention="GQA")


def training_flops_per_token(config: ModelConfig, seq_len: int, mtp: bool = False) -> float:
    """Model FLOPs of one training token (forward + backward), for MFU.

    6 per activated weight (2 forward, 4 backward; the input embedding is a lookup, not a matmul)
    plus attention's scores and weighted sum: per layer and head, 2 * (qk_head_dim + v_head_dim)
    FLOPs (one multiply-add per dimension) against each earlier position, i.e. seq_len / 2 of them
    on average under the causal mask, times 3 for the backward. Recomputation is not counted (none is done)."""
    s = model_stats(config)
    weights = s.active_params - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    layers = config.num_hidden_layers
    if mtp:
        weights += s.mtp_active_params
        layers += config.num_nextn_predict_layers
    attention = 6 * layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * seq_len / 2
    return 6 * weights + attention


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_stats(name: str, config: ModelConfig | DenseConfig, s: ModelStats, dtype_bytes: int = 2) -> str:
    if isinstance(config, DenseConfig):
        return _format_dense(name, config, s, dtype_bytes)
    L = s.num_layers
    latent, mha = s.cache_elems * dtype_bytes, s.mha_cache_elems * dtype_bytes
    moe_layers = sum(config.is_moe_layer(i) for i in range(L))
    lines = [
        f"model: {name}",
        f"  layers {L} ({moe_layers} MoE, {L - moe_layers} dense), hidden {config.hidden_size}, "
        f"heads {config.num_attention_heads}, vocab {config.vocab_size}",
        f"  experts: {config.n_routed_experts} routed (top-{config.num_experts_per_tok}, "
        f"{config.n_group} groups, top-{config.topk_group} groups) + {config.n_shared_experts} shared",
        *([f"  residual: mHC, {config.hc_mult} streams per token mixed by Sinkhorn-projected "
           f"({config.hc_sinkhorn_iters} iterations) doubly stochastic matrices"] if config.hc_mult else []),
        f"parameters (main model): {_human(s.total_params)} total, {_human(s.active_params)} activated per token "
        f"({s.total_params:,} / {s.active_params:,})",
        f"parameters (MTP, {config.num_nextn_predict_layers} module(s), embedding and head shared): "
        f"{_human(s.mtp_params)} total, {_human(s.mtp_active_params)} activated",
        *(_v4_cache_lines(config) if config.is_v4 else []),
    ]
    if config.is_v4:
        return "\n".join(lines)
    lines += [
        f"KV cache per token ({dtype_bytes}-byte values):",
        f"  MLA latent  {s.cache_elems:>7,} values/layer = {_bytes(latent)}/layer, {_bytes(latent * L)} over {L} layers",
        *([f"    (of which the DSA indexer key {config.index_head_dim:,} values/layer; "
           f"each query attends to its top {config.index_topk:,} tokens)"] if config.sparse_attention else []),
        f"  MHA equiv.  {s.mha_cache_elems:>7,} values/layer = {_bytes(mha)}/layer, {_bytes(mha * L)} over {L} layers",
        f"  MLA is {mha / latent:.1f}x smaller ({100 * latent / mha:.2f}% of multi-head attention)",
    ]
    return "\n".join(lines)


def _v4_cache_growth(config: ModelConfig) -> float:
    """Values a DeepSeek-V4 model caches per token and layer beyond its fixed windows, averaged over
    the layers: one compressed entry of head_dim per m tokens (CSA: and its indexer key)."""
    growth = 0.0
    for kind in config.layer_types:
        if kind != "sliding_attention":
            extra = config.index_head_dim if kind == "compressed_sparse_attention" else 0
            growth += (config.head_dim + extra) / config.compress_rates[kind]
    return growth / len(config.layer_types)


def _v4_cache_lines(config: ModelConfig) -> list[str]:
    """What a DeepSeek-V4 model caches in DeepSeek's design (per layer a window of the last
    sliding_window K=V rows, plus the compressed entries), and what nanoseek's engine caches instead:
    per token and layer its K=V row and its compressors' projections (model/attention_v4.py)."""
    from nanoseek.model.attention import latent_cache_dims

    return ["KV cache (DeepSeek-V4's design):",
            f"  every layer: a window of {config.sliding_window} rows of {config.head_dim} values (fixed size)",
            f"  compressed entries: {_v4_cache_growth(config):,.1f} values per token and layer, averaged "
            f"over the {len(config.layer_types)} layers",
            f"  nanoseek's engine: {sum(latent_cache_dims(config)):,} values per token and layer (each token's "
            f"K=V row and compressor projections; entries recomputed per step)"]


def _format_dense(name: str, config: DenseConfig, s: ModelStats, dtype_bytes: int) -> str:
    L, H, K = s.num_layers, config.num_attention_heads, config.num_key_value_heads
    kv, mha = s.cache_elems * dtype_bytes, s.mha_cache_elems * dtype_bytes
    return "\n".join([
        f"model: {name}",
        f"  {config.model_type} (dense), layers {L}, hidden {config.hidden_size}, heads {H} "
        f"({K} key/value heads), vocab {config.vocab_size}",
        "  experts: none (a dense model activates every parameter for every token)",
        f"parameters: {_human(s.total_params)} total, all activated per token ({s.total_params:,})",
        "parameters (MTP): none (dense models have no MTP modules)",
        f"KV cache per token ({dtype_bytes}-byte values; no MLA latent cache in a dense model):",
        f"  GQA keys+values {s.cache_elems:>7,} values/layer = {_bytes(kv)}/layer, {_bytes(kv * L)} over {L} layers",
        f"  MHA equiv.      {s.mha_cache_elems:>7,} values/layer = {_bytes(mha)}/layer, {_bytes(mha * L)} over {L} layers",
        f"  GQA is {mha / kv:.1f}x smaller ({K} of {H} heads' keys and values)",
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="tiny, small, reasoning, gpu, v2-lite or v3")
    src.add_argument("--model", type=checkpoint_argument,
                     help="a checkpoint directory (reads its config.json), or a run directory: its latest checkpoint")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached value (2 = bf16)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.preset:
        name, config = args.preset, preset(args.preset)
    else:
        from nanoseek.checkpoint import load_config

        name, config = args.model, load_config(args.model)
    if args.dtype_bytes < 1:
        raise NanoseekError("--dtype-bytes must be a positive integer (2 for bf16, 4 for fp32)")
    s = model_stats(config)
    formats = stored_formats(args.model) if args.model else {}
    if args.json:
        print(json.dumps({**stats_json(name, s, args.dtype_bytes), **({"stored_formats": formats} if formats else {})}))
    else:
        lines = [format_stats(name, config, s, args.dtype_bytes)]
        if formats:
            lines.append("weights as stored:")
            lines += [f"  {kind}: {e['tensors']:,} tensors, {_bytes(e['bytes'])}" for kind, e in formats.items()]
        print("\n".join(lines))
    return 0


def stored_formats(path: str) -> dict[str, dict[str, int]]:
    """The checkpoint's tensors by stored format (`checkpoint.weight_formats`), largest first; {}
    for a directory without weights (info needs only config.json)."""
    from nanoseek.checkpoint import SafetensorsIndex, weight_formats

    if not any(Path(path).glob("*.safetensors")):
        return {}
    formats = weight_formats(SafetensorsIndex(path))
    return dict(sorted(formats.items(), key=lambda item: -item[1]["bytes"]))


def stats_json(name: str, s: ModelStats, dtype_bytes: int = 2) -> dict:
    """The figures `format_stats` prints, as a JSON-ready dict (cache bytes per token over all layers).
    `kv_cache_bytes_per_token` is what the model caches per token (a DeepSeek-V4 model: its compressed
    entries, beside windows of a fixed size); the mla_* keys (read by the report card) only exist for
    MLA models."""
    kv, mha = s.cache_elems * dtype_bytes * s.num_layers, s.mha_cache_elems * dtype_bytes * s.num_layers
    out = {"model": name, "total_params": s.total_params, "active_params": s.active_params,
           "mtp_params": s.mtp_params, "mtp_active_params": s.mtp_active_params, "num_layers": s.num_layers,
           "dtype_bytes": dtype_bytes, "attention": s.attention, "kv_cache_bytes_per_token": kv,
           "mha_cache_bytes_per_token": mha, "kv_vs_mha": mha / kv}
    if s.attention == "MLA":
        out.update(mla_cache_bytes_per_token=kv, mla_vs_mha=mha / kv)
    return out
