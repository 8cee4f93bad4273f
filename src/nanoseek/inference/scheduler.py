"""Continuous batching: which sequences run in the next forward (nano-vllm's policy).

Prefill first: each step first admits waiting sequences (up to max_num_seqs running and a padded
token budget) and, if it admitted any, runs only them; otherwise it runs one decode step for every
running sequence. So new requests join between decode steps and each sequence finishes on its own.

When a decode step needs a new cache block and none is free, the newest running sequence is
preempted by recomputation: its blocks are freed (hashed ones stay in the prefix cache), and it
goes back to the front of the queue to be prefilled again, prompt and generated tokens together.
"""

from __future__ import annotations

from collections import deque

from nanoseek.inference.block_manager import BlockManager
from nanoseek.inference.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int = 0):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens  # of the padded (B, T) prefill batch
        self.lookahead = lookahead  # extra slots a decode step writes (speculative draft tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next forward and whether it is a prefill (admission) step."""
        batch: list[Sequence] = []
        longest = 0
        bm = self.block_manager
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - len(bm.match_prefix(seq)) * bm.block_size
            padded = max(longest, new_tokens) * (len(batch) + 1)
            if batch and padded > self.max_num_batched_tokens:
                break
            if not bm.allocate(seq, self.lookahead):
                break
            longest = max(longest, len(seq) - seq.num_computed)
            seq.status = Status.RUNNING
            batch.append(self.waiting.popleft())
        if batch:
            self.running.extend(batch)
            return batch, True

        while self.running:
            seq = self.running.popleft()
            while not bm.can_append(seq, self.lookahead):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                bm.append(seq, self.lookahead)
                batch.append(seq)
        self.running.extend(batch)
        return batch, False

    def preempt(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        seq.status = Status.WAITING
        seq.mtp_last = None  # recomputed from scratch: its prefill is pending for the MTP cache again
        seq.mtp_pending.clear()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and free its blocks at once."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = Status.FINISHED
