"""Expert parallelism on CPU: 2 gloo ranks launched by torchrun, against 1 process.

The layer test runs this file itself under torchrun (the `__main__` block at the bottom is the
per-rank worker); the training tests run `nanoseek pretrain` under torchrun as test_distributed does.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
# the fixtures corpus and single (the one-process 8-step run of the tiny recipe) are conftest.py's
from distributed_runs import TINY, overrides, step_losses, torchrun

import nanoseek
from nanoseek.checkpoint import read_tensors
from nanoseek.errors import ConfigError
from nanoseek.model.moe import moe_layers
from nanoseek.train import pretrain
from nanoseek.train.checkpointing import find_checkpoint, load_state
from nanoseek.train.config import load_run_config
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig


def run_workers(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


# ---------------------------------------------------------------- the layer


def test_ep_layer_matches_one_process_forward_and_backward():
    """Outputs, input gradients and every parameter's gradient of the sharded layer on 2 ranks equal
    the whole layer's in one process on the same tokens; once with routing spread over both ranks'
    experts, once with every token routed to rank 0's (rank 1 receives nothing and sends everything);
    the local experts run in a loop and as grouped GEMMs (the form used on a GPU)."""
    out = run_workers("layer")
    assert out.count("layer ok") == 8, out  # 2 ranks x 2 routings x (expert loop, grouped GEMMs)


def _layer_worker() -> None:
    import torch.distributed as dist

    from nanoseek.config import preset
    from nanoseek.model.expert_parallel import shard_experts
    from nanoseek.model.moe import MoE

    dist.init_process_group("gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoE(preset("tiny"))  # 8 experts in 2 groups of 4, top-2, one shared expert
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref.gate.e_score_correction_bias.normal_(std=0.05)
    ep = copy.deepcopy(ref)
    shard_experts(ep)
    try:  # a dense model (a distilled student) has nothing to shard
        shard_experts(torch.nn.Linear(2, 2))
        raise AssertionError("a model without MoE layers was sharded")
    except ConfigError as e:
        assert "has no MoE layers" in str(e)
    assert sorted(ep.experts, key=int) == [str(i) for i in range(4 * rank, 4 * rank + 4)]
    ref.train(), ep.train()
    for crowd in (False, True):
        if crowd:  # everything to experts 0-3 (rank 0's): one all-to-all split is empty each way
            for m in (ref, ep):
                m.gate.e_score_correction_bias[:4] += 10.0
        x = torch.randn(W * 3, 7, 64)  # the same global batch on every rank; rank r takes rows [3r, 3r+3)
        g = torch.randn(W * 3, 7, 64)  # the loss is <y, g>, summed over all ranks' tokens
        x_ref = x.clone().requires_grad_()
        ref.zero_grad()
        y_ref = ref(x_ref)
        (y_ref * g).sum().backward()
        mine = slice(3 * rank, 3 * rank + 3)
        for grouped in (False, True):  # the local experts in a loop, then as grouped GEMMs
            ep.grouped_gemm = grouped
            ep.zero_grad()
            x_ep = x[mine].clone().requires_grad_()
            y_ep = ep(x_ep)
            (y_ep * g[mine]).sum().backward()
            def close(actual, expected, what):  # to 1e-6 of the tensor's scale: float sums in another order
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()),
                                           msg=lambda m: f"{what} (crowd={crowd}, grouped={grouped}): {m}")

            close(y_ep, y_ref[mine], "output")
            close(x_ep.grad, x_ref.grad[mine], "input gradient")
            ref_grads = dict(ref.named_parameters())
            for name, p in ep.named_parameters():
                grad = p.grad.clone()
                if not name.startswith("experts."):  # replicated: each rank holds its own tokens' share
                    dist.all_reduce(grad)
                close(grad, ref_grads[name].grad, name)
            print(f"rank {rank}: layer ok", flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------- training


def grad_norms(run):
    return [r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r]


def val_losses(run):
    return [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]


def assert_same_weights(a_dir, b_dir, atol):
    a, b = read_tensors(a_dir), read_tensors(b_dir)
    assert sorted(a) == sorted(b)  # every expert of every layer in the export
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def ep_run(corpus, tmp_path_factory):
    """The tiny recipe's 8 steps (checkpoints at 4 and 8) on 2 ranks, each with half the experts."""
    out = tmp_path_factory.mktemp("ep")
    torchrun(*overrides(out, corpus), "expert_parallel=true")
    return out


def test_ep_training_matches_one_process(single, ep_run):
    """Same global batch: the same losses, the same global gradient norms (the experts' gradients
    scaled to the mean over ranks, their norms summed over ranks, the replicated ones counted
    once), the same validation losses, and the same weights (routing biases included), every
    expert gathered into the exported checkpoint."""
    assert step_losses(ep_run) == pytest.approx(step_losses(single), rel=1e-5)
    assert grad_norms(ep_run) == pytest.approx(grad_norms(single), rel=1e-5)
    assert val_losses(ep_run) == pytest.approx(val_losses(single), rel=1e-5)  # the no-grad forwards: steps 0, 4, 8
    assert len(val_losses(ep_run)) == 3
    assert_same_weights(ep_run / "latest", single / "latest", atol=1e-5)
    assert optimizer_names(ep_run) == optimizer_names(single)  # every expert's moments, in its group
    model = nanoseek.load_model(ep_run / "latest")  # in one process, as any HF checkpoint
    assert [len(moe.experts) for moe in moe_layers(model)] == [8, 8]  # the MoE layer and the MTP module's
    files = read_tensors(ep_run / "latest")
    assert all(torch.equal(v, files[k]) for k, v in model.state_dict().items())


def optimizer_names(run):
    """The parameter names of a checkpoint's optimizer entries and of each of its param groups."""
    state = load_state(find_checkpoint(run))["optimizer"]
    return sorted(state["state"]), [sorted(g["params"]) for g in state["param_groups"]]


def test_ep_resume_is_exact(ep_run, corpus, tmp_path):
    """Resumed from its step-4 checkpoint on 2 ranks, the EP run takes the same steps bit for bit:
    each rank reloads its own experts' weights and optimizer state from the whole-model files."""
    torchrun(*overrides(tmp_path, corpus), "expert_parallel=true", "--resume-from", str(ep_run / "checkpoint-4"))
    assert step_losses(tmp_path) == step_losses(ep_run)[4:]
    assert grad_norms(tmp_path) == grad_norms(ep_run)[4:]
    assert_same_weights(tmp_path / "latest", ep_run / "latest", atol=0)


def test_ep_checkpoint_continues_in_one_process(ep_run, corpus, tmp_path):
    """A checkpoint written under EP is a whole model (weights and optimizer state): one process
    resumes it and takes the steps the EP run took."""
    cfg = load_run_config(PretrainConfig, TINY, [*overrides(tmp_path, corpus), "expert_parallel=true"])
    pretrain.train(cfg, resume=ep_run / "checkpoint-4")  # expert_parallel is ignored in one process
    assert step_losses(tmp_path) == pytest.approx(step_losses(ep_run)[4:], rel=1e-5)
    assert_same_weights(tmp_path / "latest", ep_run / "latest", atol=1e-5)


def test_one_process_checkpoint_continues_under_ep(single, corpus, tmp_path):
    """And the other way: EP on 2 ranks continues a one-process checkpoint, here with gradient
    accumulation (micro-batches of 1, so 2 per rank and step) and activation checkpointing (the
    backward reruns each layer's all-to-alls)."""
    torchrun(*overrides(tmp_path, corpus), "expert_parallel=true", "micro_batch_size=1",
             "activation_checkpointing=true", "--resume-from", str(single / "checkpoint-4"))
    assert step_losses(tmp_path) == pytest.approx(step_losses(single)[4:], rel=1e-5)
    assert grad_norms(tmp_path) == pytest.approx(grad_norms(single)[4:], rel=1e-5)
    assert_same_weights(tmp_path / "latest", single / "latest", atol=1e-5)


def test_ep_config_errors(corpus, tmp_path):
    from nanoseek.train.grpo import GRPOConfig

    for bad, says in ((["parallel=fsdp"], "does not compose with parallel=fsdp"),
                      (["sample_every=4"], "set sample_every=0")):
        with pytest.raises(ConfigError, match=says):
            load_run_config(PretrainConfig, TINY, ["expert_parallel=true", *bad])
    with pytest.raises(ConfigError, match="needs every expert on each rank"):
        load_run_config(GRPOConfig, None, ["expert_parallel=true"])
    # 3 experts over 2 ranks: one line naming both numbers, a non-zero exit
    with pytest.raises(AssertionError, match=r"n_routed_experts=3 does not divide over 2 ranks"):
        torchrun(*overrides(tmp_path, corpus), "expert_parallel=true", "model.n_routed_experts=3",
                 "model.n_group=1", "model.topk_group=1")


if __name__ == "__main__":
    {"layer": _layer_worker}[sys.argv[1]]()
