"""The decode cost of one attention layer: DeepSeek-V3's MLA against V3.2's sparse attention (DSA).

One MLA layer at the released attention shapes (hidden 7168, 128 heads, q_lora 1536, kv_lora 512,
rope 64; V3.2's indexer: 64 heads of 128, top 2048), random weights, decodes one token of one
sequence on a latent cache holding S past tokens (random latents: the cost does not depend on
their values). Three forms of the same step, timed in alternating rounds at each S:

- `v3`: MLA without an indexer, absorbed attention over all S cached latents;
- `v32 masked`: V3.2 computing the dense scores and masking all but the top-k (nanoseek's form for
  prefill and training, and its decode form before the sparse gather);
- `v32`: V3.2 as nanoseek decodes it: the indexer scores all S, the top-k rows are gathered and
  attention runs over those only.

The layer's projections (about 190M weights, read once per token at batch 1) cost the same in
every form; what grows with S is the attention, O(S) in `v3` and `v32 masked`, O(k) plus the
indexer's small O(S) in `v32`. The median step time of each is reported, with ratios to `v3`.

    python benchmarks/sparse_attention.py [--contexts 2048 8192 32768 131072] [--steps 5] [--threads 2] [--json OUT]

transformers' DeepseekV32 attention is not timed beside it: its decode re-expands every cached
latent into per-head keys and values each step (512 -> 128 x 256 values per token), minutes per
step at these contexts on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

import nanoseek.model.attention as attention
from nanoseek.config import preset
from nanoseek.model.attention import MLA, ContiguousCache
from nanoseek.model.layers import RotaryEmbedding

V32_INDEXER = dict(index_topk=2048, index_head_dim=128, index_n_heads=64)  # DeepSeek-V3.2-Exp's


@contextlib.contextmanager
def masked_decode():
    """V3.2's decode on the masked dense scores instead of the gathered top-k rows."""
    saved = attention.SPARSE_DECODE_MAX_TOKENS
    attention.SPARSE_DECODE_MAX_TOKENS = 0
    try:
        yield
    finally:
        attention.SPARSE_DECODE_MAX_TOKENS = saved


def layer(config, seed: int = 0) -> MLA:
    torch.manual_seed(seed)
    mla = MLA(config).eval()
    with torch.no_grad():
        for p in mla.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return mla


def step_time(mla: MLA, config, cache: ContiguousCache, S: int, rope: RotaryEmbedding, steps: int,
              context=contextlib.nullcontext) -> list[float]:
    """Seconds of each of `steps` decode steps of one token at position S - 1 (after one warm-up)."""
    positions = torch.tensor([[S - 1]])
    x = torch.randn(1, 1, config.hidden_size)
    times = []
    with torch.no_grad(), context():
        for i in range(steps + 1):
            t0 = time.perf_counter()
            mla(x, positions, rope(positions), cache, layer_idx=0)
            if i:
                times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--steps", type=int, default=5, help="timed decode steps per form and context")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--topk", type=int, default=V32_INDEXER["index_topk"])
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    one_layer = dict(num_hidden_layers=1, num_nextn_predict_layers=0, first_k_dense_replace=1)
    v3 = preset("v3", **one_layer)
    v32 = preset("v3", **one_layer, **{**V32_INDEXER, "index_topk": args.topk})
    layers = {"v3": layer(v3), "v32": layer(v32)}
    rope = RotaryEmbedding(v3)
    forms = [("v3", "v3", contextlib.nullcontext), ("v32 masked", "v32", masked_decode), ("v32", "v32", contextlib.nullcontext)]
    print(f"one MLA layer at DeepSeek-V3 / V3.2 shapes, batch 1, fp32, {torch.get_num_threads()} threads, "
          f"top-{args.topk}; median decode step (ms)")
    print(f"{'context':>8} " + " ".join(f"{name:>11}" for name, _, _ in forms) + "   v3 / v32")
    results = []
    for S in args.contexts:
        caches = {}
        for name, config in (("v3", v3), ("v32", v32)):
            torch.manual_seed(1)
            cache = ContiguousCache(config, batch_size=1, max_len=S)
            cache.latent.normal_()
            cache.k_pe.normal_()
            cache.length = S
            caches[name] = cache
        times = {name: [] for name, _, _ in forms}
        for _ in range(args.steps):  # rounds, so that the forms share any noise alike
            for name, which, context in forms:
                times[name] += step_time(layers[which], v3 if which == "v3" else v32, caches[which], S, rope, 1,
                                         context)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results.append({"context": S, **{f"{name} ms": round(ms, 2) for name, ms in medians.items()},
                        "v3 / v32": round(medians["v3"] / medians["v32"], 2)})
        print(f"{S:>8} " + " ".join(f"{medians[name]:>11.1f}" for name, _, _ in forms)
              + f"   {medians['v3'] / medians['v32']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "topk": args.topk, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
