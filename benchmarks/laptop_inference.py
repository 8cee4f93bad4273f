"""A released small model on a laptop CPU: transformers fp32 vs nanoseek fp32, bf16, fp16, int8 and int8-dynamic.

    python benchmarks/laptop_inference.py [--dir /tmp/nanoseek-r1-distill-1.5b-shape] [--threads 1]
    python benchmarks/laptop_inference.py --small     # toy shapes: checks the script in seconds
    python benchmarks/laptop_inference.py --trained runs/student_long/latest   # + agreement on a trained model
    python benchmarks/laptop_inference.py --paired 7 [--threads 2 --clock wall]   # only int8, fp16 vs fp32, in turn

The model is a random-weight Qwen2 with DeepSeek-R1-Distill-Qwen-1.5B's shapes (hidden 1536, 28
layers, 12 heads, 2 KV heads, intermediate 8960, vocabulary 151936, untied head: 1.78B parameters),
saved by transformers in bfloat16 as one 3.5 GB model.safetensors, as the released checkpoint is
(made once, then reused). No network: the weights are random, the prompts are seeded token ids.

Engines: transformers fp32 (`generate`), nanoseek fp32 (`LLM`: oneDNN-packed linear layers),
nanoseek fp32 as before the packing (`LLM` on the in-memory model: plain F.linear, for the
before/after), nanoseek bf16 (`--dtype bfloat16`: the checkpoint's own precision, computed in
bf16 throughout; the calibration for the agreement figures: how far from fp32 a precision everyone
accepts lands), nanoseek `--quantize fp16` (float16 weights, float32 math: exact for a bf16
checkpoint), `--quantize int8` (weight-only) and `--quantize int8-dynamic` (torch.ao),
each also with the untied output head in float32 (`int8-float-head`, `int8-dynamic-float-head`;
nanoseek quantizes it: nanoseek.device.FLOAT_LAYERS), for what quantizing the head gives.
Each engine runs in a fresh process (so its peak memory is its own, and two models are never in
memory at once) and reports:
- load time: from nothing to a model ready to generate (the bf16 file upcast to fp32, or quantized);
- peak resident memory of the process (VmHWM: weights, cache, activations, the Python runtime);
- decode tokens/s at batch 1 and batch 8: greedy generation of n tokens minus a 1-token run (the
  prefill), over n - 1 decode steps, after a warm-up; the median of --repeats such measurements,
  timed by --clock: "cpu" (the default on 1 thread) is the process's CPU time (time.process_time),
  which on a machine shared with other jobs counts only this process's work: the decode time the
  process would take alone, short of the memory bandwidth the others take; on more threads it
  would add up every thread's time (tokens per CPU-second, not per second), so there the clock is
  "wall" (the default) and "cpu" is refused;
- the greedy tokens, to compare: bf16, fp16 and int8 against fp32 (8 prompts x the first 64 tokens: the
  share of positions that agree, how far each prompt goes before the first difference, and,
  teacher-forced, how often each picks fp32's next token on fp32's own text: free-running text
  diverges for good at the first different pick, so the positional share mostly measures where
  that happens), and nanoseek fp32 against transformers;
- for fp32, the margin between its top two logits at each of those positions (teacher-forced): how
  close to a tie its picks are, i.e. how small an error flips them.
With --trained DIR [DIR ...], the same agreement figures on trained checkpoints (fp32 vs bf16, fp16
and each int8, with the head quantized and in float), with prompts sampled from the model itself (8 x
32 tokens, seeded), since a random-weight model's nearly flat logits make any quantization flip
its picks. nanoseek leaves a head tied to the embedding in float; on a tied checkpoint the
quantized-head figures quantize an untied copy of it (what an int8 head would do to the picks).

Targets (issue 15): nanoseek fp32 >= transformers at batch 1 and >= 1.5x at batch 8; int8 >= 1.5x
nanoseek fp32 at batch 1 with <= 0.6x its peak memory; int8 greedy agrees with fp32 on >= 90% of
the first 64 tokens of 8 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from optional import require

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}
ENGINES = ("transformers-fp32", "nanoseek-fp32-unpacked", "nanoseek-fp32", "nanoseek-bf16", "nanoseek-fp16",
           "nanoseek-int8", "nanoseek-int8-float-head", "nanoseek-int8-dynamic", "nanoseek-int8-dynamic-float-head")
COMPARED = ENGINES[3:]  # against nanoseek fp32: speed, memory, greedy agreement
# per method, its engines with the output head quantized and in float (one is nanoseek's default)
HEAD_PAIRS = {"int8": ("nanoseek-int8", "nanoseek-int8-float-head"),
              "int8-dynamic": ("nanoseek-int8-dynamic", "nanoseek-int8-dynamic-float-head")}
HEADS = {"-quantized-head": True, "-float-head": False}  # a name's suffix: whether the head is quantized


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
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
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

        from nanoseek.checkpoint import load_model

        quantize, head = split_variant(args.phase.removeprefix("nanoseek-"))
        quantize = None if quantize in ("fp32", "fp32-unpacked", "bf16") else quantize
        if head is not None:
            set_head(head)
        # an in-memory model is not packed: the fp32 path as it was before PackedLinear
        model = load_model(args.dir) if args.phase == "nanoseek-fp32-unpacked" else args.dir
        dtype = "bfloat16" if args.phase == "nanoseek-bf16" else "float32"
        llm = nanoseek.LLM(model, max_num_seqs=8, max_model_len=args.prompt_len + args.agree_tokens + 16,
                           enable_prefix_caching=False, device="cpu", dtype=dtype, quantize=quantize)

        def generate(batch: int, n: int) -> list[list[int]]:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            return [o.outputs[0].token_ids for o in llm.generate(batch_prompts[:batch], params)]
    load_s = time.perf_counter() - t0

    result = {"engine": args.phase, "load_s": load_s}
    for batch, n in ((1, args.decode_tokens), (8, args.decode_tokens)):
        generate(batch, 2)  # warm-up
        rates = []
        for _ in range(args.repeats):
            rate, tokens = timed_decode(generate, batch, n, clock)
            rates.append(rate)
        result[f"decode_tok_s_b{batch}"] = statistics.median(rates)
        result[f"decode_tok_s_b{batch}_all"] = rates
        if batch == 1:
            result["greedy_b1"] = tokens[0]
    if args.phase != "transformers-fp32":
        result["greedy_agree"] = generate(8, args.agree_tokens)  # the 8 prompts, batch 8
    result["peak_rss_gib"] = peak_rss_gib()  # before the checks below, which hold a prompt's logits
    if args.phase == "nanoseek-fp32":  # how close to a tie fp32's picks are, on its own text
        result["margins"] = [m for prompt, tokens in zip(batch_prompts, result["greedy_agree"])
                             for m in top2_margins(llm.model, prompt, tokens)]
    if args.reference:  # bf16, int8: its next-token choice on fp32's greedy text, position by position
        reference = json.loads(Path(args.reference).read_text())["greedy_agree"]
        result["teacher_forced_agree"] = teacher_forced(llm.model, batch_prompts, reference)
    return result


def timed_decode(generate, batch: int, n: int, clock) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of `generate(batch, n)`: n tokens minus a 1-token run (the prefill), over the
    n - 1 decode steps; and the tokens of the n-token run."""
    t = clock()
    generate(batch, 1)
    prefill = clock() - t
    t = clock()
    tokens = generate(batch, n)
    total = clock() - t
    return batch * (n - 1) / max(total - prefill, 1e-9), tokens


PAIRED = ("int8", "fp16")


def paired_speed(args) -> dict:
    """int8 and fp16 against fp32 timed in turn in one process (the three models loaded: about 17 GB
    for the 1.5B):
    on a machine whose memory bandwidth moves from minute to minute (a shared VM), separate processes
    minutes apart see different machines; alternating the two, `--paired N` rounds per batch size,
    gives each round's ratio on the same machine state and the median of them."""
    import torch

    import nanoseek
    from nanoseek.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    batch_prompts = prompts(args, SHAPES[args.shape]["vocab_size"])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    engines = {q or "fp32": nanoseek.LLM(args.dir, max_num_seqs=8, max_model_len=args.prompt_len + args.decode_tokens + 8,
                                         enable_prefix_caching=False, device="cpu", quantize=q)
               for q in (None, *PAIRED)}

    def decode_rate(llm, batch: int) -> float:
        def generate(batch: int, n: int):
            return llm.generate(batch_prompts[:batch], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return timed_decode(generate, batch, args.decode_tokens, clock)[0]

    result = {}
    for batch in (1, 8):
        for llm in engines.values():
            decode_rate(llm, batch)  # warm-up
        rounds = [{name: decode_rate(llm, batch) for name, llm in engines.items()} for _ in range(args.paired)]
        ratios = {q: [r[q] / r["fp32"] for r in rounds] for q in PAIRED}
        result[f"b{batch}"] = {"rounds": rounds, "ratios": ratios,
                               "median_ratio": {q: statistics.median(x) for q, x in ratios.items()}}
    return result


def next_token_logits(model, prompt: list[int], tokens: list[int]):
    """The model's logits (len(tokens), V) for each of `tokens`, fed prompt + tokens (teacher-forced)."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].float()


def top2_margins(model, prompt: list[int], tokens: list[int]) -> list[float]:
    top2 = next_token_logits(model, prompt, tokens).topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def teacher_forced(model, prompts_: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions where the model's next token on the reference text is the reference's."""
    same = total = 0
    for prompt, tokens in zip(prompts_, reference):
        picks = next_token_logits(model, prompt, tokens).argmax(dim=-1).tolist()
        same, total = same + sum(a == b for a, b in zip(picks, tokens)), total + len(tokens)
    return same / total


def trained_agreement(args) -> dict:
    """fp32 vs bf16, fp16 and each int8 (head in int8 and in float) on each trained checkpoint, prompts
    sampled from the model (in one process: they are small)."""
    import torch

    import nanoseek
    from nanoseek.inference.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    results = {}
    for path in args.trained:
        fp32 = nanoseek.LLM(path, max_num_seqs=8, enable_prefix_caching=False, device="cpu", dtype="float32")
        bos = fp32.model.config.bos_token_id or 0
        prompt_list = [[bos] + o.outputs[0].token_ids for o in fp32.generate(
            [[bos]] * 8, [SamplingParams(temperature=1.0, max_tokens=args.prompt_len - 1, ignore_eos=True, seed=i)
                          for i in range(8)])]
        greedy = SamplingParams(temperature=0, max_tokens=args.agree_tokens, ignore_eos=True)
        reference = [o.outputs[0].token_ids for o in fp32.generate(prompt_list, greedy)]
        margins = [m for p, t in zip(prompt_list, reference) for m in top2_margins(fp32.model, p, t)]
        result = {"margins": margins, "tied_head": fp32.model.config.tie_word_embeddings}
        for variant in TRAINED_VARIANTS:
            if variant == "bf16":
                llm = nanoseek.LLM(path, max_num_seqs=8, enable_prefix_caching=False, device="cpu", dtype="bfloat16")
            else:
                llm = nanoseek.LLM(quantized(path, *split_variant(variant)), max_num_seqs=8, enable_prefix_caching=False)
            out = [o.outputs[0].token_ids for o in llm.generate(prompt_list, greedy)]
            agree, prefixes = agreement(reference, out)
            result[variant] = {"agree": agree, "prefixes": prefixes,
                               "teacher_forced_agree": teacher_forced(llm.model, prompt_list, reference)}
        results[str(path)] = result
    return results


TRAINED_VARIANTS = ("bf16", "fp16", "int8-quantized-head", "int8-float-head", "int8-dynamic-quantized-head",
                    "int8-dynamic-float-head")


def split_variant(name: str) -> tuple[str, bool | None]:
    """"int8-dynamic-float-head" -> ("int8-dynamic", False): the rest of the name, and whether the
    output head is quantized (None: as nanoseek's default for the method)."""
    for suffix, head in HEADS.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), head
    return name, None


def set_head(head: bool) -> tuple[str, ...]:
    """Make quantization convert an untied output head (head) or leave it in float, whatever
    nanoseek's default; returns the FLOAT_LAYERS it replaced."""
    import nanoseek.device

    old = nanoseek.device.FLOAT_LAYERS
    nanoseek.device.FLOAT_LAYERS = tuple(n for n in old if n != "lm_head") + (() if head else ("lm_head",))
    return old


def quantized(path, method: str, head: bool | None):
    """`load_model(path, quantize=method)` with the output head quantized (head) or left in float. On
    a tied head, which nanoseek leaves in float, a quantized head is an untied quantized copy of it."""
    import torch.nn as nn

    import nanoseek.device
    from nanoseek.checkpoint import load_model

    old = set_head(head) if head is not None else None
    try:
        model = load_model(path, quantize=method)
    finally:
        if old is not None:
            nanoseek.device.FLOAT_LAYERS = old
    if head and type(model.lm_head) is nn.Linear:
        copy = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        copy.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.lm_head = nanoseek.device.quantize_linear(copy, method)
    return model


# ------------------------------------------------------------------ driver


def subprocess_phase(args, phase: str, reference: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--dir", str(args.dir), "--threads", str(args.threads),
           "--shape", args.shape, "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
           "--agree-tokens", str(args.agree_tokens), "--repeats", str(args.repeats), "--clock", args.clock,
           "--paired", str(args.paired)]
    if args.trained:
        cmd += ["--trained", *map(str, args.trained)]
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--clock", default=None, choices=("cpu", "wall"),
                        help="decode timing: the process's CPU time (default on 1 thread) or wall-clock time "
                             "(default on more)")
    parser.add_argument("--repeats", type=int, default=3, help="decode timings per batch size (the median is kept)")
    parser.add_argument("--trained", type=Path, nargs="+", default=None,
                        help="trained checkpoints to also measure agreement with fp32 on: bf16, fp16, int8 and "
                             "int8-dynamic, each with the head quantized and in float (small: one process)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens per timed generation")
    parser.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared against fp32")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="only time int8 and fp16 against fp32, in turn in one process, N rounds per batch size")
    parser.add_argument("--phase", default=None, choices=("make", "trained", "paired", *ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu adds up the CPU time of every thread: use it with --threads 1 (or --clock wall)")
    args.shape = args.shape or ("small" if args.small else "1.5b")
    args.dir = args.dir or Path(f"/tmp/nanoseek-r1-distill-{args.shape}-shape")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "make":
        print(json.dumps(make_checkpoint(args)))
        return
    if args.phase == "trained":
        print(json.dumps(trained_agreement(args)))
        return
    if args.phase == "paired":
        print(json.dumps(paired_speed(args)))
        return
    if args.phase:
        print(json.dumps(run_engine(args)))
        return

    if not (args.dir / "config.json").exists() or not args.paired:  # the checkpoint and the transformers engine
        require("transformers")
    if not (args.dir / "config.json").exists():
        t = time.perf_counter()
        n = subprocess_phase(args, "make")["parameters"]
        count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        print(f"made {args.dir}: {count} random bf16 parameters in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1024**3
    if args.paired:
        paired = subprocess_phase(args, "paired")
        print(f"{cpu_name()}, {args.threads} thread(s), {args.clock} clock: {' and '.join(PAIRED)} / fp32 decode "
              f"speed, {args.paired} rounds in turn in one process")
        for batch, r in paired.items():
            for q in PAIRED:
                print(f"batch {batch[1:]}, {q}: rounds {' '.join(f'{x:.2f}' for x in r['ratios'][q])}; median "
                      f"{r['median_ratio'][q]:.2f}x (fp32 {statistics.median(x['fp32'] for x in r['rounds']):.2f}, "
                      f"{q} {statistics.median(x[q] for x in r['rounds']):.2f} tok/s)")
        if args.json:
            args.json.write_text(json.dumps({"paired": paired, "cpu": cpu_name(), "threads": args.threads,
                                             "clock": args.clock}, indent=2))
        return
    results = {}
    for phase in ENGINES:
        print(f"running {phase} ...", file=sys.stderr, flush=True)
        reference = results.get("nanoseek-fp32") if phase in COMPARED else None
        results[phase] = subprocess_phase(args, phase, reference)
    trained = subprocess_phase(args, "trained") if args.trained else None

    tf, before, fp32 = results["transformers-fp32"], results["nanoseek-fp32-unpacked"], results["nanoseek-fp32"]
    n_ref = min(len(tf["greedy_b1"]), len(fp32["greedy_b1"]))
    vs_hf = sum(a == b for a, b in zip(tf["greedy_b1"], fp32["greedy_b1"]))
    clock = "CPU time (time.process_time)" if args.clock == "cpu" else "wall-clock time"
    print(f"\n{cpu_name()}, {args.threads} thread(s), torch {__import__('torch').__version__}; "
          f"{args.shape} Qwen2 shapes, {f'{size:.2f} GiB' if size >= 1 else f'{size * 1024:.1f} MiB'} of bf16 "
          f"safetensors; prompts of {args.prompt_len} tokens, "
          f"{args.decode_tokens} generated per timing; decode timed by {clock}, median of {args.repeats}\n")
    print("| engine | load s | peak RSS GiB | decode tok/s, batch 1 | decode tok/s, batch 8 |")
    print("|---|---|---|---|---|")
    for e in ENGINES:
        r = results[e]
        print(f"| {e} | {r['load_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['decode_tok_s_b1']:.2f} | "
              f"{r['decode_tok_s_b8']:.2f} |")
    ratios = {
        "nanoseek fp32 / transformers, batch 1 (target >= 1.0)": fp32["decode_tok_s_b1"] / tf["decode_tok_s_b1"],
        "nanoseek fp32 / transformers, batch 8 (target >= 1.5)": fp32["decode_tok_s_b8"] / tf["decode_tok_s_b8"],
        "nanoseek fp32 unpacked (before) / transformers, batch 1": before["decode_tok_s_b1"] / tf["decode_tok_s_b1"],
        "nanoseek fp32 unpacked (before) / transformers, batch 8": before["decode_tok_s_b8"] / tf["decode_tok_s_b8"],
        "nanoseek fp32 / transformers, peak memory": fp32["peak_rss_gib"] / tf["peak_rss_gib"],
        "nanoseek fp32 / transformers, load time": fp32["load_s"] / tf["load_s"],
    }
    for e in COMPARED:
        r = results[e]
        target = lambda t: f" (target {t})" if e == "nanoseek-int8" else ""  # noqa: E731 (issue 15's targets)
        ratios.update({
            f"{e} / nanoseek fp32, batch 1{target('>= 1.5')}": r["decode_tok_s_b1"] / fp32["decode_tok_s_b1"],
            f"{e} / nanoseek fp32, batch 8": r["decode_tok_s_b8"] / fp32["decode_tok_s_b8"],
            f"{e} / nanoseek fp32, peak memory{target('<= 0.6')}": r["peak_rss_gib"] / fp32["peak_rss_gib"],
            f"{e} greedy agrees with fp32 (8 prompts x {args.agree_tokens} tokens){target('>= 0.90')}":
                agreement(fp32["greedy_agree"], r["greedy_agree"])[0],
            f"{e} teacher-forced: its next token on fp32's greedy text is fp32's": r["teacher_forced_agree"],
        })
    for method, (q, f) in HEAD_PAIRS.items():  # what quantizing the output head gives
        ratios.update({f"{method}, quantized head / float head, batch {b}":
                       results[q][f"decode_tok_s_b{b}"] / results[f][f"decode_tok_s_b{b}"] for b in (1, 8)})
        ratios[f"{method}, quantized head / float head, peak memory"] = \
            results[q]["peak_rss_gib"] / results[f]["peak_rss_gib"]
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for e in COMPARED:
        print(f"{e} vs fp32, tokens before the first difference per prompt: "
              f"{agreement(fp32['greedy_agree'], results[e]['greedy_agree'])[1]}")
    print(f"fp32's top-1 minus top-2 logit on its own greedy text: {quantiles(fp32['margins'])}")
    print(f"nanoseek fp32 greedy equals transformers' on {vs_hf}/{n_ref} tokens (prompt 0, batch 1)")
    for path, result in (trained or {}).items():
        print(f"\ntrained checkpoint {path} ({'tied' if result['tied_head'] else 'untied'} head): "
              f"fp32's top-1 minus top-2 logit: {quantiles(result['margins'])}")
        for e in TRAINED_VARIANTS:
            t = result[e]
            print(f"  {e}: greedy agrees with fp32 on {t['agree']:.2f} of 8 x {args.agree_tokens} positions "
                  f"(first difference per prompt {t['prefixes']}); teacher-forced {t['teacher_forced_agree']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "trained": trained,
                                         "cpu": cpu_name(), "threads": args.threads, "clock": args.clock},
                                        indent=2))


def quantiles(values: list[float]) -> str:
    import torch

    q = torch.tensor(values).quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])).tolist()
    return "10% {:.3f}, 25% {:.3f}, median {:.3f}, 75% {:.3f}, 90% {:.3f}".format(*q)


if __name__ == "__main__":
    main()
