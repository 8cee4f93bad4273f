"""Training throughput: nanoseek's Transformer vs transformers' DeepseekV3ForCausalLM.

Same architecture (the `small` preset, or --preset), same weights, same batch and sequence length,
same optimizer (AdamW, foreach), same machine and thread count; MTP off for both (transformers
does not train MTP modules). One training step = forward with labels, backward, optimizer step.
The two models alternate in rounds so that noise from other processes hits both alike; the
median step time of each is reported.

    python benchmarks/train_throughput.py [--preset small] [--batch 16] [--seq 256] [--steps 6] [--threads 2]

On a machine shared with other busy processes, wall-clock times mostly measure the contention
(two OpenMP threads wait for each other whenever one is descheduled). `--clock cpu --threads 1`
times the CPU time of the one compute thread instead, which contention barely moves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from nanoseek.config import preset  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402


def hf_model(config, nanoseek_model, experts_implementation: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = config.to_dict()
    hf_config = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    model = DeepseekV3ForCausalLM._from_config(hf_config, experts_implementation=experts_implementation,
                                               attn_implementation="sdpa")
    # same weights: HF stores each layer's experts stacked as gate_up_proj (E, 2F, D) / down_proj (E, D, F)
    sd = nanoseek_model.state_dict()
    hf_sd = model.state_dict()
    for key in hf_sd:
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            n = hf_sd[key].shape[0]
            hf_sd[key] = torch.stack([torch.cat([sd[f"{prefix}{e}.gate_proj.weight"], sd[f"{prefix}{e}.up_proj.weight"]])
                                      for e in range(n)])
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            hf_sd[key] = torch.stack([sd[f"{prefix}{e}.down_proj.weight"] for e in range(hf_sd[key].shape[0])])
        elif key in sd:
            hf_sd[key] = sd[key]
    model.load_state_dict(hf_sd)
    return model.train()


def make_step(model, ids, labels, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        if hf:
            # HF shifts labels itself: pass the unshifted sequence
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(ids, labels=labels, logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="measured steps per model (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", default="grouped_mm", help="transformers experts_implementation (its default: grouped_mm)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall-clock time, or CPU time of this thread (needs --threads 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu counts only this thread's CPU time: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time

    import transformers

    config = preset(args.preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = Transformer(config).train()
    theirs = hf_model(config, ours, args.experts)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    steps = {"nanoseek": make_step(ours, inputs, labels, hf=False),
             "transformers": make_step(theirs, inputs, None, hf=True)}
    with torch.no_grad():  # same weights, same loss: the comparison is like for like
        a = ours(inputs, labels=labels).loss.item()
        b = theirs(input_ids=inputs, labels=inputs).loss.item()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads | "
          f"preset {args.preset} ({ours.num_parameters() / 1e6:.2f}M params, MTP off) | batch {args.batch} x "
          f"{args.seq} tokens | transformers experts_implementation={args.experts}, sdpa | {args.clock} clock")
    print(f"initial loss: nanoseek {a:.5f}, transformers {b:.5f}")

    times = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(2):
            step()
    for _ in range(args.steps):  # alternate, so background load affects both alike
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    tokens = args.batch * args.seq
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>12}: {rate[name]:8.0f} tokens/s  (median step {statistics.median(t) * 1000:.0f} ms, "
              f"min {min(t) * 1000:.0f} ms over {len(t)} steps)")
    print(f"ratio nanoseek / transformers: {rate['nanoseek'] / rate['transformers']:.2f}x")


if __name__ == "__main__":
    main()
