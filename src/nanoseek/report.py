"""The speedrun's report card: `OUT/report.md`, its PNG plots, and a summary table.

Every number is read from what the stages themselves wrote, never recomputed another way: eval's
and info's JSON (`OUT/results/*.json`, their last printed line), the training runs' metrics.jsonl
and checkpoint counters (tokens trained), the engine benchmark's and the serving check's JSON, the
GRM's grm_report.json, and the speedrun's own stage times and environment (`OUT/speedrun.json`; the
environment as the speedrun started, so rewriting a card does not restamp its git commit or load).
FLOPs are the one estimate: tokens trained x `nanoseek.info.training_flops_per_token` (6 per
activated weight plus attention; 6 per weight for a dense student).

    python -m nanoseek.report OUT      # rewrite the report of a speedrun directory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# what reading a stage output of another form raises (a field missing, renamed or of another type)
UNREADABLE = (KeyError, TypeError, ValueError, IndexError, AttributeError)
TRAINING = ("pretrain_small", "pretrain_nobias", "pretrain_reasoning", "rl", "control", "student", "distill")


@dataclass
class Report:
    path: Path
    summary: object  # a rich Table


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _section(lines: list[str], title: str):
    """One section of the card, built from the stages' outputs. An output in a form this version
    does not read (a stage kept from a run of another nanoseek version: a field renamed or gone)
    costs that section one line saying so, not the whole card at the end of a long run."""
    start = len(lines)
    try:
        yield
    except UNREADABLE as e:
        del lines[start:]
        lines += [f"## {title}", "", f"Not shown: a stage output this section reads is not in the form this "
                  f"nanoseek writes ({type(e).__name__}: {e}); run its stage again (delete its result) and "
                  "`python -m nanoseek.report` the directory.", ""]


def _records(run: Path) -> list[dict]:
    from nanoseek.train.metrics import read_metrics

    return read_metrics(run) if (run / "metrics.jsonl").is_file() else []


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def environment() -> dict:
    """What two report cards need in common to be compared; the speedrun records it in speedrun.json
    as it starts, so that the card shows what the run ran on, not what a later rewrite finds."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + (" (with uncommitted changes)" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "git commit": commit,
            "load average (1 min) at the start": round(os.getloadavg()[0], 2)}


def training_cost(out: Path, name: str) -> dict | None:
    """Tokens trained (the run's checkpoint counters) and estimated training FLOPs of a run."""
    from nanoseek.train.checkpointing import STATE_DIR, STATE_FILE, find_checkpoint, list_checkpoints

    if not list_checkpoints(out / name):
        return None
    import torch

    checkpoint = find_checkpoint(out / name)
    state = torch.load(checkpoint / STATE_DIR / STATE_FILE, map_location="cpu", weights_only=True)
    tokens = state["counters"]["tokens_seen"]
    run_config = json.loads(state["config"])
    from nanoseek.checkpoint import load_config

    config = load_config(checkpoint)
    flops = None
    try:
        from nanoseek.config import ModelConfig
        from nanoseek.info import training_flops_per_token

        if isinstance(config, ModelConfig):
            flops = tokens * training_flops_per_token(config, run_config.get("seq_len", 256),
                                                      mtp=run_config.get("mtp_lambda", 0) > 0)
        else:
            from nanoseek.checkpoint import load_model

            flops = tokens * 6 * sum(p.numel() for p in load_model(checkpoint).parameters())
    except Exception:  # an estimate only: never let it break the report
        pass
    return {"tokens": tokens, "flops": flops, "steps": state["step"], "train_time": state["counters"]["train_time"]}


def tokenizer_trained_on(directory: Path) -> str | None:
    """What a tokenizer was trained on, from the record `nanoseek tokenizer train` wrote beside it
    (the plan's wording is for the full run; --tiny trains on another corpus). None without one."""
    from nanoseek.tokenizer import TRAINING_DATA

    record = _json(directory / TRAINING_DATA)
    if not record:
        return None
    sources = " + ".join(f"{name} ({s['documents']:,} documents)" for name, s in record["sources"].items())
    return f"byte-level BPE ({record['vocab_size']} ids) of {sources}"


def write_report(out: Path, stages, state: dict, tiny: bool = False) -> Report:
    from rich.table import Table

    from nanoseek import plots

    out = Path(out)
    st = state.get("stages", {})
    results = {p.stem: _json(p) for p in sorted((out / "results").glob("*.json"))}
    ev = {k.removeprefix("eval_"): v for k, v in results.items() if k.startswith("eval_") and v}
    lines = [f"# nanoseek speedrun{' --tiny' if tiny else ''}", ""]
    shown = os.path.relpath(out) if out.resolve().is_relative_to(Path.cwd()) else out  # no home paths in a shared card
    lines += [f"Written {time.strftime('%Y-%m-%d %H:%M')} from `{shown}`; speedrun wall time "
              f"{_duration(state.get('wall_seconds'))} over all its runs. Every number below is read from the "
              "stages' own outputs (see `nanoseek/report.py`); logs are in `logs/`.", ""]
    if tiny:
        lines += ["**--tiny**: every stage at toy size (a few steps, a synthetic corpus); the numbers only show "
                  "that the pipeline runs.", ""]

    # ---- stages
    lines += ["## Stages", "", "| stage | status | wall | CPU | recipe | what |", "|---|---|---|---|---|---|"]
    for s in stages:
        r = st.get(s.name, {})
        status = r.get("status", "not run")
        if status == "skipped":
            status = f"skipped: {r.get('reason', '')}"
        elif status == "failed":
            status = f"**failed** (exit {r.get('exit_status')}, logs/{s.name}.log)"
        what = (s.name == "tokenizer" and tokenizer_trained_on(out / "tokenizer")) or s.what
        lines.append(f"| {s.name} | {status} | {_duration(r.get('seconds'))} | {_duration(r.get('cpu_seconds'))} | "
                     f"{s.variant} | {what} |")
    lines.append("")

    # ---- cost
    total_flops, uncounted = 0.0, []
    with _section(lines, "Cost"):
        lines += ["## Cost", "", "| run | steps | tokens trained | FLOPs (estimated) | wall |", "|---|---|---|---|---|"]
        for name in TRAINING:
            c = training_cost(out, name)
            if c:
                total_flops += c["flops"] or 0
                tokens = f"{c['tokens']:,}" if c["tokens"] else "not counted"
                if not c["tokens"]:
                    uncounted.append(name)
                lines.append(f"| {name} | {c['steps']} | {tokens} | {_num(c['flops']) if c['flops'] else ''} | "
                             f"{_duration(st.get(name, {}).get('seconds'))} |")
        lines.append(f"| **total** | | | {_num(total_flops)} | |")
        if uncounted:  # RL: its cost is mostly sampling, which no token counter sees
            lines += ["", f"The total leaves out {', '.join(uncounted)}: no trained-token count (RL's cost is mostly "
                          "its rollouts' sampling); the wall column has its time."]
        lines.append("")
        models = [(k.removeprefix("info_"), v) for k, v in results.items() if k.startswith("info_") and v]
        if models:
            lines += ["| model | parameters | activated per token | MTP | MLA cache / token "
                      "| multi-head cache / token |",
                      "|---|---|---|---|---|---|"]
            for name, m in models:
                lines.append(f"| {name} | {m['total_params']:,} | {m['active_params']:,} | {m['mtp_params']:,} | "
                             f"{m['mla_cache_bytes_per_token']:,} B | {m['mha_cache_bytes_per_token']:,} B "
                             f"({m['mla_vs_mha']:.1f}x) |")
            lines += ["", f"(cache bytes over all layers at {models[0][1]['dtype_bytes']} bytes a value, from "
                      "`nanoseek info --json`)", ""]

    # ---- pretraining
    with _section(lines, "Pretraining"):
        runs = {n: _records(out / n) for n in ("pretrain_small", "pretrain_reasoning")}
        runs = {n: r for n, r in runs.items() if r}
        if runs:
            lines += ["## Pretraining", ""]
            plots.loss_figure(runs, out / "pretrain_loss.png")
            lines += ["![pretraining loss](pretrain_loss.png)", "", "| run | final loss | final MTP loss | val loss | "
                      "unigram baseline |", "|---|---|---|---|---|"]
            for n, r in runs.items():
                last = lambda k: (plots.series(r, k)[1] or [None])[-1]  # noqa: E731
                first = lambda k: (plots.series(r, k)[1] or [None])[0]  # noqa: E731
                fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
                lines.append(f"| {n} | {fmt(last('loss'))} | {fmt(last('mtp_loss'))} | {fmt(last('val_loss'))} | "
                             f"{fmt(first('unigram_val_loss'))} |")
            lines.append("")
            load = {f"{n} (bias update)" if n == "pretrain_small" else f"{n} (no bias update)": _records(out / n)
                    for n in ("pretrain_small", "pretrain_nobias")}
            load = {n: r for n, r in load.items() if plots.series(r, "imbalance")[0]}
            if load:
                plots.expert_load_figure(load, out / "expert_load.png")
                horizon = min(max(plots.series(r, "imbalance")[0]) for r in load.values())
                lines += ["![expert load](expert_load.png)", "",
                          f"Expert load max/mean (worst MoE layer), mean over steps {max(1, horizon - 19)}-{horizon} "
                          "(the same steps of both runs): "
                          + "; ".join(f"{n} {_mean_between(r, horizon - 19, horizon):.2f}"
                                      for n, r in load.items()), ""]

    # ---- R1-Zero
    with _section(lines, "R1-Zero"):
        if any(k in ev for k in ("pretrain_reasoning", "rl", "control")):
            lines += ["## R1-Zero", ""]
            rl_records = _records(out / "rl")
            if rl_records and any("eval_pass@1" in r for r in rl_records):
                control = (ev.get("control") or {}).get("pass@1")
                plots.r1zero_figure(rl_records, out / "r1zero.png", control)
                lines += ["![R1-Zero](r1zero.png)", ""]
            lines += ["| model | held-out pass@1 | reasoning share | mean length (tokens) | wall |",
                      "|---|---|---|---|---|"]
            for key, label in (("pretrain_reasoning", "base"), ("pretrain_reasoning_prefill", "base, chain forced"),
                               ("rl", "+ R1-Zero RL"), ("control", "+ control (pretraining, RL's wall time)")):
                e = ev.get(key)
                if e:
                    wall = st.get(key, {}).get("seconds") if key in ("rl", "control") else None
                    lines.append(f"| {label} | {_pct(e['pass@1'])} | {_pct(e['reasoning'])} | {e['mean_length']:.1f} | "
                                 f"{_duration(wall)} |")
            n = next(iter(ev.values()))
            lines += ["", f"(`nanoseek eval --task {n['task']} --n {n['n']} --seed {n['seed']}`, greedy)", ""]

    # ---- distillation
    with _section(lines, "Distillation"):
        if any(k in ev for k in ("student", "distill")):
            lines += ["## Distillation", "", "| model | held-out pass@1 | reasoning share | mean length |",
                      "|---|---|---|---|"]
            for key, label in (("rl", "teacher (R1-Zero model)"), ("student", "student before"),
                               ("distill", "student after distillation")):
                e = ev.get(key)
                if e:
                    lines.append(f"| {label} | {_pct(e['pass@1'])} | {_pct(e['reasoning'])} | {e['mean_length']:.1f} |")
            summary = _json(out / "distill" / "traces.summary.json")
            if summary and "rows" in summary:
                lines += ["", f"{summary['rows']:,} verified traces (`distill/traces.jsonl`)."]
            lines.append("")

    # ---- GRM
    grm = _json(out / "grm" / "grm_report.json")
    with _section(lines, "Generative reward model"):
        lines += ["## Generative reward model", ""]
        if grm:
            if (out / "grm" / "grm_scaling.png").is_file():  # the grm stage draws its own figure
                lines += ["![GRM scaling](grm/grm_scaling.png)", ""]
            ks = sorted(grm.get("voting") or {}, key=int)
            lines += [f"{grm.get('items')} held-out items; parse rate {_pct(grm.get('parse_rate'))}; "
                      f"one sample {_pct(grm.get('single_sample'))}.", "",
                      "| k | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
                      "| Voting@k | " + " | ".join(_pct(grm["voting"][k]) for k in ks) + " |",
                      "| MetaRM@k | " + " | ".join(_pct((grm.get("meta") or {}).get(k)) for k in ks) + " |", ""]
            if grm.get("ablations"):
                lines += ["Ablations: " + ", ".join(f"{k} {_pct(v)}" for k, v in grm["ablations"].items()) + ".", ""]
            best = grm.get("best_of_n") or {}
            n = best.get("n", 8)
            lines += [f"Best-of-{n} on {best.get('questions')} held-out questions: the policy's pass@1 "
                      f"{_pct(best.get('policy_pass1'))}, maj@{n} {_pct(best.get(f'maj@{n}'))}, "
                      f"GRM@{n} {_pct(best.get(f'grm@{n}'))}.", ""]
        else:
            lines += [f"Not run: {st.get('grm', {}).get('reason', 'no grm/grm_report.json')}.", ""]

    # ---- engine and serving
    with _section(lines, "Engine and serving"):
        engine, serve = results.get("engine"), results.get("serve")
        lines += ["## Engine and serving", ""]
        if engine:
            lines += ["| batch | prompt | nanoseek tok/s | transformers tok/s | ratio |", "|---|---|---|---|---|"]
            for r in engine["results"]:
                lines.append(f"| {r['batch']} | {r['prompt_len']} | {r['nanoseek_tokens_per_s']:.1f} | "
                             f"{r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f}x |")
            lines += ["", f"Decode tokens/s ({engine['new_tokens']} new tokens, greedy, {engine['device']}, "
                      f"`benchmarks/generate_throughput.py` on pretrain_small); KV cache per token: latent "
                      f"{engine['latent_bytes_per_token']} B against multi-head {engine['mha_bytes_per_token']} B.", ""]
        else:
            lines += [f"Engine: not run ({_not_run_reason(st, 'engine')}).", ""]
        if serve:
            lines += [f"Serving (`nanoseek serve` of the R1-Zero model, official `openai` client, {serve['requests']} "
                      f"streaming requests, {serve['concurrency']} at a time, up to {serve['max_tokens']} tokens): "
                      f"**{serve['requests_per_s']} requests/s**, time to first token p50 {serve['ttft_p50_ms']} ms, "
                      f"p99 {serve['ttft_p99_ms']} ms, {serve['generated_tokens_per_s']} tokens/s; "
                      f"{serve['with_reasoning']} of {serve['requests']} answers carried `reasoning_content`.", ""]
            b = serve.get("browser") or {}
            if b.get("skipped"):
                lines += [f"Chat page in a browser: skipped ({b['skipped']}).", ""]
            elif b:
                lines += [f"Chat page in headless Chromium: the answer streamed in {b['updates']} updates; reasoning "
                          f"shown apart: {'yes' if b['reasoning_shown_apart'] else 'no'}.", "",
                          "![chat page](chat.png)", ""]
        else:
            lines += [f"Serving: not run ({_not_run_reason(st, 'serve')}).", ""]

    # ---- environment
    env = state.get("environment")  # recorded as the speedrun started
    if not env:  # a run from before speedrun.json recorded it: read now, and said so
        env = {k.removesuffix(" at the start"): f"{v} (at report time)" for k, v in environment().items()}
    lines += ["## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["| threads | 1 per stage, stages two at a time; timing stages (engine, serve) alone on 2 |", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")

    # ---- the summary table
    table = Table(title="nanoseek speedrun" + (" --tiny" if tiny else ""))
    for col in ("stage", "status", "wall", "CPU", "result"):
        table.add_column(col)
    for s in stages:
        r = st.get(s.name, {})
        table.add_row(s.name, r.get("status", "not run") + (f": {r['reason']}" if r.get("status") == "skipped" else ""),
                      _duration(r.get("seconds")), _duration(r.get("cpu_seconds")), _headline(s.name, out, results, ev, grm))
    table.add_row("total", "", _duration(state.get("wall_seconds")), "", f"{_num(total_flops)} FLOPs trained")
    return Report(path, table)


def _not_run_reason(stages: dict, name: str) -> str:
    record = stages.get(name, {})
    return record.get("reason", record.get("status", ""))


def _mean_between(records: list[dict], lo: int, hi: int) -> float:
    values = [r["imbalance"] for r in records if "imbalance" in r and lo <= r["step"] <= hi]
    return sum(values) / len(values) if values else float("nan")


def _headline(name: str, out: Path, results: dict, ev: dict, grm: dict | None) -> str:
    """The stage's main number for the summary table ('' if its output is in another form)."""
    try:
        return _stage_headline(name, out, results, ev, grm)
    except UNREADABLE:
        return ""


def _stage_headline(name: str, out: Path, results: dict, ev: dict, grm: dict | None) -> str:
    from nanoseek.plots import series

    if name.startswith("eval_") and ev.get(name[5:]):
        return f"pass@1 {_pct(ev[name[5:]]['pass@1'])}"
    if name.startswith("info_") and results.get(name):
        m = results[name]
        return f"{_num(m['total_params'])} params, {_num(m['active_params'])} active, MLA {m['mla_vs_mha']:.1f}x smaller"
    if name == "rl":  # its loss says nothing; its held-out pass@1 (logged every eval_every steps) does
        vals = series(_records(out / name), "eval_pass@1")[1]
        return f"held-out pass@1 {_pct(vals[-1])} (its own eval set)" if vals else ""
    if name in TRAINING:
        records = _records(out / name)
        vals = series(records, "val_loss")[1] or series(records, "loss")[1]
        return f"loss {vals[-1]:.3f}" if vals else ""
    if name == "engine" and results.get("engine"):
        r = results["engine"]["results"][0]
        return f"{r['nanoseek_tokens_per_s']:.0f} tok/s, {r['ratio']:.2f}x transformers (batch {r['batch']})"
    if name == "serve" and results.get("serve"):
        s = results["serve"]
        return f"{s['requests_per_s']} req/s, TTFT p50 {s['ttft_p50_ms']} ms"
    if name == "grm" and grm:
        best = grm.get("best_of_n") or {}
        k = "8" if "8" in grm["voting"] else max(grm["voting"], key=int)  # Voting@8, or the largest k run (--tiny: 4)
        n = best.get("n", 8)
        return (f"Voting@{k} {_pct(grm['voting'][k])}, best-of-{n} {_pct(best.get(f'grm@{n}'))} "
                f"vs maj@{n} {_pct(best.get(f'maj@{n}'))}")
    return ""


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from nanoseek.speedrun import STATE_FILE, plan

    parser = argparse.ArgumentParser(prog="python -m nanoseek.report",
                                     description="Rewrite the report card (report.md) of a speedrun directory.")
    parser.add_argument("out", nargs="?", default="runs/speedrun", help="the speedrun's --out directory")
    out = Path(parser.parse_args(argv).out).resolve()
    state = _json(out / STATE_FILE)
    if not isinstance(state, dict):  # a wrong directory (or none given): one line, as the CLI's errors are
        print(f"python -m nanoseek.report: error: no readable {out / STATE_FILE}; name the --out directory "
              "of a `nanoseek speedrun`", file=sys.stderr)
        return 2
    report = write_report(out, plan(out, state.get("tiny", False)), state, tiny=state.get("tiny", False))
    Console().print(report.summary)
    print(report.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
