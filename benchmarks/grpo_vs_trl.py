"""GRPO step speed: nanoseek's `rl` loop against TRL's GRPOTrainer, same model, task and batch.

    python benchmarks/grpo_vs_trl.py                          # random `small` checkpoint made here
    python benchmarks/grpo_vs_trl.py --model runs/pretrain_small/latest --steps 4

Both sides get the same checkpoint (a nanoseek directory is a DeepseekV3ForCausalLM checkpoint,
which TRL loads through transformers), the same R1-Zero prompts of the default task, the same
rewards (nanoseek.rewards accuracy + format), G samples per prompt, completions per step,
completion length, learning rate, temperature 1, GRPO loss with beta = 0 (TRL's default, so
neither side runs a reference model) and one optimizer step per generation (mu = 1), on the same
number of CPU threads. TRL generates with transformers' `generate` (its default back end; vLLM
needs a GPU), nanoseek with its own engine. Steps after the first `--warmup` are timed; the
report gives seconds per step, completions per second and their ratio.

With random weights (the default) completions almost never stop early, so both sides generate
the full completion length; with a trained model lengths follow the policy. nanoseek's update
leaves out the completions whose advantage is 0 (all-equal groups; with beta = 0 they add nothing
to the gradient), which TRL computes anyway. A random model earns reward 0 everywhere, so there the
update shrinks to one completion and the figure is mostly generation: pass `--model` with a
pretrained base (e.g. runs/pretrain_small/latest) for the R1-Zero regime, where most groups, but
not all, are all-equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from optional import require  # noqa: E402

from nanoseek.data.tasks import get_task, r1zero_prompt  # noqa: E402
from nanoseek.rewards import accuracy_reward, format_reward  # noqa: E402


def make_checkpoint(path: Path, preset_name: str) -> Path:
    """A randomly initialised `preset_name` checkpoint with a BPE trained on the synthetic corpus."""
    from nanoseek.checkpoint import save_model
    from nanoseek.config import preset
    from nanoseek.data.synthetic import generate_documents
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    vocab = {"tiny": 512, "small": 4096}[preset_name]
    tok = train_tokenizer(generate_documents(4000, seed=0), vocab_size=vocab)
    torch.manual_seed(0)
    cfg = preset(preset_name, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_model(Transformer(cfg), path, tokenizer=tok)
    return path


def run_trl(model_dir: Path, args, problems, out_dir: Path) -> list[float]:
    """Seconds of each GRPOTrainer step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MTP layer's keys are "unexpected" to transformers: expected
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": tokenizer.bos_token + r1zero_prompt(p.question), "idx": i}
                                 for i, p in enumerate(problems)])

    def accuracy(completions, idx, **kwargs):
        return [accuracy_reward(c, problems[i]) for c, i in zip(completions, idx)]

    def fmt(completions, **kwargs):
        return [format_reward(c) for c in completions]

    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=args.steps, per_device_train_batch_size=args.batch,
        num_generations=args.G, max_completion_length=args.max_tokens, temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=args.lr, beta=0.0, loss_type="grpo", num_iterations=1, use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no", seed=0,
        dataloader_num_workers=0, shuffle_dataset=False, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0,
    )
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)
            print(f"  trl step {len(times)}: {times[-1]:.2f}s", flush=True)

    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, fmt], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    lengths = [r.get("completions/mean_length") for r in trainer.state.log_history if "completions/mean_length" in r]
    print(f"  trl mean completion length per step: {lengths}", flush=True)
    return times


def run_nanoseek(model_dir: Path, args, out_dir: Path) -> list[float]:
    """Seconds of each nanoseek RL step (rollout + scoring + update, from metrics.jsonl)."""
    from nanoseek.train.grpo import GRPOConfig, train
    from nanoseek.train.metrics import read_metrics

    cfg = GRPOConfig(init=str(model_dir), out_dir=str(out_dir), max_steps=args.steps, batch_size=args.batch,
                     micro_batch_size=args.batch, num_generations=args.G, max_completion_length=args.max_tokens,
                     seq_len=args.max_tokens + 128, lr=args.lr, schedule="constant", warmup_steps=0, loss="grpo",
                     beta=0.0, log_kl=False, mu=1, eval_n=0, eval_every=0, save_every=0, tensorboard=False,
                     rewards={"accuracy": 1.0, "format": 1.0}, threads=args.threads)
    train(cfg)
    records = [r for r in read_metrics(out_dir) if "rollout_s" in r]
    print(f"  nanoseek mean completion length per step: {[round(r['len'], 1) for r in records]}", flush=True)
    return [r["rollout_s"] + r["update_s"] for r in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a random checkpoint of --preset)")
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--G", type=int, default=8, help="samples per prompt")
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion length")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    require("trl", "datasets", "transformers")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else make_checkpoint(tmp / "model", args.preset)
        problems = get_task("default").problems(args.steps * args.batch // args.G, seed=0, split="train")
        print(f"model {model_dir} | G={args.G}, {args.batch} completions/step, {args.max_tokens} tokens, "
              f"{args.steps} steps ({args.warmup} untimed), {args.threads} thread(s)", flush=True)
        print("TRL GRPOTrainer:", flush=True)
        trl_times = run_trl(model_dir, args, problems, tmp / "trl")
        print("nanoseek rl:", flush=True)
        ns_times = run_nanoseek(model_dir, args, tmp / "nanoseek")

    def summary(times):
        timed = times[args.warmup:] or times
        s = statistics.mean(timed)
        return {"seconds_per_step": s, "completions_per_s": args.batch / s, "steps_timed": len(timed)}

    report = {"trl": summary(trl_times), "nanoseek": summary(ns_times),
              "config": {k: v for k, v in vars(args).items() if k != "json"}}
    report["speedup"] = report["trl"]["seconds_per_step"] / report["nanoseek"]["seconds_per_step"]
    print(f"\n{'':10} {'s/step':>8} {'completions/s':>14}")
    for name in ("trl", "nanoseek"):
        print(f"{name:10} {report[name]['seconds_per_step']:8.2f} {report[name]['completions_per_s']:14.1f}")
    print(f"nanoseek is {report['speedup']:.1f}x faster than TRL per GRPO step")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
