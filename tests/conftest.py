"""Shared pytest fixtures."""

import random

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


# ---- a small word corpus for pretraining runs, and the distributed tests' one-process reference


WORDS = "the king queen lord lady sword crown night day love death fair foul sweet speak hear thou".split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of 8 text files of short random-word paragraphs (`data=` of the tiny recipe)."""
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(80))
        (d / f"doc{i}.txt").write_text(text)
    return d


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
