"""What the distributed tests share (test_distributed.py, test_expert_parallel.py): the tiny
pretraining recipe's overrides and running `nanoseek` on 2 gloo ranks under torchrun. The
fixtures they use (`corpus`, and `single`: the recipe's 8 steps in one process, the reference
both files compare with) are conftest.py's, made once per session."""

import json
import os
import subprocess
import sys
from pathlib import Path

from nanoseek.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain_tiny.toml"


def overrides(out_dir, corpus):
    return [f"out_dir={out_dir}", f"data={json.dumps([str(corpus)])}", f"data_dir={corpus.parent / 'shards'}",
            "save_every=4", "keep_checkpoints=0", "threads=1"]


def torchrun(*args: str, stage: tuple[str, ...] = ("pretrain", "--config", str(TINY))) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nanoseek.cli", *stage, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def step_losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def unigram_eval_loss(run):
    return next(r["unigram_eval_loss"] for r in read_metrics(run) if "unigram_eval_loss" in r)
