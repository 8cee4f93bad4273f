"""Distributed training on CPU: 2 processes with gloo, launched by torchrun, against 1 process.

The loader gives rank r rows [r*B/2, (r+1)*B/2) of every global batch, so 2 ranks with micro-batch
B/2 see exactly the samples 1 rank with batch B sees: losses agree up to float summation order.
"""

import json

import pytest
import torch
from distributed_runs import TINY, overrides, step_losses, torchrun, unigram_eval_loss

from nanoseek.checkpoint import read_tensors
from nanoseek.train import pretrain
from nanoseek.train.config import load_run_config
from nanoseek.train.pretrain import PretrainConfig


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


def test_mhc_under_fsdp_with_muon_and_activation_checkpointing_matches_one_process(corpus, tmp_path):
    """A model with DeepSeek-V4's hyper-connections (model.hc_mult=2: streams (B, T, 2, D) between
    the blocks, the stream head in the root module) sharded by FSDP2, its fn matrices under Muon
    and its blocks recomputed in the backward: 2 ranks take the same steps as 1 process."""
    mhc = ("model.hc_mult=2", "optimizer=muon", "max_steps=4", "eval_every=0")
    pretrain.train(load_run_config(PretrainConfig, TINY, [*overrides(tmp_path / "one", corpus), *mhc]))
    torchrun(*overrides(tmp_path / "two", corpus), *mhc, "parallel=fsdp", "activation_checkpointing=true")
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-4)
    a, b = read_tensors(tmp_path / "one" / "latest"), read_tensors(tmp_path / "two" / "latest")
    assert any(".hc_head." in key for key in a)
    for key in a:  # Muon's bf16 iterations: see test_muon_under_fsdp_matches_one_process
        assert (a[key] - b[key]).norm() <= 0.05 * a[key].norm(), key
