"""`nanoseek speedrun --tiny`: every stage runs (or is skipped with its reason), the report card
and its plots are written, a second run skips what is done, and bad input is a clear error."""

import json
import time
import os
from pathlib import Path

import pytest

from nanoseek import cli
from nanoseek.speedrun import plan, reasoning_chat_template

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_speedrun_tiny_end_to_end(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    out = tmp_path / "sr"
    code = cli.main(["speedrun", "--tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    state = json.loads((out / "speedrun.json").read_text())["stages"]
    names = [s.name for s in plan(out, tiny=True)]
    failed = {n: (out / "logs" / f"{n}.log").read_text()[-2000:] for n in names if state[n]["status"] == "failed"}
    assert code == 0 and not failed, failed
    for name in names:
        assert state[name]["status"] in ("done", "skipped"), (name, state[name])
        if state[name]["status"] == "skipped":
            assert state[name]["reason"]
        else:
            assert (out / "logs" / f"{name}.log").is_file() and state[name]["seconds"] > 0
    for must in ("tokenizer", "pretrain_small", "pretrain_reasoning", "rl", "control", "student", "distill",
                 "eval_rl", "info_pretrain_small", "grm"):
        assert state[must]["status"] == "done", must
    report = (out / "report.md").read_text()
    for section in ("## Stages", "## Cost", "## Pretraining", "## R1-Zero", "## Distillation",
                    "## Generative reward model", "## Engine and serving", "## Environment"):
        assert section in report
    assert "| rl | " in report and "The total leaves out rl:" in report  # RL counts no trained tokens
    # the GRM stage judged from the speedrun's own reasoning base; its table and figure are in the report
    grm = json.loads((out / "grm" / "grm_report.json").read_text())
    assert f"| Voting@k | {100 * grm['voting']['1']:.1f}% |" in report
    assert "![GRM scaling](grm/grm_scaling.png)" in report
    # the report's numbers are the stages' own: eval's JSON line
    rl = json.loads((out / "results" / "eval_rl.json").read_text())
    assert f"| + R1-Zero RL | {100 * rl['pass@1']:.1f}% |" in report
    images = [line[line.index("(") + 1:-1] for line in report.splitlines() if line.startswith("![")]
    assert {"pretrain_loss.png", "expert_load.png", "r1zero.png"} <= set(images)
    for image in images:
        assert (out / image).read_bytes()[:8] == PNG, image
        assert matplotlib.image.imread(out / image).ndim == 3, image
    assert "nanoseek speedrun --tiny" in printed and "report:" in printed
    # the R1-Zero model prompts as its corpus does ("User: q\nAssistant: <think>"), as the full run's, so
    # the server splits its reasoning out as reasoning_content
    tokenizer_config = json.loads((out / "rl" / "latest" / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == reasoning_chat_template() != ""
    if state["serve"]["status"] == "done":  # skipped without the serving extras
        serve = json.loads((out / "results" / "serve.json").read_text())
        assert serve["with_reasoning"] > 0, serve
        assert f"{serve['with_reasoning']} of {serve['requests']} answers carried `reasoning_content`" in report

    # a second run skips every completed stage
    code = cli.main(["speedrun", "--tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for name in names:
        if state[name]["status"] == "done":
            assert f"= {name}: already done" in printed, name


@pytest.mark.parametrize("argv, message", [
    (["--skip", "nosuchstage"], "unknown stage 'nosuchstage'"),
    (["--jobs", "0"], "--jobs 0"),
])
def test_speedrun_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    code = cli.main(["speedrun", "--tiny", "--out", str(tmp_path / "sr"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_speedrun_unwritable_out_is_a_clear_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code = cli.main(["speedrun", "--tiny", "--out", str(locked / "sr")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to --out" in err and "Traceback" not in err


def test_speedrun_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code = cli.main(["speedrun", "--tiny", "--out", str(tmp_path / "file" / "sr")])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {tmp_path / 'file' / 'sr'} is inside {tmp_path / 'file'}, which is a file" in err
    code = cli.main(["speedrun", "--tiny", "--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {tmp_path / 'file'} is a file, not a directory: point --out at a directory" in err
    assert "Traceback" not in err


class FakeProgress:
    def __init__(self):
        self.printed = []
        self.console = self

    def remove_task(self, task):
        pass

    def print(self, text):
        self.printed.append(text)


def test_a_stage_stopped_before_its_first_checkpoint_is_not_done(tmp_path):
    """The control is stopped (Ctrl-C by the speedrun) once it ran as long as RL; the validation
    line before training ("step 0/N") must not count as a step, and a stage stopped before it saved
    is a failure, not "done" (the next stage would read a checkpoint that is not there)."""
    import io
    import threading
    import types

    from nanoseek.speedrun import Job, Runner

    control = next(s for s in plan(tmp_path, tiny=True) if s.name == "control")
    runner = Runner(tmp_path, [control], skip=set(), jobs=1)
    lines = ["model: 1.00M parameters\n", "step 0/100000 | val_loss 1.273\n"]
    job = Job(control, types.SimpleNamespace(stdout=iter(lines)), io.StringIO(), task=0, start=0.0)
    runner.read(job)
    assert job.progress == (0, 100000) and job.first_step is None  # not yet safe to stop
    job.proc, job.log = types.SimpleNamespace(stdout=iter(["step 1/100000 | loss 5.1\n"])), io.StringIO()
    runner.read(job)
    assert job.first_step is not None

    job.interrupted_by_us, job.reader, job.log = True, threading.Thread(target=lambda: None), io.StringIO()
    job.reader.start()
    progress = FakeProgress()
    assert runner.finish(job, 130, progress) is False  # exit 130 as asked, but no checkpoint
    assert runner.status("control") == "failed"


def test_a_rewritten_report_keeps_the_recorded_environment(tmp_path, capsys):
    """The speedrun records its environment in speedrun.json as it starts; `python -m nanoseek.report`
    rewriting the card later shows that one (not today's HEAD), and marks live values for older runs."""
    from nanoseek import report
    from nanoseek.speedrun import STATE_FILE

    out = tmp_path / "sr"
    names = [s.name for s in plan(out, tiny=True)]
    assert cli.main(["speedrun", "--tiny", "--out", str(out), "--skip", *names]) == 0  # records, runs nothing
    state = json.loads((out / STATE_FILE).read_text())
    assert state["environment"]["git commit"]
    state["environment"]["git commit"] = "abc1234"  # the run's commit, not this checkout's
    (out / STATE_FILE).write_text(json.dumps(state))
    assert report.main([str(out)]) == 0
    card = (out / "report.md").read_text()
    assert "| git commit | abc1234 |" in card and "at report time" not in card

    del state["environment"]  # a run from before the environment was recorded
    (out / STATE_FILE).write_text(json.dumps(state))
    assert report.main([str(out)]) == 0
    assert "(at report time) |" in (out / "report.md").read_text()


def test_the_grm_headline_names_the_largest_k_it_measured(tmp_path):
    """--tiny votes up to k = 4: the summary row said "Voting@8 ," with no number."""
    from nanoseek.report import _headline

    grm = {"voting": {"1": 0.5, "2": 0.6, "4": 0.7}, "best_of_n": {"n": 8, "grm@8": 0.9, "maj@8": 0.8}}
    assert _headline("grm", tmp_path, {}, {}, grm) == "Voting@4 70.0%, best-of-8 90.0% vs maj@8 80.0%"
    grm["voting"].update({"8": 0.72, "16": 0.75})
    assert _headline("grm", tmp_path, {}, {}, grm).startswith("Voting@8 72.0%")  # the full recipe's headline k


def test_sigterm_stops_the_speedrun_like_ctrl_c(tmp_path):
    """`kill PID` reaches the speedrun alone (Ctrl-C reaches its whole process group): it died at
    once, with no report, its stage unsignalled and left writing into a dead pipe. Now it passes
    SIGTERM on to its running stages, waits for them, records them stopped and writes the report."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "sr"
    driver = f"""
import os, sys
from nanoseek import cli, speedrun
stage = speedrun.Stage("wait", "waits to be stopped", [sys.executable, "-c", "import time; time.sleep(600)"],
                       result="never.txt")
speedrun.plan = lambda out, tiny=False, threads=1: [stage]
start = speedrun.Runner.start
def start_and_say(self, stage, progress):  # tell the test the stage runs, and its pid
    start(self, stage, progress)
    os.write(2, f"started {{self.running[stage.name].proc.pid}}\\n".encode())
speedrun.Runner.start = start_and_say
sys.exit(cli.main(["speedrun", "--tiny", "--out", {str(out)!r}]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stderr.readline()  # blocks until the stage runs (or the driver ended: "")
    stage_pid = int(line.split()[1]) if line.startswith("started") else None
    try:
        assert stage_pid, line + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
        state = json.loads((out / "speedrun.json").read_text())["stages"]["wait"]
        assert state["status"] == "stopped"
        assert "| wait | stopped |" in (out / "report.md").read_text()
        with pytest.raises(ProcessLookupError):  # the stage got SIGTERM and is gone (and reaped)
            os.kill(stage_pid, 0)
    finally:
        proc.kill()
        if stage_pid:
            try:
                os.kill(stage_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_resumed_stage_counts_the_cpu_time_of_its_stopped_attempt(tmp_path):
    """Wall time adds up over a stopped attempt and the one resuming it; CPU time did not: Ctrl-C
    recorded no CPU time, so the card showed e.g. wall 11s, CPU 4s (the last attempt's alone)."""
    import io
    import threading
    import types

    from nanoseek.speedrun import Job, Runner, Stage

    stage = Stage("x", "a stage", ["true"], result="x.txt")
    runner = Runner(tmp_path, [stage], skip=set(), jobs=1)
    first = Job(stage, types.SimpleNamespace(returncode=130), io.StringIO(), task=0, start=time.monotonic() - 6.0)
    first.cpu = 4.0
    runner.stopped(first)  # what Ctrl-C records
    assert runner.state["stages"]["x"]["cpu_seconds"] == 4.0

    spent = runner.state["stages"]["x"]["seconds"]
    second = Job(stage, types.SimpleNamespace(returncode=0), io.StringIO(), task=0, start=time.monotonic(),
                 spent_before=spent)  # as start() resumes it
    second.cpu, second.reader = 3.0, threading.Thread(target=lambda: None)
    second.reader.start()
    (tmp_path / "x.txt").write_text("")
    assert runner.finish(second, 0, FakeProgress())
    assert runner.state["stages"]["x"]["cpu_seconds"] == 7.0 and runner.state["stages"]["x"]["seconds"] >= 6.0


def test_rewriting_the_report_of_a_directory_without_a_speedrun_is_a_clear_error(tmp_path, capsys):
    """`python -m nanoseek.report DIR` on a directory no speedrun wrote was a FileNotFoundError traceback."""
    from nanoseek import report

    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no readable {tmp_path / 'speedrun.json'}" in err and "Traceback" not in err
    assert not (tmp_path / "report.md").exists()
    with pytest.raises(SystemExit) as exit_:  # --help is help, not a directory named "--help"
        report.main(["--help"])
    assert exit_.value.code == 0 and "speedrun's --out directory" in capsys.readouterr().out


def test_an_output_of_another_form_costs_its_section_not_the_card(tmp_path):
    """A stage result kept from a run of another nanoseek version (a field gone): the report said
    nothing at all (a KeyError at the end of the speedrun); now that section says why it is empty."""
    from nanoseek import report
    from nanoseek.speedrun import STATE_FILE

    out = tmp_path / "sr"
    names = [s.name for s in plan(out, tiny=True)]
    assert cli.main(["speedrun", "--tiny", "--out", str(out), "--skip", *names]) == 0  # records, runs nothing
    (out / "results").mkdir(exist_ok=True)
    eval_line = {"task": "digit_sum", "n": 10, "seed": 0, "pass@1": 0.5, "mean_length": 9.0}  # no "reasoning"
    (out / "results" / "eval_rl.json").write_text(json.dumps(eval_line))
    (out / "results" / "serve.json").write_text(json.dumps({"requests": 4}))  # most fields gone
    (out / "grm").mkdir(exist_ok=True)
    (out / "grm" / "grm_report.json").write_text(json.dumps({"voting": [0.8, 0.9], "items": 3}))  # a list, not {k: ..}
    state = json.loads((out / STATE_FILE).read_text())
    assert report.main([str(out)]) == 0
    card = (out / "report.md").read_text()
    for title in ("R1-Zero", "Generative reward model", "Engine and serving"):
        section = card.split(f"## {title}\n", 1)[1]
        assert section.lstrip().startswith("Not shown: a stage output this section reads is not in the form")
    assert "KeyError: 'reasoning'" in card and "## Environment" in card  # the rest is written
    assert state["environment"]["git commit"] in card
