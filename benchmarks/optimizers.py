"""Muon against AdamW: one pretraining recipe, the same data, steps and seed; only the optimizer
settings change between runs.

    python benchmarks/optimizers.py [--config configs/pretrain_small.toml] [--out runs/optimizers] [--jobs 2]
    python benchmarks/optimizers.py --run adamw: --run muon:optimizer=muon --run "muon_6e-3:optimizer=muon lr=6e-3"

Each `--run NAME:OVERRIDES` is `nanoseek pretrain --config CONFIG out_dir=OUT/NAME threads=1
sample_every=0 OVERRIDES`, `--jobs` of them at a time, one thread each; the first run is the
baseline. A run whose final checkpoint exists is read, not run again. Per run the report gives
the validation loss at every evaluation, the last one's difference from the baseline's, the steps
the run took to reach the baseline's final validation loss (linear between evaluations: the
baseline's steps over these is the speed-up in steps), and the mean time of a training step
(comparable between runs only with --jobs 1 on an idle machine). It writes OUT/optimizers.json
and OUT/optimizers.png (validation and training loss against step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanoseek.plots import _pyplot, series
from nanoseek.train.checkpointing import list_checkpoints
from nanoseek.train.config import load_run_config
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig

DEFAULT_RUNS = ["adamw:", "muon:optimizer=muon"]


def parse_run(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name:
        sys.exit(f"--run {text!r}: expected NAME:OVERRIDES, e.g. 'muon:optimizer=muon lr=6e-3'")
    return name, overrides.split()


def train(config: str, out: Path, name: str, overrides: list[str]) -> Path:
    """Run one pretraining (unless its final checkpoint is there); returns its directory."""
    run_dir = out / name
    args = [f"out_dir={run_dir}", "threads=1", "sample_every=0", *overrides]
    cfg = load_run_config(PretrainConfig, config, args)
    done = any(p.name == f"checkpoint-{cfg.max_steps}" for p in list_checkpoints(run_dir)) if run_dir.is_dir() else False
    if not done:
        resume = ["--resume"] if run_dir.is_dir() and list_checkpoints(run_dir) else []
        print(f"{name}: training ({' '.join(overrides) or 'the recipe as is'}), log in {run_dir}.log", flush=True)
        with open(f"{run_dir}.log", "a") as log:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            code = subprocess.run([sys.executable, "-m", "nanoseek.cli", "pretrain", "--config", config, *resume, *args],
                                  stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            sys.exit(f"{name}: nanoseek pretrain exited with {code}; see {run_dir}.log")
    return run_dir


def first_step_at(points: list[tuple[int, float]], target: float) -> float | None:
    """The (interpolated) step at which a falling validation curve first reaches `target`."""
    if points and points[0][1] <= target:
        return points[0][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def summarize(runs: dict[str, Path]) -> dict:
    report = {}
    for name, run_dir in runs.items():
        records = read_metrics(run_dir)
        _, step_times = series(records, "step_time_s")
        report[name] = {"val_loss": list(zip(*series(records, "val_loss"))),
                        "train_loss": list(zip(*series(records, "loss"))),
                        "step_time_s": sum(step_times) / max(1, len(step_times))}
    base_name = next(iter(report))
    base = report[base_name]
    target = base["val_loss"][-1][1]
    for name, r in report.items():
        reached = first_step_at(r["val_loss"], target)
        r["final_val_loss"] = r["val_loss"][-1][1]
        r["difference"] = r["final_val_loss"] - target
        r["steps_to_baseline_loss"] = reached
        r["step_speedup"] = base["val_loss"][-1][0] / reached if reached else None
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
    return {"baseline": base_name, "runs": report}


def figure(summary: dict, out: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in summary["runs"].items():
        steps, values = zip(*r["val_loss"])
        left.plot(steps[1:], values[1:], "o-", ms=3, lw=1, label=name)  # step 0 (ln V) would flatten the rest
        steps, values = zip(*r["train_loss"])
        window = 10
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        right.plot(steps, smooth, lw=1, label=name)
    left.set(xlabel="step", ylabel="validation loss (nats / token)", title="validation loss")
    right.set(xlabel="step", ylabel="training loss (mean of 10 steps)", title="training loss")
    right.set_ylim(top=min(6.0, right.get_ylim()[1]))
    for ax in (left, right):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pretrain_small.toml")
    ap.add_argument("--out", default="runs/optimizers")
    ap.add_argument("--run", action="append", help="NAME:OVERRIDES (repeatable; the first is the baseline)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once, one thread each")
    args = ap.parse_args()
    specs = [parse_run(text) for text in (args.run or DEFAULT_RUNS)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        dirs = list(pool.map(lambda spec: train(args.config, out, *spec), specs))
    summary = summarize(dict(zip([name for name, _ in specs], dirs)))
    (out / "optimizers.json").write_text(json.dumps(summary, indent=1) + "\n")

    base = summary["baseline"]
    evals = [s for s, _ in summary["runs"][base]["val_loss"]]
    print(f"\n{args.config}; validation loss at step {', '.join(map(str, evals))}")
    print(f"| run | overrides | validation loss | final vs {base} | steps to {base}'s final loss | "
          f"mean step time (vs {base}) |")
    print("|---|---|---|---|---|---|")
    for (name, overrides), r in zip(specs, summary["runs"].values()):
        reached = (f"{r['steps_to_baseline_loss']:.0f} ({r['step_speedup']:.2f}x fewer)"
                   if r["steps_to_baseline_loss"] else "not reached")
        print(f"| {name} | {' '.join(overrides) or '-'} | {' / '.join(f'{v:.3f}' for _, v in r['val_loss'][1:])} | "
              f"{r['difference']:+.3f} | {reached} | {r['step_time_s'] * 1000:.0f} ms ({r['step_time_ratio']:.2f}x) |")
    try:
        print(f"\nwrote {out / 'optimizers.json'} and {figure(summary, out / 'optimizers.png')}")
    except ImportError:
        print(f"\nwrote {out / 'optimizers.json'} (matplotlib is not installed: no figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
