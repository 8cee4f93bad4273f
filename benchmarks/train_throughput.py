"""Training throughput: nanoseek's Transformer vs transformers' DeepseekV3ForCausalLM.

Same architecture (the `small` preset, or --preset), same weights, same batch and sequence length,
same optimizer (AdamW: fused on a GPU, foreach on the CPU), same machine and thread count; MTP off for both (transformers
does not train MTP modules). One training step = forward with labels, backward, optimizer step.
The two models alternate in rounds so that noise from other processes hits both alike; the
median step time of each is reported.

    python benchmarks/train_throughput.py [--preset small] [--batch 16] [--seq 256] [--steps 6] [--threads 2]
    python benchmarks/train_throughput.py --device cuda --preset gpu --batch 8 --seq 2048 [--compile]

On a GPU both train in bf16 autocast with fp32 weights and optimizer state, and the report adds
each model's own peak GPU memory (its weights, gradients, AdamW state and activations; not the
other model's, which shares the GPU) and MFU: model FLOPs (6 per activated weight per token, plus causal attention;
nanoseek.info.training_flops_per_token) per second over the GPU's dense bf16 peak (--peak-tflops;
989 for an H100 or H200 SXM).

On a machine shared with other busy processes, wall-clock times mostly measure the contention
(two OpenMP threads wait for each other whenever one is descheduled). `--clock cpu --threads 1`
times the CPU time of the one compute thread instead, which contention barely moves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from optional import require  # noqa: E402

from nanoseek.config import preset  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402


def hf_model(config, nanoseek_model, experts_implementation: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = config.to_dict()
    hf_config = DeepseekV3Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    try:
        model = DeepseekV3ForCausalLM._from_config(hf_config, experts_implementation=experts_implementation,
                                                   attn_implementation="sdpa")
    except (TypeError, ValueError):  # a transformers release without selectable expert kernels
        model = DeepseekV3ForCausalLM._from_config(hf_config, attn_implementation="sdpa")
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


def make_step(model, ids, labels, hf: bool, autocast):
    # the fused kernel on a GPU, as nanoseek's trainer uses there (and foreach on the CPU)
    cuda = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None, foreach=None if cuda else True)

    def step():
        with autocast():
            if hf:
                # HF shifts labels itself: pass the unshifted sequence
                loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = model(ids, labels=labels, logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the GPU: the step's time is all of its work

    return step


def own_peak_bytes(peak: int, resident: int, model) -> int:
    """One model's peak training memory, when both models share the GPU: the device's peak during
    its steps, less what was resident before them (both models' weights, and the AdamW state of the
    model that warmed up first, all of which stay allocated), plus its own weights."""
    return peak - resident + sum(p.numel() * p.element_size() for p in model.parameters())


def gpu_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of the GPUs we know (TFLOP/s)."""
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("A100", 312.0), ("L40S", 362.0)):
        if key in name:
            return peak
    return None


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
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast there)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--fused-loss", action="store_true",
                   help="nanoseek's head fused into its loss (the recipes' fused_loss=true; model/loss.py)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward, in both models (transformers: "
                        "gradient_checkpointing_enable)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    require("transformers")
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu counts only this thread's CPU time: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time

    import transformers

    from nanoseek.info import model_stats, training_flops_per_token

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    config = preset(args.preset, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    ours = Transformer(config).train()
    theirs = hf_model(config, ours, args.experts).to(device)
    ours = ours.to(device)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1)).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    with torch.no_grad(), autocast():  # same weights, same loss: the comparison is like for like
        a = ours(inputs, labels=labels, logits=False).loss.item()
        b = theirs(input_ids=inputs, labels=inputs).loss.item()
    models = {"nanoseek": ours, "transformers": theirs}
    ours.fused_loss = args.fused_loss  # after the check above: that loss is the plain path's
    if args.activation_checkpointing:
        ours.activation_checkpointing = True
        theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    steps = {"nanoseek": make_step(models["nanoseek"], inputs, labels, hf=False, autocast=autocast),
             "transformers": make_step(models["transformers"], inputs, None, hf=True, autocast=autocast)}
    stats = model_stats(config)
    precision = "bf16 autocast, fp32 weights" if cuda else "fp32"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {device} "
          f"({torch.cuda.get_device_name(device) if cuda else f'{args.threads} threads'}) | preset {args.preset} "
          f"({stats.total_params / 1e6:.1f}M params, {stats.active_params / 1e6:.1f}M activated, MTP off) | "
          f"batch {args.batch} x {args.seq} tokens | {precision} | transformers experts_implementation={args.experts}, "
          f"sdpa | {'compiled' if args.compile else 'eager'}"
          f"{' | activation checkpointing' if args.activation_checkpointing else ''}"
          f"{' | fused head + loss' if args.fused_loss else ''} | {args.clock} clock")
    print(f"initial loss: nanoseek {a:.5f}, transformers {b:.5f}")

    times = {name: [] for name in steps}
    peak_memory = {}
    for name, step in steps.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        if cuda:
            peak_memory[name] = own_peak_bytes(torch.cuda.max_memory_allocated(device), resident, models[name])
    for _ in range(args.steps):  # alternate, so background load affects both alike
        for name, step in steps.items():
            t0 = clock()
            step()
            times[name].append(clock() - t0)
    tokens = args.batch * args.seq
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    flops = training_flops_per_token(config, args.seq)
    peak = args.peak_tflops or (gpu_peak_tflops(device) if cuda else None)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "preset": args.preset,
              "batch": args.batch, "seq": args.seq, "compiled": args.compile,
              "activation_checkpointing": args.activation_checkpointing, "fused_loss": args.fused_loss,
              "flops_per_token": flops,
              "ratio": rate["nanoseek"] / rate["transformers"]}
    for name, t in times.items():
        mfu = rate[name] * flops / (peak * 1e12) if peak else None
        result[name] = {"tokens_per_s": rate[name], "median_step_s": statistics.median(t),
                        "mfu": mfu, "peak_memory_bytes": peak_memory.get(name)}
        extra = ""
        if mfu is not None:
            extra += f", MFU {100 * mfu:.1f}%"
        if name in peak_memory:
            extra += f", peak memory {peak_memory[name] / 2**30:.1f} GiB"
        print(f"{name:>12}: {rate[name]:8.0f} tokens/s  (median step {statistics.median(t) * 1000:.0f} ms, "
              f"min {min(t) * 1000:.0f} ms over {len(t)} steps{extra})")
    print(f"ratio nanoseek / transformers: {result['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
