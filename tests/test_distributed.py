"""Distributed training on CPU: 2 processes with gloo, launched by torchrun, against 1 process.

The loader gives rank r rows [r*B/2, (r+1)*B/2) of every global batch, so 2 ranks with micro-batch
B/2 see exactly the samples 1 rank with batch B sees: losses agree up to float summation order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import read_tensors
from nanoseek.train import pretrain
from nanoseek.train.config import load_run_config
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain_tiny.toml"
WORDS = "the king queen lord lady sword crown night day love death fair foul sweet speak hear thou".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    for i in range(8):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(80))
        (d / f"doc{i}.txt").write_text(text)
    return d


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


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    pretrain.train(load_run_config(PretrainConfig, TINY, overrides(out, corpus)))
    return out


def test_two_ranks_ddp_match_one_process(single, corpus, tmp_path):
    torchrun(*overrides(tmp_path, corpus), "parallel=ddp")
    one, two = step_losses(single), step_losses(tmp_path)
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, rel=1e-4)
    # the unigram baseline of val_loss covers the same windows: both ranks' val batches
    assert unigram_eval_loss(tmp_path) == pytest.approx(unigram_eval_loss(single), rel=1e-9)
    a, b = read_tensors(single / "latest"), read_tensors(tmp_path / "latest")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    assert len(list(tmp_path.glob("metrics.jsonl"))) == 1  # rank 0 alone writes


def test_fsdp_resumes_a_checkpoint_and_matches(single, corpus, tmp_path):
    """FSDP2 (sharded) continues a 1-process checkpoint: the checkpoint format is layout-free. With
    activation checkpointing, whose reruns of a layer in the backward gather its shards again."""
    torchrun(*overrides(tmp_path, corpus), "parallel=fsdp", "activation_checkpointing=true",
             "--resume-from", str(single / "checkpoint-4"))
    assert step_losses(tmp_path) == pytest.approx(step_losses(single)[4:], rel=1e-4)
    a, b = read_tensors(single / "latest"), read_tensors(tmp_path / "latest")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_muon_under_fsdp_matches_one_process(corpus, tmp_path):
    """optimizer=muon orthogonalizes whole matrices, which FSDP2 holds sharded by rows: torch's
    Muon runs its Newton-Schulz iterations on the sharded DTensors, and 2 ranks take the same steps
    as 1 process."""
    muon = ("optimizer=muon", "max_steps=4", "eval_every=0")
    pretrain.train(load_run_config(PretrainConfig, TINY, [*overrides(tmp_path / "one", corpus), *muon]))
    torchrun(*overrides(tmp_path / "two", corpus), *muon, "parallel=fsdp")
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-4)
    # Weights agree less closely than AdamW's: the iterations run in bf16 (torch's choice), and they
    # scale a gradient's weakest directions up to unit size, its rounding differences with them
    # (measured: 1.9% at worst, an expert's down_proj that saw few tokens).
    a, b = read_tensors(tmp_path / "one" / "latest"), read_tensors(tmp_path / "two" / "latest")
    for key in a:
        assert (a[key] - b[key]).norm() <= 0.05 * a[key].norm(), key


@pytest.mark.parametrize("layout", [(), ("expert_parallel=true",)], ids=["ddp", "expert_parallel"])
def test_sft_of_a_deepseek_checkpoint_under_ddp_matches_one_process(tmp_path, layout):
    """mtp_lambda=0 (the default) computes the MTP loss without training it: DDP then waits for
    gradients the MTP modules never get, unless they are frozen. Under expert parallelism too (the
    frozen MTP experts still take part in the all-to-alls; padded batches route their pads)."""
    import random

    import nanoseek
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train import sft
    from nanoseek.train.sft import SFTConfig

    rng = random.Random(0)
    rows = [{"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a, b in
            ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(40))]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in rows], 300)
    torch.manual_seed(0)
    nanoseek.save_model(Transformer(nanoseek.config.preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "v3",
                        tokenizer=tok)
    args = [f"init={tmp_path / 'v3'}", f"data={tmp_path / 'data.jsonl'}", "seq_len=32", "batch_size=4",
            "max_steps=3", "eval_every=0", "sample_every=0", "tensorboard=false", "threads=1",
            "bias_gamma=0"]  # the expert-load counts include padding, which depends on the micro-batch
    sft.train(load_run_config(SFTConfig, None, [*args, f"out_dir={tmp_path / 'one'}"]))
    torchrun(*args, f"out_dir={tmp_path / 'two'}", *layout, stage=("sft",))
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-4)
    a, b = read_tensors(tmp_path / "one" / "latest"), read_tensors(tmp_path / "two" / "latest")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
