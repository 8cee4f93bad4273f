"""A released small model on a laptop CPU: transformers fp32 vs nanoseek fp32 vs nanoseek int8.

    python benchmarks/laptop_inference.py [--dir /tmp/nanoseek-r1-distill-1.5b-shape] [--threads 2]
    python benchmarks/laptop_inference.py --small     # toy shapes: checks the script in seconds

The model is a random-weight Qwen2 with DeepSeek-R1-Distill-Qwen-1.5B's shapes (hidden 1536, 28
layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151936, untied head: 1.78B parameters),
saved by transformers in bfloat16 as one 3.5 GB model.safetensors, as the released checkpoint is
(made once, then reused). No network: the weights are random, the prompts are seeded token ids.

Each engine runs in a fresh process (so its peak memory is its own, and two models are never in
memory at once) and reports:
- load time: from nothing to a model ready to generate (the bf16 file upcast to fp32, or quantized);
- peak resident memory of the process (VmHWM: weights, cache, activations, the Python runtime);
- decode tokens/s at batch 1 and batch 8: greedy generation of n tokens minus a 1-token run (the
  prefill), over n - 1 decode steps, after a warm-up;
- the greedy tokens, to compare: int8 against fp32 (8 prompts x the first 64 tokens: the share of
  positions that agree, how far each prompt goes before the first difference, and, teacher-forced,
  how often int8 picks fp32's next token on fp32's own text: free-running text diverges for good
  at the first different pick, so the positional share mostly measures where that happens), and
  nanoseek fp32 against transformers.

Targets (issue 15): nanoseek fp32 >= transformers at batch 1 and >= 1.5x at batch 8; int8 >= 1.5x
nanoseek fp32 at batch 1 with <= 0.6x its peak memory; int8 greedy agrees with fp32 on >= 90% of
the first 64 tokens of 8 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}
ENGINES = ("transformers-fp32", "nanoseek-fp32", "nanoseek-int8")


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def prompts(args, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 100_000), (8, args.prompt_len), generator=g).tolist()


# ------------------------------------------------------------------ phases (each in its own process)


def make_checkpoint(args) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: the fp32 model never exists here
    vocab = SHAPES[args.shape]["vocab_size"]
    cfg = transformers.Qwen2Config(**SHAPES[args.shape], max_position_embeddings=131072, rope_theta=10000.0,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151646 % vocab,
                                   eos_token_id=151643 % vocab)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(args.dir, max_shard_size="8GB")
    return {"parameters": sum(p.numel() for p in model.parameters())}


def run_engine(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    vocab = SHAPES[args.shape]["vocab_size"]
    batch_prompts = prompts(args, vocab)
    t0 = time.perf_counter()
    if args.phase == "transformers-fp32":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()

        def generate(batch: int, n: int) -> list[list[int]]:
            ids = torch.tensor(batch_prompts[:batch])
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()
    else:
        import nanoseek
        from nanoseek.inference.sampling import SamplingParams

        llm = nanoseek.LLM(args.dir, max_num_seqs=8, max_model_len=args.prompt_len + args.agree_tokens + 16,
                           enable_prefix_caching=False, device="cpu", dtype="float32",
                           quantize="int8" if args.phase == "nanoseek-int8" else None)

        def generate(batch: int, n: int) -> list[list[int]]:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            return [o.outputs[0].token_ids for o in llm.generate(batch_prompts[:batch], params)]
    load_s = time.perf_counter() - t0

    result = {"engine": args.phase, "load_s": load_s}
    for batch, n in ((1, args.decode_tokens), (8, args.decode_tokens)):
        generate(batch, 2)  # warm-up
        t = time.perf_counter()
        generate(batch, 1)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        tokens = generate(batch, n)
        total = time.perf_counter() - t
        result[f"decode_tok_s_b{batch}"] = batch * (n - 1) / max(total - prefill, 1e-9)
        if batch == 1:
            result["greedy_b1"] = tokens[0]
    if args.phase != "transformers-fp32":
        result["greedy_agree"] = generate(8, args.agree_tokens)  # the 8 prompts, batch 8
    result["peak_rss_gib"] = peak_rss_gib()  # before the check below, which holds a prompt's logits
    if args.reference:  # int8: its next-token choice on fp32's greedy text, position by position
        reference = json.loads(Path(args.reference).read_text())["greedy_agree"]
        same = total = 0
        for prompt, tokens in zip(batch_prompts, reference):
            with torch.inference_mode():
                logits = llm.model(torch.tensor([prompt + tokens])).logits[0]
            picks = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].argmax(dim=-1).tolist()
            same, total = same + sum(a == b for a, b in zip(picks, tokens)), total + len(tokens)
        result["teacher_forced_agree"] = same / total
    return result


# ------------------------------------------------------------------ driver


def subprocess_phase(args, phase: str, reference: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--dir", str(args.dir), "--threads", str(args.threads),
           "--shape", args.shape, "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
           "--agree-tokens", str(args.agree_tokens)]
    if reference is not None:
        file = args.dir / "fp32_greedy.json"
        file.write_text(json.dumps(reference))
        cmd += ["--reference", str(file)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, list[int]]:
    """Share of positions where two greedy runs agree, and each prompt's tokens before the first difference."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(min(len(ra), len(rb)) for ra, rb in zip(a, b))
    prefixes = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
                for ra, rb in zip(a, b)]
    return same / total, prefixes


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where the bf16 checkpoint is (made if missing)")
    parser.add_argument("--small", action="store_true", help="toy shapes instead of the 1.5B ones (a quick check)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per engine")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens per timed generation")
    parser.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared, int8 vs fp32")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--phase", default=None, choices=("make", *ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = args.shape or ("small" if args.small else "1.5b")
    args.dir = args.dir or Path(f"/tmp/nanoseek-r1-distill-{args.shape}-shape")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "make":
        print(json.dumps(make_checkpoint(args)))
        return
    if args.phase:
        print(json.dumps(run_engine(args)))
        return

    if not (args.dir / "config.json").exists():
        t = time.perf_counter()
        made = subprocess_phase(args, "make")
        print(f"made {args.dir}: {made['parameters'] / 1e9:.2f}B random bf16 parameters "
              f"in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1024**3
    results = {}
    for phase in ENGINES:
        print(f"running {phase} ...", file=sys.stderr, flush=True)
        reference = results.get("nanoseek-fp32") if phase == "nanoseek-int8" else None
        results[phase] = subprocess_phase(args, phase, reference)

    tf, fp32, int8 = (results[e] for e in ENGINES)
    agree, prefixes = agreement(fp32["greedy_agree"], int8["greedy_agree"])
    n_ref = min(len(tf["greedy_b1"]), len(fp32["greedy_b1"]))
    vs_hf = sum(a == b for a, b in zip(tf["greedy_b1"], fp32["greedy_b1"]))
    print(f"\n{cpu_name()}, {args.threads} threads, torch {__import__('torch').__version__}; "
          f"{args.shape} Qwen2 shapes, {size:.2f} GiB of bf16 safetensors; prompts of {args.prompt_len} tokens, "
          f"{args.decode_tokens} generated per timing\n")
    print("| engine | load s | peak RSS GiB | decode tok/s, batch 1 | decode tok/s, batch 8 |")
    print("|---|---|---|---|---|")
    for e in ENGINES:
        r = results[e]
        print(f"| {e} | {r['load_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['decode_tok_s_b1']:.2f} | "
              f"{r['decode_tok_s_b8']:.2f} |")
    ratios = {
        "nanoseek fp32 / transformers, batch 1 (target >= 1.0)": fp32["decode_tok_s_b1"] / tf["decode_tok_s_b1"],
        "nanoseek fp32 / transformers, batch 8 (target >= 1.5)": fp32["decode_tok_s_b8"] / tf["decode_tok_s_b8"],
        "int8 / nanoseek fp32, batch 1 (target >= 1.5)": int8["decode_tok_s_b1"] / fp32["decode_tok_s_b1"],
        "int8 / nanoseek fp32, batch 8": int8["decode_tok_s_b8"] / fp32["decode_tok_s_b8"],
        "int8 / nanoseek fp32, peak memory (target <= 0.6)": int8["peak_rss_gib"] / fp32["peak_rss_gib"],
        "nanoseek fp32 / transformers, peak memory": fp32["peak_rss_gib"] / tf["peak_rss_gib"],
        "nanoseek fp32 / transformers, load time": fp32["load_s"] / tf["load_s"],
        f"int8 greedy agrees with fp32 (8 prompts x {args.agree_tokens} tokens; target >= 0.90)": agree,
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    print(f"int8 vs fp32, tokens before the first difference per prompt: {prefixes}")
    print(f"int8's next token on fp32's greedy text (teacher-forced) equals fp32's: "
          f"{int8['teacher_forced_agree']:.3f} of {len(prefixes) * args.agree_tokens} positions")
    print(f"nanoseek fp32 greedy equals transformers' on {vs_hf}/{n_ref} tokens (prompt 0, batch 1)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "prefixes": prefixes,
                                         "cpu": cpu_name(), "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
