"""`nanoseek speedrun`: the whole recipe in one command, and its report card.

    nanoseek speedrun                       # everything, into runs/speedrun (22-40 min on 2 cores, by the day)
    nanoseek speedrun --tiny --out /tmp/sr  # every stage at toy size, in about a minute
    nanoseek speedrun --skip grm serve      # leave stages out (their dependents are skipped too)

Each stage is a `nanoseek` command (or a benchmark script) a user can run alone, with its recipe
file and the overrides listed in `plan()`; the speedrun runs them as subprocesses, up to `--jobs`
side by side (one thread each, two with --jobs 1; timing stages run alone), logs each one to
`OUT/logs/<stage>.log`, and shows the running stages with their progress bars and ETAs and the time
of those done.

Re-running the same command skips the stages that finished (a training stage is finished when its
run directory holds a checkpoint that reached max_steps; any other stage when its result file
exists) and resumes an interrupted training stage with `--resume`. Ctrl-C is safe at any point: it
reaches every running stage, the training stages save a checkpoint and exit 130, and the speedrun
writes its report of what is done and exits 130. SIGTERM (`kill PID`) does the same: the speedrun
passes it on to the running stages.

At the end `OUT/report.md` (`nanoseek.report`) gathers the stages' own outputs (metrics.jsonl, the
JSON that eval, info and the checks print, grm_report.json) into one report card with its plots,
and a summary table is printed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanoseek.checkpoint import atomic_write_text
from nanoseek.errors import NanoseekError, check_out_dir

REPO = Path(__file__).resolve().parents[2]  # configs/ and benchmarks/ (an editable install or a checkout)
STATE_FILE = "speedrun.json"
STEP_RE = re.compile(r"^step\s+(\d+)/(\d+)")


@dataclass
class Stage:
    """One stage of the speedrun: a command and how to tell it is done."""
    name: str
    what: str  # one line for the report
    argv: list[str] | Callable[["Runner"], list[str]]  # a callable gets the runner (the control's budget)
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    run_dir: str = ""  # a training stage: its run directory under OUT; done = a checkpoint that reached max_steps
    result: str = ""  # any other stage: its result file under OUT; done = the file exists
    json_stdout: bool = False  # the command prints its result as JSON on its last line: saved as `result`
    needs: tuple[str, ...] = ()  # python modules, "command:<name>" (a nanoseek subcommand), or a path under REPO
    exclusive: bool = False  # a timing: runs with no other stage beside it
    budget_of: str = ""  # stop it (Ctrl-C) once it has run as long as that stage did: the control
    variant: str = ""  # how it differs from its recipe, for the report

    def missing(self) -> str | None:
        """Why this stage cannot run on this machine, or None."""
        from nanoseek.cli import COMMANDS

        for need in self.needs:
            if need.startswith("command:"):
                if need[8:] not in COMMANDS:
                    return f"`nanoseek {need[8:]}` is not in this version (not in cli.COMMANDS)"
            elif "/" in need:
                if not (REPO / need).exists():
                    return f"{need} is not here (run the speedrun from a checkout of the repository)"
            elif importlib.util.find_spec(need) is None:
                return f"python package {need!r} is not installed (pip install -e '.[dev]')"
        return None


# ---------------------------------------------------------------- the plan


def reasoning_chat_template() -> str:
    """configs/pretrain_reasoning.toml's chat template, the digit-sum corpus's own prompt
    ("User: q\nAssistant: <think>"): the tiny reasoning base gets it too, so that serving its R1-Zero
    model splits reasoning_content as the full run's does. "" outside a checkout (its stages say what is missing)."""
    path = REPO / "configs" / "pretrain_reasoning.toml"
    return tomllib.loads(path.read_text())["chat_template"] if path.is_file() else ""


def plan(out: Path, tiny: bool = False, threads: int = 1) -> list[Stage]:
    """The speedrun's stages, in order; --tiny gives every stage toy sizes. Adding a stage is one
    entry here. Paths in the commands are under `out`; recipes are REPO/configs/*.toml."""
    cli = [sys.executable, "-m", "nanoseek.cli"]
    o = lambda *p: str(out.joinpath(*p))  # noqa: E731
    cfg = lambda name: str(REPO / "configs" / name)  # noqa: E731
    t = f"threads={threads}"
    if tiny:
        corpus = "synthetic:digit_sum?documents=1500&worked_share=0.35"
        base = [*cli, "pretrain", "--config", cfg("pretrain_tiny.toml"), f'data=["{corpus}"]', t]
        small = [*base, f"tokenizer={o('tokenizer')}"]
        reasoning = [*base, "vocab_size=320", "seq_len=64", "max_steps=60", "eval_every=30", "log_every=10",
                     f"chat_template={reasoning_chat_template()}"]
        rl_recipe = [*cli, "rl", "--config", cfg("rl_r1zero_tiny.toml"), "task=digit_sum", "max_steps=2", "eval_n=8",
                     "lr=5e-5"]
        student_docs, student = 300, [*cli, "sft", "--config", cfg("sft_tiny.toml"), "max_steps=4", t]
        distill_args = ["num_prompts=48", "samples_per_prompt=2", "temperature=0.3", "max_new_tokens=16",
                        "seq_len=64", "max_steps=2", "epochs=0", "batch_size=4", "eval_every=0"]
        evals = ["--n", "16", "--max-tokens", "16"]
        grm_config = "grm_tiny.toml"
        # the tiny reasoning base answers 10-digit questions, mostly wrong: fill_right puts a right answer
        # beside its samples so every question makes an item (configs/grm_tiny.toml is for a length-4 base)
        grm_args = ["task_args.length=10", "fill_right=true", "policy_max_tokens=16"]
        bench = ["--prompt-lens", "16", "--batches", "4", "--new-tokens", "8", "--repeats", "1", "--mtp", "0"]
        # 8 sampled answers: about 60% of the tiny R1-Zero model's carry reasoning, so all 8 without any is rare
        serve = ["--requests", "8", "--concurrency", "2", "--max-tokens", "8"]
        tokenizer = [*cli, "tokenizer", "train", "--data", corpus, "--vocab-size", "320", "--out", o("tokenizer")]
        nobias_steps = "max_steps=8"
    else:
        small = [*cli, "pretrain", "--config", cfg("pretrain_small.toml"), f"tokenizer={o('tokenizer')}", t]
        reasoning = [*cli, "pretrain", "--config", cfg("pretrain_reasoning.toml"), t]
        rl_recipe = [*cli, "rl", "--config", cfg("rl_r1zero_reasoning.toml")]
        student_docs = 16000
        student = [*cli, "sft", "--config", cfg("sft_student_small.toml"), t]
        distill_args = ["num_prompts=500", "samples_per_prompt=4", "max_new_tokens=32", "seq_len=128", "epochs=2"]
        evals = ["--n", "300", "--max-tokens", "32"]
        grm_config = "grm_small.toml"
        grm_args = []
        bench = ["--prompt-lens", "64", "--batches", "8", "--new-tokens", "32", "--repeats", "2", "--mtp", "0"]
        serve = ["--requests", "32", "--concurrency", "8", "--max-tokens", "32"]
        tokenizer = [*cli, "tokenizer", "train", "--data", "default", "--vocab-size", "4096", "--out", o("tokenizer")]
        nobias_steps = "max_steps=100"

    def control(runner: "Runner") -> list[str]:
        return [*reasoning, f"init={o('pretrain_reasoning', 'latest')}", f"data_dir={o('control', 'data')}",
                f"out_dir={o('control')}", "lr=2e-4", "schedule=constant", "warmup_steps=0", "max_steps=100000",
                "eval_every=0", "save_every=0", "sample_every=0"]

    def evaluate(name: str, model: str, *extra: str, task: str = "digit_sum", what: str = "") -> Stage:
        return Stage(f"eval_{name}", what or f"held-out pass@1 of {model}",
                     [*cli, "eval", "--model", o(model, "latest"), "--task", task, *evals, "--seed", "0",
                      "--threads", str(threads), "--json", *extra],
                     after=(model,), result=f"results/eval_{name}.json", json_stdout=True)

    def info(model: str) -> Stage:
        return Stage(f"info_{model}", f"parameters and cache bytes of {model}",
                     [*cli, "info", "--model", o(model, "latest"), "--json"],
                     after=(model,), result=f"results/info_{model}.json", json_stdout=True)

    first_base = "first base (a synthetic corpus at --tiny)" if tiny else "Shakespeare base"
    return [
        Stage("tokenizer", f"byte-level BPE of the {first_base}'s corpus", tokenizer,
              result="tokenizer/tokenizer.json"),
        Stage("pretrain_small", f"the {first_base}: pretraining (next-token + MTP, aux-loss-free balancing)",
              [*small, f"out_dir={o('pretrain_small')}"], after=("tokenizer",), run_dir="pretrain_small",
              variant="configs/pretrain_tiny.toml on a synthetic corpus" if tiny else "configs/pretrain_small.toml"),
        Stage("pretrain_nobias", "the same recipe without the bias update (bias_gamma=0): expert load for comparison",
              [*small, f"out_dir={o('pretrain_nobias')}", f"data_dir={o('pretrain_small', 'data')}", "bias_gamma=0",
               nobias_steps, "eval_every=0", "sample_every=0", "save_every=0"],
              after=("pretrain_small",), run_dir="pretrain_nobias", variant=f"bias_gamma=0 {nobias_steps}"),
        Stage("pretrain_reasoning", "the reasoning base: digit-sum corpus, 35% worked chains",
              [*reasoning, f"out_dir={o('pretrain_reasoning')}"], run_dir="pretrain_reasoning",
              variant="configs/pretrain_tiny.toml on the digit-sum corpus, pretrain_reasoning.toml's chat template"
              if tiny else "configs/pretrain_reasoning.toml"),
        Stage("rl", "R1-Zero: GRPO with accuracy + format rewards from the reasoning base",
              [*rl_recipe, f"init={o('pretrain_reasoning', 'latest')}", f"out_dir={o('rl')}", t],
              after=("pretrain_reasoning",), run_dir="rl",
              variant="configs/rl_r1zero_tiny.toml task=digit_sum" if tiny else "configs/rl_r1zero_reasoning.toml"),
        Stage("control", "RL's control: continued pretraining of the base for RL's wall time", control,
              after=("pretrain_reasoning", "rl"), run_dir="control", budget_of="rl",
              variant="pretrain_reasoning recipe, init=base, lr=2e-4 constant, stopped after RL's wall time"),
        Stage("student_corpus", "the student's warm-up corpus: the reasoning base's documents",
              [sys.executable, "-c", "import json, sys; from nanoseek.data.synthetic import reasoning_base_documents "
               "as g; open(sys.argv[1], 'w').writelines(json.dumps({'text': d}) + '\\n' for d in g(int(sys.argv[2])))",
               o("student_corpus.jsonl"), str(student_docs)], result="student_corpus.jsonl",
              variant=f"{student_docs} documents (scripts/distill_demo.sh: 16,000)"),
        Stage("student", "the dense student (Llama format) warmed up on that corpus",
              [*student, f"tokenizer={o('pretrain_reasoning', 'latest')}", f'data=["{o("student_corpus.jsonl")}"]',
               f"out_dir={o('student')}"],
              after=("pretrain_reasoning", "student_corpus"), run_dir="student",
              variant="configs/sft_tiny.toml" if tiny else "configs/sft_student_small.toml"),
        Stage("distill", "R1-Distill: rejection-sample the R1-Zero teacher, fine-tune the student on verified traces",
              [*cli, "distill", "--config", cfg("distill_small.toml"), "--teacher", o("rl", "latest"),
               "--student", o("student", "latest"), "--task", "digit_sum", *distill_args, f"out_dir={o('distill')}", t],
              after=("rl", "student"), run_dir="distill",
              variant="configs/distill_small.toml " + " ".join(distill_args)),
        Stage("grm", "generative reward model: accuracy against k, best-of-N against maj@k",
              [*cli, "grm", "--config", cfg(grm_config), f"init={o('pretrain_reasoning', 'latest')}", *grm_args,
               f"out_dir={o('grm')}", t],
              after=("pretrain_reasoning",), result="grm/grm_report.json", needs=("command:grm", f"configs/{grm_config}"),
              variant=" ".join([f"configs/{grm_config}", *grm_args])),
        evaluate("pretrain_small", "pretrain_small", task="default"),
        evaluate("pretrain_reasoning", "pretrain_reasoning"),
        evaluate("pretrain_reasoning_prefill", "pretrain_reasoning", "--prefill",
                 what="held-out pass@1 of the reasoning base with the chain forced (--prefill)"),
        evaluate("rl", "rl"),
        evaluate("control", "control"),
        evaluate("student", "student"),
        evaluate("distill", "distill"),
        info("pretrain_small"),
        info("pretrain_reasoning"),
        Stage("engine", "decode tokens/s of the engine against transformers' generate, same batch",
              [sys.executable, str(REPO / "benchmarks" / "generate_throughput.py"), "--model",
               o("pretrain_small", "latest"), *bench, "--threads", "2", "--json", o("results", "engine.json")],
              after=("pretrain_small",), result="results/engine.json", exclusive=True,
              needs=("transformers", "benchmarks/generate_throughput.py"), variant=" ".join(bench)),
        Stage("serve", "nanoseek serve through the official openai client, and the chat page in Chromium",
              [sys.executable, "-m", "nanoseek.serve.check", "--model", o("rl", "latest"), *serve,
               "--threads", "2", "--json", o("results", "serve.json"), "--screenshot", o("chat.png")],
              after=("rl",), result="results/serve.json", exclusive=True, needs=("openai", "fastapi", "uvicorn"),
              variant=" ".join(serve)),
    ]


# ---------------------------------------------------------------- running it


@dataclass
class Job:
    stage: Stage
    proc: object
    log: object
    task: int
    start: float
    first_step: float | None = None
    interrupted_by_us: bool = False
    spent_before: float = 0.0  # wall seconds of earlier, interrupted attempts (the control's budget)
    reader: threading.Thread | None = None
    progress: tuple[int, int] | None = None


class Runner:
    """Runs the plan's stages as subprocesses with a live display, and keeps OUT/speedrun.json."""

    def __init__(self, out: Path, stages: list[Stage], skip: set[str], jobs: int, console=None):
        self.out, self.stages, self.skip, self.jobs = out, stages, skip, jobs
        self.by_name = {s.name: s for s in stages}
        self.state_path = out / STATE_FILE
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.state.setdefault("stages", {})
        self.console = console
        self.running: dict[str, Job] = {}
        self.settled: set[str] = set()  # stages done, skipped or failed in this run
        self.lock = threading.Lock()

    # ---- bookkeeping

    def record(self, name: str, **values) -> None:
        with self.lock:
            self.state["stages"].setdefault(name, {}).update(values)
            atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def status(self, name: str) -> str:
        return self.state["stages"].get(name, {}).get("status", "")

    def is_done(self, stage: Stage) -> bool:
        """Done in an earlier run or this one: its output is there and complete."""
        if stage.result:
            return (self.out / stage.result).is_file()
        if stage.run_dir:
            from nanoseek.train.checkpointing import find_checkpoint, list_checkpoints, stopped_early

            if not list_checkpoints(self.out / stage.run_dir):
                return False
            if stage.budget_of:  # stopped early on purpose: done once the speedrun said so
                return self.status(stage.name) == "done"
            return not stopped_early(find_checkpoint(self.out / stage.run_dir))
        return self.status(stage.name) == "done"

    def has_checkpoint(self, stage: Stage) -> bool:
        if not stage.run_dir:
            return False
        from nanoseek.train.checkpointing import list_checkpoints

        return bool(list_checkpoints(self.out / stage.run_dir))

    # ---- the loop

    def run(self) -> int:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        (self.out / "results").mkdir(parents=True, exist_ok=True)
        pending = [s for s in self.stages]
        failed = False
        progress = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                            TextColumn("{task.fields[info]:>16}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=self.console, transient=False, refresh_per_second=4)
        previous = self.take_sigterm()
        try:
            with progress:
                while pending or self.running:
                    for stage in list(pending):
                        why = self.blocked(stage)
                        if why == "wait":
                            continue
                        pending.remove(stage)
                        self.settled.add(stage.name)
                        if why:
                            self.record(stage.name, status="skipped", reason=why)
                            progress.console.print(f"[yellow]- {stage.name}: skipped ({why})")
                            continue
                        if self.is_done(stage):
                            self.record(stage.name, status="done", reason=None)
                            prev = self.state["stages"][stage.name].get("seconds")
                            progress.console.print(f"[green]= {stage.name}: already done"
                                                   + (f" ({prev:.0f}s)" if prev else "") + ", skipped")
                            continue
                        if not self.can_start(stage):
                            pending.insert(0, stage)
                            self.settled.discard(stage.name)
                            break
                        self.settled.discard(stage.name)
                        self.start(stage, progress)
                    for name, job in list(self.running.items()):
                        code = self.poll(job)
                        if code is None:
                            self.update(job, progress)
                            continue
                        del self.running[name]
                        failed |= not self.finish(job, code, progress)
                        self.settled.add(name)
                    time.sleep(0.2)
        except KeyboardInterrupt:
            # Ctrl-C reached every stage too (one process group): they save and exit 130
            deadline = time.monotonic() + 120
            for job in self.running.values():
                while self.poll(job) is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if job.proc.returncode is None:
                    job.proc.kill()
                    self.poll(job, block=True)
                self.stopped(job)
                job.log.close()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return 1 if failed else 0

    def take_sigterm(self):
        """Make SIGTERM stop the speedrun as Ctrl-C does. Ctrl-C reaches the stages too (one process
        group); `kill PID` (or `timeout`) reaches the speedrun alone, which died on it at once: no
        report, and its stages, their output pipe gone, died without saving. Returns the handler
        it replaced (None off the main thread, where signals cannot be taken)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def stop(signum, frame):
            for job in self.running.values():
                if job.proc.returncode is None:  # not reaped yet: the pid is still the stage's
                    os.kill(job.proc.pid, signal.SIGTERM)  # a training stage saves, then exits 130
            raise KeyboardInterrupt

        return signal.signal(signal.SIGTERM, stop)

    def blocked(self, stage: Stage) -> str | None:
        """"wait" while a stage it needs has not settled; a reason when it cannot run; None to go."""
        if stage.name in self.skip:
            return "--skip"
        missing = stage.missing()
        if missing:
            return missing
        for dep in stage.after:
            if dep not in self.settled:
                return "wait"
            if self.status(dep) in ("skipped", "failed") and not self.is_done(self.by_name[dep]):
                return f"needs {dep}, which {'failed' if self.status(dep) == 'failed' else 'was skipped'}"
        return None

    def can_start(self, stage: Stage) -> bool:
        if stage.exclusive:
            return not self.running
        return len(self.running) < self.jobs and not any(j.stage.exclusive for j in self.running.values())

    def start(self, stage: Stage, progress) -> None:
        import subprocess

        argv = stage.argv(self) if callable(stage.argv) else list(stage.argv)
        resume = self.has_checkpoint(stage)
        if resume:
            argv = argv[:argv.index("--config") + 2] + ["--resume"] + argv[argv.index("--config") + 2:]
        log = open(self.out / "logs" / f"{stage.name}.log", "a")
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2" if stage.exclusive else "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=self.out)
        task = progress.add_task(stage.name, total=None, info="resuming" if resume else "")
        spent = self.state["stages"].get(stage.name, {}).get("seconds", 0.0) if resume else 0.0
        job = Job(stage, proc, log, task, time.monotonic(), spent_before=spent)
        job.reader = threading.Thread(target=self.read, args=(job,), daemon=True)
        job.reader.start()
        self.running[stage.name] = job
        self.record(stage.name, status="running", started=time.time(), reason=None, exit_status=None)

    def read(self, job: Job) -> None:
        """Copy the stage's output to its log; the "step N/M" lines of training stages drive its bar."""
        lines = []
        for line in job.proc.stdout:
            job.log.write(line)
            job.log.flush()
            lines.append(line)
            m = STEP_RE.match(line)
            if m:
                job.progress = int(m.group(1)), int(m.group(2))
                # "step 0/N" is the validation before training: a step has not finished yet
                if job.first_step is None and job.progress[0] > 0:
                    job.first_step = time.monotonic()
        job.lines = lines

    def update(self, job: Job, progress) -> None:
        if job.stage.budget_of:
            budget = self.state["stages"].get(job.stage.budget_of, {}).get("seconds", 0.0)
            spent = self.elapsed(job)
            progress.update(job.task, total=budget, completed=min(spent, budget), info=f"{spent:.0f}/{budget:.0f}s")
            # never before its first step: a Ctrl-C during setup would leave no checkpoint
            if spent >= budget and job.first_step is not None and not job.interrupted_by_us:
                job.interrupted_by_us = True
                job.proc.send_signal(signal.SIGINT)
        elif job.progress:
            done, total = job.progress
            progress.update(job.task, total=total, completed=done, info=f"step {done}/{total}")

    def elapsed(self, job: Job) -> float:
        return job.spent_before + time.monotonic() - job.start

    def cpu_seconds(self, job: Job) -> float:
        """The stage's CPU time, like its wall time (`elapsed`) over the attempts this one resumes."""
        before = self.state["stages"].get(job.stage.name, {}).get("cpu_seconds", 0.0) if job.spent_before else 0.0
        return before + getattr(job, "cpu", 0.0)

    def stopped(self, job: Job) -> None:
        """Record a stage Ctrl-C stopped, with its wall and CPU time so far: a resumed attempt adds to both."""
        self.record(job.stage.name, status="stopped", seconds=self.elapsed(job), cpu_seconds=self.cpu_seconds(job))

    def poll(self, job: Job, block: bool = False):
        """The exit status once the stage ended (with its CPU time recorded), else None."""
        if job.proc.returncode is not None:
            return job.proc.returncode
        pid, status, usage = os.wait4(job.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return None
        job.proc.returncode = os.waitstatus_to_exitcode(status)
        job.cpu = usage.ru_utime + usage.ru_stime
        return job.proc.returncode

    def finish(self, job: Job, code: int, progress) -> bool:
        """Record how the stage ended; False when it failed."""
        job.reader.join(timeout=10)
        stage, seconds = job.stage, self.elapsed(job)
        cpu = self.cpu_seconds(job)
        job.log.close()
        progress.remove_task(job.task)
        ok = code == 0 or (code == 130 and job.interrupted_by_us)
        if ok and stage.json_stdout:
            text = next((ln for ln in reversed(getattr(job, "lines", [])) if ln.lstrip().startswith("{")), None)
            if text is None:
                ok, code = False, -1
            else:
                atomic_write_text(self.out / stage.result, text.strip() + "\n")  # its existence means done
        if ok and stage.result and not (self.out / stage.result).is_file():
            ok, code = False, -1
        if ok and stage.run_dir and not self.has_checkpoint(stage):  # stopped before its first save
            ok, code = False, -1
        if ok:
            self.record(stage.name, status="done", seconds=seconds, cpu_seconds=cpu)
            progress.console.print(f"[green]+ {stage.name}: done in {_duration(seconds)} (CPU {_duration(cpu)})")
            return True
        if code == 130:
            self.record(stage.name, status="stopped", seconds=seconds, cpu_seconds=cpu)
            raise KeyboardInterrupt
        self.record(stage.name, status="failed", seconds=seconds, cpu_seconds=cpu, exit_status=code)
        progress.console.print(f"[red]! {stage.name}: failed (exit status {code}); see "
                               f"{self.out / 'logs' / (stage.name + '.log')}")
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/speedrun", help="directory for every stage's run, logs and the report")
    parser.add_argument("--tiny", action="store_true", help="every stage at toy size: about a minute, for tests")
    parser.add_argument("--skip", nargs="+", default=[], metavar="STAGE", help="stages to leave out")
    parser.add_argument("--jobs", type=int, default=2,
                        help="stages run side by side, one thread each (--jobs 1: two threads)")


def run(args) -> int:
    from rich.console import Console

    from nanoseek.report import environment, write_report

    out = Path(args.out).resolve()
    names = [s.name for s in plan(out, args.tiny)]
    unknown = [s for s in args.skip if s not in names]
    if unknown:
        raise NanoseekError(f"unknown stage {unknown[0]!r} in --skip; stages: {', '.join(names)}")
    if args.jobs < 1:
        raise NanoseekError(f"--jobs {args.jobs} must be at least 1")
    check_out_dir(args.out, "--out")  # a file in the way is named as one, not as "File exists"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise NanoseekError(f"cannot write to --out {args.out}: {e.strerror or e}") from None
    state_path = out / STATE_FILE
    if state_path.is_file() and json.loads(state_path.read_text()).get("tiny") != args.tiny:
        raise NanoseekError(f"{out} holds a {'tiny' if not args.tiny else 'full'} speedrun; "
                            f"use another --out for a {'tiny' if args.tiny else 'full'} one")
    console = Console()
    stages = plan(out, args.tiny, threads=1 if args.jobs > 1 else 2)
    runner = Runner(out, stages, set(args.skip), args.jobs, console)
    # what the run started on (commit, torch, CPU, load), like `started` kept from its first invocation:
    # the report card reads it from here, so re-running or rewriting it does not restamp it
    runner.state.update(tiny=args.tiny, started=runner.state.get("started", time.time()),
                        environment=runner.state.get("environment") or environment())
    console.print(f"nanoseek speedrun{' --tiny' if args.tiny else ''}: {len(stages)} stages into {out} "
                  f"(logs in {out / 'logs'})")
    t0 = time.monotonic()
    code = 0
    try:
        code = runner.run()
    except KeyboardInterrupt:
        code = 130
    runner.state["wall_seconds"] = runner.state.get("wall_seconds", 0.0) + time.monotonic() - t0
    atomic_write_text(runner.state_path, json.dumps(runner.state, indent=2) + "\n")
    report = write_report(out, stages, runner.state, tiny=args.tiny)
    console.print(report.summary)
    console.print(f"report: {out / 'report.md'}")
    if code == 130:
        console.print("interrupted: run the same command again to continue where it stopped")
    return code
