"""Helpers of the benchmarks/ scripts (the scripts themselves run in test_gpu_check's dry run)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import `optional`

from train_throughput import own_peak_bytes  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adam_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 8)).sum().backward()
    opt.step()
    return opt


def test_train_peak_memory_leaves_out_the_other_models_weights_and_adam_state():
    # the order of train_throughput on a GPU: model a warms up first and keeps its AdamW state
    # while model b's peak is measured; b's figure must be b's alone, as a's is
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 32), torch.nn.Linear(8, 4)
    opt_a = adam_step(a)
    a_state = nbytes(v for s in opt_a.state.values() for v in s.values())
    resident = nbytes(a.parameters()) + a_state + nbytes(b.parameters())  # before b's steps
    opt_b = adam_step(b)
    b_work = nbytes(p.grad for p in b.parameters()) + nbytes(v for s in opt_b.state.values() for v in s.values())
    peak = resident + b_work  # the device's peak during b's steps
    assert own_peak_bytes(peak, resident, b) == nbytes(b.parameters()) + b_work


def test_decode_memory_counts_one_engine_its_weights_and_latent_cache():
    from generate_throughput import engine_bytes, held_bytes

    from nanoseek import LLM
    from nanoseek.config import preset
    from nanoseek.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    llm = LLM(model, max_num_seqs=2, max_model_len=64, enable_prefix_caching=False, device="cpu")
    weights = nbytes([*model.parameters(), *model.buffers()])
    assert held_bytes(model) == weights
    assert engine_bytes(llm) == weights + nbytes([llm.runner.cache.pool])


def run_laptop(*args):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "laptop_inference.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)


def test_laptop_cpu_clock_is_refused_on_more_than_one_thread():
    # time.process_time adds up every thread: on 2 threads it halved the printed "decode tok/s"
    result = run_laptop("--small", "--threads", "2", "--clock", "cpu")
    assert result.returncode == 2 and "use it with --threads 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_laptop_times_more_than_one_thread_by_the_wall_clock(tmp_path):
    result = run_laptop("--small", "--dir", str(tmp_path / "ckpt"), "--threads", "2", "--paired", "1",
                        "--decode-tokens", "4", "--prompt-len", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 thread(s), wall clock" in result.stdout


def test_optimizers_report_steps_to_the_baselines_loss_and_ratios(tmp_path):
    import json

    from optimizers import first_step_at, summarize

    assert first_step_at([(0, 8.0), (50, 5.0), (100, 4.0)], 4.5) == 75  # linear between evaluations
    assert first_step_at([(0, 8.0), (50, 5.0)], 4.0) is None
    assert first_step_at([(0, 3.0), (50, 2.0)], 4.0) == 0
    for name, vals, step_time in (("adamw", [8.0, 5.0, 4.0], 1.0), ("muon", [8.0, 4.0, 3.5], 1.1)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "val_loss": v} for s, v in zip((0, 50, 100), vals)]
        lines += [{"step": s, "loss": 5.0, "step_time_s": step_time} for s in range(1, 101)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = summarize({"adamw": tmp_path / "adamw", "muon": tmp_path / "muon"})
    assert report["baseline"] == "adamw"
    muon = report["runs"]["muon"]
    assert muon["steps_to_baseline_loss"] == 50 and muon["step_speedup"] == 2.0
    assert muon["difference"] == -0.5 and muon["step_time_ratio"] == pytest.approx(1.1)
