"""Can a scalar head tell a bare right digit_sum answer from a bare wrong one in one forward pass?

The README's GRM section argues that a meta RM (a scalar head on the judge's backbone) cannot beat
voting on this task because the items where judgments disagree are mostly a bare right answer
against bare wrong ones, and telling them apart means computing the digit sum. This script measures
the premise directly, with far more data than the meta RM ever gets: a ScalarRM on the reasoning
base, trained with the Bradley-Terry loss on (question, bare right answer) against (question, bare
wrong answer) pairs of fresh train-split questions, then scored on held-out pairs.

    python scripts/grm_scalar_probe.py --base runs/pretrain_reasoning/latest --steps 150,600,1500 --lr 1e-4

Prints the held-out pair accuracy (0.5 is chance) after each number of steps (batch 32 texts =
16 pairs, AdamW, each segment on its own warm-up and cosine schedule).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.tasks import get_task
from nanoseek.grm import ScalarRM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpointing import find_checkpoint
from nanoseek.train.grm import bt_text, pairwise_loss, train_scalar


def bare_pairs(problems, rng: random.Random) -> list[tuple[str, float]]:
    """(right, wrong, right, wrong, ...) texts: each question with its answer and a random wrong digit."""
    out = []
    for p in problems:
        wrong = rng.choice([d for d in "0123456789" if d != p.answer])
        out += [(bt_text(p.question, f" </think> <answer>{p.answer}</answer>"), 0.0),
                (bt_text(p.question, f" </think> <answer>{wrong}</answer>"), 0.0)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="runs/pretrain_reasoning/latest", help="the reasoning base checkpoint")
    parser.add_argument("--steps", default="150,600,1500", help="comma-separated step counts to evaluate at")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-questions", type=int, default=20000)
    parser.add_argument("--eval-questions", type=int, default=500)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = find_checkpoint(args.base)
    task, tokenizer = get_task("digit_sum"), Tokenizer.from_dir(base)
    rng = random.Random(0)
    train = bare_pairs(task.problems(args.train_questions, seed=1, split="train"), rng)
    held_out = bare_pairs(task.problems(args.eval_questions, seed=2, split="eval"), rng)
    rm, done = ScalarRM(load_model(base)), 0
    for steps in (int(s) for s in args.steps.split(",")):
        t0 = time.perf_counter()
        train_scalar(rm, tokenizer, train, pairwise_loss, steps - done, args.lr, seed=done, paired=True)
        done = steps
        scores = rm.score_texts(tokenizer, [text for text, _ in held_out])
        accuracy = sum(scores[i] > scores[i + 1] for i in range(0, len(scores), 2)) / (len(scores) // 2)
        print(f"steps {steps} (pairs seen {16 * steps:,}) lr {args.lr:g}: held-out pair accuracy {accuracy:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
