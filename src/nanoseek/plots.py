"""The R1-Zero figure: held-out accuracy and mean response length against RL step, as a PNG.

    python -m nanoseek.plots runs/rl_r1zero_reasoning [--control 0.07] [--out fig.png]

`nanoseek rl` calls `save_r1zero_figure(out_dir)` when it ends, which reads the run's
`metrics.jsonl` and writes `r1zero.png` beside it: the toy-scale counterpart of the R1 paper's
Figures 2 and 3 (accuracy and response length rising together during RL). Left panel: held-out
greedy pass@1 and the share of held-out responses that reason (logged every `eval_every` steps),
with the sampled training accuracy and reasoning share per step; right panel: mean response length in tokens, held-out
and sampled. `control` marks the final held-out accuracy of the control run (the same base given
the same time of continued pretraining) as a dashed line.

The other figures are drawn here too: `grm_scaling_figure` (`nanoseek grm`'s grm_scaling.png:
accuracy against k) and, for the speedrun's report card, `loss_figure` (pretraining losses) and
`expert_load_figure` (max / mean expert load with and without the bias update).

matplotlib is optional (the `rl` extra lists it): without it the R1-Zero figure is skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from nanoseek.train.metrics import read_metrics

FIGURE_NAME = "r1zero.png"


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has `key`; a later record of the same step wins."""
    points = {r["step"]: r[key] for r in records if key in r and r[key] is not None}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def r1zero_figure(records: list[dict], out: str | Path, control: float | None = None,
                  title: str = "R1-Zero at toy scale") -> Path:
    """Draw the figure from metrics records into `out` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (acc_ax, len_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, acc = series(records, "acc")
    if steps:
        acc_ax.plot(steps, acc, color="tab:blue", alpha=0.3, lw=1, label="sampled accuracy by the rule checker (training)")
    steps, share = series(records, "reasoning")
    if steps:
        acc_ax.plot(steps, share, color="tab:green", alpha=0.3, lw=1, label="sampled share that reasons (training)")
    steps, judged = series(records, "reward_grm")  # under a generative RM the checker only watches:
    if steps:  # the two curves parting would be reward hacking
        acc_ax.plot(steps, judged, color="tab:purple", lw=1, label="GRM reward of the samples (training)")
    steps, acc = series(records, "eval_pass@1")
    acc_ax.plot(steps, acc, "o-", color="tab:blue", label="held-out greedy pass@1")
    steps, share = series(records, "eval_reasoning")
    if steps:
        acc_ax.plot(steps, share, "s--", color="tab:green", ms=4, label="held-out share that reasons")
    if control is not None:
        acc_ax.axhline(control, color="tab:red", ls=":", label=f"control (more pretraining): {control:.1%}")
    acc_ax.set(xlabel="RL step", ylabel="share", ylim=(-0.02, 1.02), title="accuracy")
    acc_ax.legend(fontsize=7, loc="best")

    steps, length = series(records, "len")
    if steps:
        len_ax.plot(steps, length, color="tab:orange", alpha=0.3, lw=1, label="sampled (training)")
    steps, length = series(records, "eval_length")
    len_ax.plot(steps, length, "o-", color="tab:orange", label="held-out greedy")
    len_ax.set(xlabel="RL step", ylabel="tokens", title="mean response length")
    len_ax.set_ylim(bottom=0)
    len_ax.legend(fontsize=8, loc="lower right")

    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # `--out figs/r1zero.png` from any directory
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_r1zero_figure(run_dir: str | Path, control: float | None = None) -> Path | None:
    """Write `r1zero.png` beside the run's metrics.jsonl; None (with a note) without matplotlib
    or without held-out evaluations to plot."""
    run_dir = Path(run_dir)
    if importlib.util.find_spec("matplotlib") is None:
        print("rl: matplotlib is not installed, so no r1zero.png (pip install -e '.[rl]')", file=sys.stderr)
        return None
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    if not any("eval_pass@1" in r for r in records):
        return None
    path = r1zero_figure(records, run_dir / FIGURE_NAME, control)
    print(f"rl: figure {path}", flush=True)
    return path


# ---------------------------------------------------------------- the speedrun's report card


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_figure(runs: dict[str, list[dict]], out: str | Path) -> Path:
    """Pretraining loss curves: per run, the training loss, the MTP loss and the validation loss."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, records) in zip(axes[0], runs.items()):
        for key, style, label in (("loss", "-", "next-token loss"), ("mtp_loss", "-", "MTP loss (depth 1)"),
                                  ("val_loss", "o--", "validation loss")):
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, style, ms=3, lw=1, label=label)
        steps, values = series(records, "unigram_val_loss")
        if values:
            ax.axhline(values[0], color="gray", ls=":", lw=1, label="unigram baseline")
        ax.set(xlabel="step", ylabel="nats / token", title=name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def expert_load_figure(runs: dict[str, list[dict]], out: str | Path) -> Path:
    """Expert load imbalance (max / mean tokens per routed expert, worst MoE layer) against step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, records in runs.items():
        steps, values = series(records, "imbalance")
        if steps:
            ax.plot(steps, values, lw=1, label=name)
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="perfect balance")
    ax.set(xlabel="step", ylabel="max / mean expert load", title="expert load")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def grm_scaling_figure(report: dict, out: str | Path, title: str = "DeepSeek-GRM at toy scale") -> Path:
    """The GRM's inference-time scaling (`nanoseek grm`'s grm_report.json): held-out accuracy
    against the number of sampled judgments k, for plain voting and meta-RM guided voting, with
    the ablations as horizontal lines. Raises ImportError without matplotlib."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = sorted(int(k) for k in report["voting"])
    ax.plot(ks, [report["voting"][str(k)] for k in ks], "o-", color="tab:blue", label="GRM Voting@k")
    meta_ks = sorted(int(k) for k in report.get("meta", {}))
    if meta_ks:
        ax.plot(meta_ks, [report["meta"][str(k)] for k in meta_ks], "s-", color="tab:red",
                label="GRM MetaRM@k (top k/2)")
    styles = ["--", ":", "-.", (0, (3, 1, 1, 1)), (0, (5, 2))]
    # the ablations at ablation_k, not their single-judgment "@1" (a substring test dropped "@16" too)
    for i, (name, value) in enumerate(sorted((n, v) for n, v in report.get("ablations", {}).items()
                                               if not n.endswith("@1") and "parse" not in n)):
        ax.axhline(value, color="gray", ls=styles[i % len(styles)], lw=1, label=f"{name}: {value:.1%}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="sampled judgments k (T = %.1f, shuffled)" % report.get("eval_temperature", 0.5),
           ylabel="accuracy (right response strictly highest)",
           title=f"{title}: {report['items']} held-out items")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoseek.plots", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="RL run directory (or its metrics.jsonl)")
    parser.add_argument("--control", type=float, help="the control's final held-out pass@1, marked as a line")
    parser.add_argument("--out", help=f"PNG path (default: {FIGURE_NAME} beside metrics.jsonl)")
    parser.add_argument("--title", default="R1-Zero at toy scale")
    args = parser.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / FIGURE_NAME
    print(r1zero_figure(read_metrics(run), out, args.control, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
