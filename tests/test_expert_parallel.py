"""Expert parallelism on CPU: 2 gloo ranks launched by torchrun, against 1 process.

The layer test runs this file itself under torchrun (the `__main__` block at the bottom is the
per-rank worker); the training tests run `nanoseek pretrain` under torchrun as test_distributed does.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import read_tensors
from nanoseek.errors import ConfigError
from nanoseek.train import pretrain
from nanoseek.train.config import load_run_config
from nanoseek.train.pretrain import PretrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import TINY, corpus, overrides, step_losses, torchrun  # noqa: E402,F401  (corpus: a fixture)

from nanoseek.train.metrics import read_metrics  # noqa: E402


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
    experts, once with every token routed to rank 0's (rank 1 receives nothing and sends everything)."""
    out = run_workers("layer")
    assert out.count("layer ok") == 4, out  # 2 ranks x 2 routings


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
    assert sorted(ep.experts, key=int) == [str(i) for i in range(4 * rank, 4 * rank + 4)]
    ref.train(), ep.train()
    for crowd in (False, True):
        if crowd:  # everything to experts 0-3 (rank 0's): one all-to-all split is empty each way
            for m in (ref, ep):
                m.gate.e_score_correction_bias[:4] += 10.0
                m.zero_grad()
        x = torch.randn(W * 3, 7, 64)  # the same global batch on every rank; rank r takes rows [3r, 3r+3)
        g = torch.randn(W * 3, 7, 64)  # the loss is <y, g>, summed over all ranks' tokens
        x_ref = x.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * g).sum().backward()
        mine = slice(3 * rank, 3 * rank + 3)
        x_ep = x[mine].clone().requires_grad_()
        y_ep = ep(x_ep)
        (y_ep * g[mine]).sum().backward()
        def close(actual, expected, what):  # to 1e-6 of the tensor's scale: float sums in another order
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()),
                                       msg=lambda m: f"{what} (crowd={crowd}): {m}")

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


if __name__ == "__main__":
    {"layer": _layer_worker}[sys.argv[1]]()
