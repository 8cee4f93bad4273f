"""Training memory and step time of the fused head + loss (model/loss.py) against the plain logits.

Two models, each trained a few steps (forward with labels, backward, AdamW) once with the plain
loss (`lm_head` -> (B, T, V) logits -> fp32 cross-entropy, the default) and once with the recipes'
`fused_loss=true` (`linear_cross_entropy`), each variant in its own process so that its peak
resident memory (ru_maxrss) is its own:

  qwen-vocab  a dense Qwen2 student with R1-Distill-Qwen-1.5B's 151,936-token vocabulary and a
              small body (hidden 256, 2 layers), at 1,024 tokens: the head and its logits dominate
  small       the `small` V3 preset (vocabulary 4,096) with its MTP module, 16 x 256 tokens

"above start" is the peak less the process's resident memory before its first step (the weights,
torch): the step's own memory, gradients, AdamW state and activations. Step time is the median
of the measured steps (after one warm-up step). CPU only, fp32.

    python benchmarks/linear_cross_entropy.py [--cases qwen-vocab small] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from nanoseek.config import preset
from nanoseek.model.dense import DenseConfig, DenseTransformer
from nanoseek.model.transformer import Transformer

CASES = {
    "qwen-vocab": dict(batch=1, seq=1024),
    "small": dict(batch=16, seq=256),
}


def build(case: str):
    if case == "qwen-vocab":
        return DenseTransformer(DenseConfig(model_type="qwen2", vocab_size=151936, hidden_size=256,
                                            intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=2048))
    return Transformer(preset("small"))


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(case: str, variant: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = build(case).train()
    model.fused_loss = variant == "fused"  # what the trainer sets for fused_loss=true
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    B, T = CASES[case]["batch"], CASES[case]["seq"]
    ids = torch.randint(0, model.config.vocab_size, (B, T + 1))
    start = rss_bytes()
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = model(ids[:, :-1], labels=ids[:, 1:], logits=False)
        loss = out.loss + (out.mtp_loss if out.mtp_loss is not None else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    return {"peak_bytes": rss_bytes(), "start_bytes": start, "step_s": statistics.median(times[1:]),
            "losses": losses}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return

    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    for case in args.cases:
        results = {}
        for variant in ("plain", "fused"):
            run = subprocess.run([sys.executable, __file__, "--worker", case, variant, "--steps", str(args.steps),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            results[variant] = r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{case:10s} {variant:5s}  peak RSS {gb(r['peak_bytes'])}  above start "
                  f"{gb(r['peak_bytes'] - r['start_bytes'])}  step {r['step_s']:.2f} s  "
                  f"first loss {r['losses'][0]:.6f}", flush=True)
        a, b = results["plain"], results["fused"]
        print(f"{case:10s} fused / plain: peak RSS {b['peak_bytes'] / a['peak_bytes']:.2f}x, above start "
              f"{(b['peak_bytes'] - b['start_bytes']) / (a['peak_bytes'] - a['start_bytes']):.2f}x, "
              f"step time {b['step_s'] / a['step_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
