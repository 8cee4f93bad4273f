"""Scheduler: prefill-first admission, limits, decode batches, preemption by recomputation."""

from nanoseek.inference.block_manager import BlockManager
from nanoseek.inference.sampling import SamplingParams
from nanoseek.inference.scheduler import Scheduler
from nanoseek.inference.sequence import Request, Sequence, Status


def make_seq(ids, seq_id):
    return Sequence(seq_id, Request(f"r{seq_id}", None, list(ids), SamplingParams()), 0, generator=None)


def run_forward(seqs):
    """What the engine does after a forward: everything computed, one token sampled."""
    for s in seqs:
        s.num_computed = len(s)
        s.token_ids.append(7)


def test_prefill_first_then_decode():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_seq(range(5), 0), make_seq(range(3), 1)
    sched.add(a)
    sched.add(b)
    batch, is_prefill = sched.schedule()
    assert is_prefill and batch == [a, b] and a.status == b.status == Status.RUNNING
    run_forward(batch)
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a, b]
    c = make_seq(range(2), 2)
    sched.add(c)
    run_forward(batch)
    batch, is_prefill = sched.schedule()  # a new request joins between decode steps
    assert is_prefill and batch == [c]


def test_max_num_seqs_and_token_budget_limit_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(range(4), i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, _ = sched.schedule()
    assert batch == seqs[:2] and list(sched.waiting) == [seqs[2]]

    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    long, short = make_seq(range(8), 0), make_seq(range(2), 1)
    sched.add(long)
    sched.add(short)
    batch, _ = sched.schedule()  # padded cost of both would be 2 x 8 > 10
    assert batch == [long]


def test_a_lone_prompt_over_the_token_budget_still_runs():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=4)
    seq = make_seq(range(30), 0)
    sched.add(seq)
    assert sched.schedule() == ([seq], True)


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_seq(range(4), 0), make_seq(range(4), 1)
    sched.add(a)
    sched.add(b)
    batch, _ = sched.schedule()
    run_forward(batch)  # both now need a second block, only one is free
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a]
    assert b.status == Status.WAITING and sched.waiting[0] is b and b.block_table == []
    assert b.num_computed == 0 and sched.num_preemptions == 1
    assert len(b) == 5  # its generated token is kept: it will be recomputed with the prompt


def test_lookahead_reserves_draft_slots():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, lookahead=3)
    seq = make_seq(range(4), 0)
    sched.add(seq)
    sched.schedule()
    assert len(seq.block_table) == 2  # 4 tokens + 3 draft slots


def test_finish_removes_and_frees():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = make_seq(range(5), 0), make_seq(range(5), 1)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(a)
    assert a.status == Status.FINISHED and list(sched.running) == [b] and bm.num_free_blocks == 6
    c = make_seq(range(3), 2)
    sched.add(c)
    sched.finish(c)  # aborting a waiting sequence
    assert not sched.waiting
