"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a shared, oversubscribed CPU.
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Run a test once per device: the CPU always, CUDA where there is a GPU (`-m cuda` selects those)."""
    return request.param


# ---- the distributed tests' corpus and one-process reference run (distributed_runs.py)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from distributed_runs import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def single(corpus, tmp_path_factory):
    """The tiny recipe's 8 pretraining steps in one process, what 2 ranks must reproduce."""
    from distributed_runs import TINY, overrides

    from nanoseek.train import pretrain
    from nanoseek.train.config import load_run_config
    from nanoseek.train.pretrain import PretrainConfig

    out = tmp_path_factory.mktemp("single")
    pretrain.train(load_run_config(PretrainConfig, TINY, overrides(out, corpus)))
    return out
