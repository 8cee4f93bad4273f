"""DeepSeek-GRM (SPCT) at toy scale: train a generative reward model, then measure its scaling.

    nanoseek grm --config configs/grm_small.toml ['steps=["data","cold_start"]'] [key=value ...]

The recipe, one step after the other (two of them beside the others, see 3); each writes its
artifact under out_dir and is skipped when that exists, so a re-run (or a run after Ctrl-C)
continues with the first unfinished step. Ctrl-C / SIGTERM in a training step (cold_start, rft, rl,
the no-principles ablation) saves its checkpoint and stops the recipe (exit 130), a step running
beside it included; the re-run resumes that training from the checkpoint:

1. data        The policy (the reasoning base) answers digit_sum questions, 8 samples each at T = 1;
               the rule verifier labels them. No human labels: items are built from these samples -
               pairs and groups of 4 with exactly one correct response, and single responses with
               their 0/1 label. Training items come from train-split questions only, the held-out
               items (and the best-of-8 set) from eval-split questions (`tasks.split_of`).
2. cold_start  The judge starts from the reasoning base, which has never seen a judgment, so its
               first failure would be format. As DeepSeek used a stronger model for its first
               trajectories, a program writes them here: principles with sampled weights, a
               critique that reads only the question and each response's text (never the gold
               answer or the label) - `ok` when the response's running sums check out step by step
               and end in its answer, `bad` when they do not, `none` for a bare answer, `void`
               without one - and the scores those imply. SFT on them (`nanoseek.train.sft`).
3. ablations   What the evaluation compares the GRM with, on the held-out items: a judge trained
               without principles (the same cold start, no principle line) beside the GRM's own
               cold start, a Bradley-Terry scalar RM on the same backbone and data, and "solve and
               compare" (the base answers the question itself; responses that agree with it score
               high). They need only the data and the cold-start judge, so by default
               (beside=true) they run in a second process, on the CPU's other core, while steps 4-8
               run here (best_of_n likewise beside 7-8); evaluate waits for both. The numbers are
               the same either way.
4. rft         Rejective fine-tuning (§3.2): the judge samples N_RFT judgments per item; those
               whose scores single out the right response are kept, items every sample gets right
               are dropped as too easy, and items every sample fails get hinted sampling ("The best
               response is: Response j" appended), keeping one right hinted judgment per item
               under the un-hinted prompt. SFT on the kept judgments plus the cold-start data (the paper
               mixes general data in the same way).
5. rl          Rule-based online RL: GRPO on judge prompts with the +1/-1 reward of eq. 11 (the
               update is `grpo.prepare_update` / `policy_loss` on the shared `Trainer`).
6. best_of_n   Best-of-8 reranking of the policy's own held-out samples by the trained judge,
               against the policy's pass@1 and maj@8 (beside steps 7-8 by default).
7. meta        The meta RM: a scalar head on a copy of the judge's backbone that rates a sampled
               judgment (its prompt as the judge saw it plus its text), for meta-RM guided voting.
               The paper trains it with BCE on "is this judgment right" (eq. 10, meta_loss="bce");
               here most items' judgments all agree, so BCE learns which *items* are hard. The
               default (meta_loss="pairwise") trains on the within-item contrast instead: only
               items whose meta_samples judgments disagree, -log sigmoid(r(right) - r(wrong)) for
               a right and a wrong judgment of the same item; still one scalar per judgment.
8. evaluate    On the held-out items: k = 16 judgments per item at T = 0.5, responses shuffled per
               sample; Voting@k for k = 1, 2, 4, 8, 16 sums the first k, MetaRM@k keeps the k/2 the
               meta RM rates highest. The report adds the results of steps 3 and 6.

Writes `grm_report.json` (parse rate, accuracies, ablations, best-of-N, seconds per step) and the
figure `grm_scaling.png`; `latest` points at the trained judge, `meta/` holds the meta RM.

Deviations from the paper, deliberate and forced by the scale: the principles are two weighted
criteria (worked reasoning, format) rather than free text; the critique is one verdict per
response; the cold-start trajectories come from a program, not a stronger LM; singles are
trained with the 1..10 scale (right = the score on the label's side of 5.5) rather than 0/1.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.checkpoint import atomic_write_text
from nanoseek.data.tasks import DigitSumTask, derive_seed, extract_answer, get_task, prompt_of, reasoning_of, split_of
from nanoseek.errors import ConfigError, NanoseekError, check_out_dir
from nanoseek.eval import majority_answer
from nanoseek.grm import (GRM, JUDGE_MAX_TOKENS, Judgment, ScalarRM, encode_batch, format_judgment, judge_prompt,
                          judgment_correct, meta_text, rule_reward, strictly_best, summed_scores)
from nanoseek.rewards import accuracy_reward, format_reward
from nanoseek.train import stage
from nanoseek.train.checkpointing import find_checkpoint, list_checkpoints, point_latest, stopped_early
from nanoseek.train.config import TrainConfig
from nanoseek.train.distributed import launch_world_size

STEPS = ("data", "cold_start", "ablations", "rft", "rl", "best_of_n", "meta", "evaluate")
BESIDE = ("ablations", "best_of_n")  # steps that run in a second process beside the next ones (beside=true)
USER_ERROR = "user error: "  # how a step run beside reports a NanoseekError in its log
REPORT, FIGURE = "grm_report.json", "grm_scaling.png"


class Stopped(Exception):
    """Ctrl-C / SIGTERM stopped one of the recipe's trainings after it saved its checkpoint: the
    step is not done, and neither is any step after it."""


@dataclass
class GRMConfig(TrainConfig):
    out_dir: str = "runs/grm"
    init: str = ""  # the judge's starting point: the reasoning base checkpoint
    policy: str = ""  # whose samples are judged ("" = init)
    task: str = "digit_sum"
    task_args: dict = field(default_factory=dict)  # e.g. task_args.length=4
    steps: list[str] = field(default_factory=lambda: list(STEPS))  # run only these (each needs its inputs)
    # 1. data
    train_questions: int = 1500
    eval_questions: int = 500  # held-out items (one per question) and the best-of-8 set
    policy_samples: int = 8
    policy_temperature: float = 1.0
    policy_max_tokens: int = 32
    item_mix: dict[str, float] = field(default_factory=lambda: {"pair": 0.4, "group": 0.4, "single": 0.2})
    eval_mix: dict[str, float] = field(default_factory=lambda: {"pair": 0.5, "group": 0.5})
    group_size: int = 4
    fill_right: bool = False  # toy runs: a question with no right sample gets the gold answer as one (see data)
    # 2. cold start (SFT on program-written judgments)
    cold_steps: int = 300  # 150 parsed 90% on one base, 99% on another: the recipe must not hang on its bits
    cold_lr: float = 1e-3
    # 3. rejective fine-tuning
    rft_items: int = 600
    rft_samples: int = 3
    rft_temperature: float = 1.0
    rft_steps: int = 60
    rft_lr: float = 3e-4
    # 4. online RL
    rl_steps: int = 20
    rl_items: int = 32  # judge prompts per step
    rl_generations: int = 4  # G
    rl_lr: float = 5e-5
    rl_beta: float = 0.04
    rl_temperature: float = 1.0
    # 5. meta RM
    meta_items: int = 1000
    meta_samples: int = 8  # judgments per item: items whose judgments disagree are what the pairwise loss uses
    meta_steps: int = 60
    meta_loss: str = "pairwise"  # "pairwise": a right vs a wrong judgment of the same item; "bce": eq. 10
    meta_lr: float = 1e-3
    # 6. evaluation
    eval_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    eval_temperature: float = 0.5
    judge_max_tokens: int = JUDGE_MAX_TOKENS  # 96: a judgment of 4 responses is ~70 tokens (about one per character)
    best_of_n_k: int = 2  # judgments summed per response when reranking the policy's samples
    ablations: list[str] = field(default_factory=lambda: ["no_principles", "bt", "solve"])
    ablation_k: int = 8
    bt_steps: int = 150
    # the ablations (after cold_start) and best_of_n (after rl) each in a second process, on the CPU's
    # other core, beside the steps after them (the same numbers as in line; their output: <step>.log)
    beside: bool = True
    # TrainConfig defaults that suit this recipe
    batch_size: int = 16
    seq_len: int = 256
    threads: int = 1
    log_every: int = 25
    eval_every: int = 0
    keep_checkpoints: int = 1
    tensorboard: bool = False
    max_steps: int = 1  # unused: each step has its own count

    def __post_init__(self):
        super().__post_init__()
        if self.expert_parallel:  # its rollouts run the whole policy on each rank
            raise ConfigError("expert_parallel=true: GRM training generates with the inference engine, which needs every "
                              "expert on each rank; set expert_parallel=false (DDP or FSDP2 train the policy)")
        unknown = sorted(set(self.steps) - set(STEPS))
        if unknown:
            raise ConfigError(f"steps: unknown {unknown}; the recipe's steps are {', '.join(STEPS)}")
        for name, mix in (("item_mix", self.item_mix), ("eval_mix", self.eval_mix)):
            if not mix or set(mix) - {"pair", "group", "single"} or min(mix.values()) < 0:
                raise ConfigError(f"{name}={mix}: weights for pair / group / single, >= 0")
        if "single" in self.eval_mix and self.eval_mix["single"]:
            raise ConfigError("eval_mix: held-out accuracy is about picking the best response; use pair / group")
        if not 2 <= self.group_size <= 6:
            raise ConfigError(f"group_size={self.group_size} must be in [2, 6] (the judge's context is short)")
        if not self.eval_k or min(self.eval_k) < 1:
            raise ConfigError(f"eval_k={self.eval_k}: positive sample counts")
        unknown = sorted(set(self.ablations) - {"no_principles", "bt", "solve"})
        if unknown:
            raise ConfigError(f"ablations: unknown {unknown}; choose from no_principles, bt, solve")
        for name in ("train_questions", "eval_questions", "policy_samples", "rft_samples", "rl_items",
                     "meta_samples", "best_of_n_k", "ablation_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.meta_loss not in ("pairwise", "bce"):
            raise ConfigError(f"meta_loss={self.meta_loss!r}: pairwise or bce")
        if self.rl_generations < 2:
            raise ConfigError(f"rl_generations={self.rl_generations}: GRPO needs at least 2 samples per prompt")


# ============================================================== items


@dataclass
class Item:
    """A reward-modelling example: a question, its responses, the index of the one right response
    (-1 for a single response) and, for a single, its 0/1 label."""

    question: str
    responses: list[str]
    best: int
    label: int | None = None
    kind: str = "pair"

    @property
    def pair(self) -> tuple[str, list[str]]:
        return self.question, self.responses


def majority_is_right(samples: list[str], labels: list[int]) -> bool:
    """maj@N: whether the most frequent answer (votes grouped by their stripped text, so "0.5" and
    "1/2" vote apart) is right, graded as the samples that give it were (their labels, from the
    task's own scorer), not by comparing its text with the gold answer."""
    answers = [extract_answer(s) for s in samples]
    vote = majority_answer(answers)
    return vote is not None and any(label for a, label in zip(answers, labels) if a is not None and a.strip() == vote)


def build_items(question: str, samples: list[str], labels: list[int], kind: str, group_size: int,
                rng: random.Random) -> Item | None:
    """One item of `kind` from a question's labelled policy samples: a pair or a group with
    exactly one right response (others wrong, in random order), or a single response. None when
    the samples cannot make that kind (no right one, or too few wrong ones)."""
    right = [s for s, l in zip(samples, labels) if l]
    wrong = [s for s, l in zip(samples, labels) if not l]
    if kind == "single":
        i = rng.randrange(len(samples))
        return Item(question, [samples[i]], -1, labels[i], "single")
    need = 1 if kind == "pair" else group_size - 1
    if not right or len(wrong) < need:
        return None
    responses = [rng.choice(right)] + rng.sample(wrong, need)
    order = list(range(len(responses)))
    rng.shuffle(order)
    return Item(question, [responses[o] for o in order], order.index(0), None, kind)


def item_correct(item: Item, scores: list[int] | None) -> bool:
    return judgment_correct(scores, item.best, item.label)


# ============================================================== the program-written critique


def verdict_of(question: str, response: str) -> str:
    """The critique's verdict on one response, from the question and the response text alone:
    `ok` when its reasoning is the running sums of the question's digits, checked step by step,
    and ends in its answer; `bad` when the reasoning is there but does not check out; `none` for
    an answer without reasoning; `void` without an answer."""
    answer = extract_answer(response)
    if answer is None:
        return "void"
    reasoning = reasoning_of(response)
    if not reasoning:
        return "none"
    opening = DigitSumTask.chain_opening.strip()
    chain = reasoning.removeprefix(opening).strip()
    if not reasoning.startswith(opening) or not question.isdigit() or len(chain) != len(question) or not chain.isdigit():
        return "bad"
    total = 0
    for digit, step in zip(question, chain):
        total = (total + int(digit)) % 10
        if int(step) != total:
            return "bad"
    return "ok" if answer.strip() == chain[-1] else "bad"


WORK = {"ok": 1.0, "none": 0.2, "bad": 0.0, "void": 0.0}
FIXED_PRINCIPLES = [("work", 7), ("form", 3)]  # the no-principles judge's implicit weights


def program_judgment(item: Item, rng: random.Random | None, principles: bool = True) -> str:
    """The cold-start judgment of `item`: principles (the weights of worked reasoning and format,
    sampled: rng) -> the critique's verdicts -> scores 1 + 9 x the weighted criteria. `rng` None
    gives the fixed weights."""
    weights = FIXED_PRINCIPLES
    if rng is not None:
        w = rng.randint(5, 9)
        weights = [("work", w), ("form", 10 - w)]
    verdicts = [verdict_of(item.question, r) for r in item.responses]
    (_, w_work), (_, w_form) = weights
    scores = [int(1 + 9 * (w_work * WORK[v] + w_form * format_reward(r)) / (w_work + w_form) + 0.5)
              for v, r in zip(verdicts, item.responses)]
    return format_judgment(weights if principles else None, verdicts, scores)


# ============================================================== the recipe


class Recipe:
    """The run directory and the steps' shared state; each step is a method named like the step."""

    def __init__(self, cfg: GRMConfig):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base = find_checkpoint(cfg.init) if cfg.init else None
        if self.base is None:
            raise ConfigError("init is not set: give the reasoning base, e.g. init=runs/pretrain_reasoning/latest")
        self.policy = find_checkpoint(cfg.policy) if cfg.policy else self.base
        self.task = get_task(cfg.task, **cfg.task_args)
        self.timings = self._read(self.out / "timings.json", {})
        self.beside = {}  # step -> (process, log): the steps running in a second process

    # ---- bookkeeping: artifacts, timings, skip-when-done

    @staticmethod
    def _read(path: Path, default):
        return json.loads(path.read_text()) if path.is_file() else default

    @staticmethod
    def _write(path: Path, obj) -> None:
        atomic_write_text(path, json.dumps(obj, indent=1) + "\n")  # a Ctrl-C never leaves half a file

    def done(self, step: str) -> bool:
        return step in self.timings

    def finish(self, step: str, wall: float, cpu: float, **extra) -> None:
        self.timings[step] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **extra}
        self._write(self.out / "timings.json", self.timings)
        how = f" beside the main line (waited {extra['waited_s']:.1f}s for it)" if "waited_s" in extra else ""
        print(f"grm: step {step} done in {wall:.1f}s wall, {cpu:.1f}s CPU{how}", flush=True)

    def run(self) -> Path:
        try:
            for step in STEPS:
                if step not in self.cfg.steps:
                    continue
                if self.done(step):
                    print(f"grm: step {step} already done, skipped", flush=True)
                    continue
                if step in BESIDE and self.cfg.beside:
                    self.start_beside(step)
                    continue
                if step == "evaluate":
                    self.join_beside()  # its report holds their results
                print(f"grm: step {step}", flush=True)
                t0, c0 = time.perf_counter(), time.process_time()
                getattr(self, step)()
                self.finish(step, time.perf_counter() - t0, time.process_time() - c0)
            self.join_beside()
        finally:
            self.stop_beside()  # only if the main line stopped or failed: it is joined otherwise
        return self.out

    # ---- steps in a second process, beside the main line

    def start_beside(self, step: str) -> None:
        """Start `step` in a process of its own (spawned, so it shares no threads or state with
        this one); its output goes to out_dir/<step>.log, its result to out_dir/<step>.json."""
        import multiprocessing

        log = self.out / f"{step}.log"
        process = multiprocessing.get_context("spawn").Process(target=_run_beside, args=(self.cfg, step, str(log)),
                                                              name=f"grm-{step}")
        process.start()
        self.beside[step] = (process, log)
        print(f"grm: step {step}, in a second process beside the next steps (log: {log})", flush=True)

    def join_beside(self) -> None:
        """Wait for the steps running beside, then record each done (or say why it is not)."""
        while self.beside:
            step, (process, log) = next(iter(self.beside.items()))
            t0 = time.perf_counter()
            process.join()
            del self.beside[step]
            if process.exitcode == stage.STOPPED_EARLY:
                raise Stopped(log)
            text = log.read_text(errors="replace") if log.is_file() else ""
            if process.exitcode == 2 and USER_ERROR in text:
                raise NanoseekError(f"step {step} (run beside the others, log {log}): "
                                    f"{text.rsplit(USER_ERROR, 1)[1].strip()}")
            if process.exitcode != 0:
                tail = "\n".join(text.splitlines()[-12:])
                raise NanoseekError(f"step {step}, run beside the others, failed (exit status {process.exitcode}); "
                                    f"the end of {log}:\n{tail}\nrun it alone to see it in full: "
                                    f"'steps=[\"{step}\"]' beside=false")
            spent = self._read(self.out / f"{step}.json", {})["seconds"]
            self.finish(step, spent["wall_s"], spent["cpu_s"], waited_s=round(time.perf_counter() - t0, 2))

    def stop_beside(self) -> None:
        """The main line stopped (Ctrl-C, SIGTERM) or failed: the steps beside it stop too, saving
        a training checkpoint if one is in a training (a SIGTERM after the terminal's own SIGINT is
        the repeated signal the trainer ignores, so it never cuts a save short)."""
        for step, (process, _) in list(self.beside.items()):
            if process.is_alive():
                process.terminate()  # SIGTERM
                process.join()
            print(f"grm: step {step}, beside, stopped with the recipe", flush=True)
        self.beside.clear()

    def save_result(self, step: str, result: dict, t0: float, c0: float) -> None:
        """The artifact of a step that may run beside: out_dir/<step>.json, its result and its own
        seconds (which the main line records when it joins the step)."""
        seconds = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2)}
        self._write(self.out / f"{step}.json", {**result, "seconds": seconds})

    def judge_dir(self, name: str) -> Path:
        return find_checkpoint(self.out / name)

    def items(self, name: str) -> list[Item]:
        path = self.out / "data" / f"{name}.jsonl"
        if not path.is_file():
            raise NanoseekError(f"{path} is missing: run the data step first (steps=data)")
        return [Item(**json.loads(line)) for line in path.read_text().splitlines()]

    def trained(self, name: str) -> bool:
        """Whether the training into out_dir/name ran to its max_steps (not stopped, not begun)."""
        return bool(list_checkpoints(self.out / name)) and not stopped_early(self.judge_dir(name))

    def _train(self, name: str, train_fn, cfg) -> Path:
        """Run a training of the recipe into out_dir/name, continuing from its checkpoint when an
        earlier invocation was stopped there; Stopped when Ctrl-C / SIGTERM stops this one."""
        resume = "latest" if list_checkpoints(self.out / name) else None
        path = train_fn(cfg, resume=resume)
        if stopped_early(path):
            raise Stopped(path)
        return path

    def _sft(self, name: str, init: Path, rows: list[dict], steps: int, lr: float) -> Path:
        """SFT of a judge on prompt/completion rows (the sft stage's loop), into out_dir/name."""
        from nanoseek.train import sft

        data = self.out / "data" / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
        cfg = sft.SFTConfig(out_dir=str(self.out / name), init=str(init), data=[str(data)], max_steps=steps,
                            batch_size=self.cfg.batch_size, lr=lr, warmup_steps=min(10, steps // 10),
                            seq_len=self.cfg.seq_len, threads=self.cfg.threads, device=self.cfg.device,
                            val_fraction=0.0, eval_every=0, log_every=self.cfg.log_every, save_every=0,
                            keep_checkpoints=1, tensorboard=False, seed=self.cfg.seed, bias_gamma=0.0,
                            activation_checkpointing=self.cfg.activation_checkpointing,
                            optimizer=self.cfg.optimizer, muon_momentum=self.cfg.muon_momentum)
        return self._train(name, sft.train, cfg)

    # ---- 1. data

    def data(self) -> None:
        from nanoseek.inference.engine import LLM
        from nanoseek.inference.sampling import SamplingParams

        cfg = self.cfg
        llm = LLM(self.policy, max_num_seqs=256, block_size=16, device=cfg.device)
        (self.out / "data").mkdir(exist_ok=True)
        for split, n in (("train", cfg.train_questions), ("eval", cfg.eval_questions)):
            problems = self.task.problems(n, seed=cfg.seed, split=split)
            params = [SamplingParams(n=cfg.policy_samples, temperature=cfg.policy_temperature,
                                     max_tokens=cfg.policy_max_tokens, seed=derive_seed("grm-policy", split, i))
                      for i in range(len(problems))]
            outputs = llm.generate([prompt_of(p) for p in problems], params)
            rows, items = [], []
            mix = cfg.item_mix if split == "train" else cfg.eval_mix
            kinds = [k for k, w in mix.items() if w > 0]
            rng = random.Random(derive_seed("grm-items", cfg.seed, split))
            for p, out in zip(problems, outputs):
                assert split_of(p.question) == split  # the task's hash split: no eval question in training
                samples = [c.text for c in out.outputs]
                labels = [int(accuracy_reward(t, p)) for t in samples]
                # the rows keep the policy's own samples: best-of-N is measured on what it wrote
                rows.append({"question": p.question, "answer": p.answer, "samples": samples, "labels": labels})
                if cfg.fill_right and not any(labels) and len(samples) > 1:
                    # an under-trained policy may never be right: a bare right answer in place of one
                    # sample, so the toy run still has judge items with a right and a wrong response
                    at = rng.randrange(len(samples))
                    samples, labels = list(samples), list(labels)
                    samples[at], labels[at] = f" </think> <answer>{p.answer}</answer>", 1
                kind = rng.choices(kinds, [mix[k] for k in kinds])[0]
                item = build_items(p.question, samples, labels, kind, cfg.group_size, rng)
                if item is None and kind != "single" and split == "train":
                    item = build_items(p.question, samples, labels, "single", cfg.group_size, rng)
                if item is not None:
                    items.append(item)
            atomic_write_text(self.out / "data" / f"policy_{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(self.out / "data" / f"items_{split}.jsonl",
                              "".join(json.dumps(item.__dict__) + "\n" for item in items))
            right = sum(sum(r["labels"]) for r in rows) / (len(rows) * cfg.policy_samples)
            if not any(it.kind != "single" for it in items):
                raise NanoseekError(f"grm data: the policy's {split} samples never had a right and a wrong response "
                                    f"for one question, so there is no {split} item; raise {split}_questions, use a "
                                    "stronger policy, or (toy runs only) fill_right=true")
            print(f"grm: {split}: {len(rows)} questions x {cfg.policy_samples} samples ({right:.1%} right) -> "
                  f"{len(items)} items {dict(Counter(i.kind for i in items))}", flush=True)

    # ---- 2. cold start

    def cold_rows(self, principles: bool) -> list[dict]:
        rng = random.Random(derive_seed("grm-cold", self.cfg.seed))
        return [{"prompt": judge_prompt(it.question, it.responses, principles=principles),
                 "completion": program_judgment(it, rng if principles else None, principles)}
                for it in self.items("items_train")]

    def cold_start(self) -> None:
        self._sft("cold_start", self.base, self.cold_rows(True), self.cfg.cold_steps, self.cfg.cold_lr)

    # ---- 4. rejective fine-tuning

    def rft(self) -> None:
        cfg = self.cfg
        judge = GRM(self.judge_dir("cold_start"), max_tokens=cfg.judge_max_tokens)
        items = [it for it in self.items("items_train") if it.kind != "single"][: cfg.rft_items]
        samples = judge.sample([it.pair for it in items], cfg.rft_samples, seed=derive_seed(cfg.seed, "rft"),
                               temperature=cfg.rft_temperature)
        kept, easy, hinted_items, hinted_kept = [], 0, [], 0
        for it, js in zip(items, samples):
            right = [j for j in js if item_correct(it, j.scores)]
            if len(right) == len(js):
                easy += 1  # too easy: nothing to learn
            elif right:
                kept += [(it, j) for j in right]
            else:
                hinted_items.append(it)
        if hinted_items:  # hinted sampling: name the best response, keep right judgments, train un-hinted
            hinted = judge.sample([it.pair for it in hinted_items], cfg.rft_samples,
                                  seed=derive_seed(cfg.seed, "rft-hint"), temperature=cfg.rft_temperature,
                                  hints=[it.best for it in hinted_items])
            for it, js in zip(hinted_items, hinted):
                right = [j for j in js if item_correct(it, j.scores)]
                hinted_kept += len(right)
                kept += [(it, j) for j in right[:1]]
        rows = [{"prompt": judge_prompt(it.question, [it.responses[o] for o in j.order]), "completion": j.text}
                for it, j in kept]
        stats = {"items": len(items), "too_easy": easy, "hinted_items": len(hinted_items),
                 "hinted_right": hinted_kept, "kept_judgments": len(rows)}
        self._write(self.out / "data" / "rft_stats.json", stats)
        print(f"grm: rft {stats}", flush=True)
        rows += self.cold_rows(True)  # the general data beside the rejection-sampled (the paper's mix)
        self._sft("rft", self.judge_dir("cold_start"), rows, cfg.rft_steps, cfg.rft_lr)

    # ---- 5. online RL with the +1/-1 rule

    def rl(self) -> None:
        from nanoseek.checkpoint import load_model
        from nanoseek.inference.engine import LLM
        from nanoseek.tokenizer import Tokenizer
        from nanoseek.train.distributed import seed_everything
        from nanoseek.train.grpo import GRPOConfig, Sample, policy_loss, prepare_update
        from nanoseek.train.stage import run_stage, stage_model
        from nanoseek.train.trainer import Trainer

        cfg = self.cfg
        start = self.judge_dir("rft")
        rl_cfg = GRPOConfig(out_dir=str(self.out / "rl"), init=str(start), num_generations=cfg.rl_generations,
                            batch_size=cfg.rl_items * cfg.rl_generations, micro_batch_size=0,
                            max_completion_length=cfg.judge_max_tokens, temperature=cfg.rl_temperature,
                            lr=cfg.rl_lr, beta=cfg.rl_beta, log_kl=False, max_steps=cfg.rl_steps, eval_n=0,
                            seq_len=cfg.seq_len, threads=cfg.threads, device=cfg.device, seed=cfg.seed,
                            log_every=cfg.log_every, save_every=0, keep_checkpoints=1, tensorboard=False,
                            warmup_steps=2, activation_checkpointing=cfg.activation_checkpointing,
                            optimizer=cfg.optimizer, muon_momentum=cfg.muon_momentum)
        items = [it for it in self.items("items_train") if it.kind != "single"]

        def loop(rl_cfg, env, resume):
            tokenizer = Tokenizer.from_dir(start)
            seed_everything(rl_cfg.seed)
            judge = stage_model(str(start), tokenizer, {}, rl_cfg.seq_len).to(env.device)
            judge.mtp_layers.requires_grad_(False)
            reference = load_model(start, device=env.device).eval().requires_grad_(False)
            with Trainer(rl_cfg, judge, env, tokenizer=tokenizer, resume=resume) as trainer:
                llm = LLM(trainer.raw_model, tokenizer, max_num_seqs=rl_cfg.batch_size, max_model_len=rl_cfg.seq_len,
                          block_size=16, device=str(env.device))
                grm = GRM(llm, max_tokens=cfg.judge_max_tokens)
                while trainer.step < rl_cfg.max_steps:
                    # rollout: G judgments of each of this step's items (shuffled order per sample)
                    t0 = time.perf_counter()
                    rng = random.Random(derive_seed(cfg.seed, "rl", trainer.step))
                    step_items = rng.sample(items, min(cfg.rl_items, len(items)))
                    llm.reset_prefix_cache()
                    batch = []
                    for it, js in zip(step_items, grm.sample([it.pair for it in step_items], cfg.rl_generations,
                                                             seed=derive_seed(cfg.seed, "rl-sample", trainer.step),
                                                             temperature=cfg.rl_temperature, logprobs=True)):
                        for j in js:  # reward: eq. 11, +1 iff the scores single out the right response
                            batch.append(Sample(it, j.prompt_ids, j.token_ids, j.logprobs, j.text,
                                                j.finish_reason == "length", reward=rule_reward(j.scores, it.best)))
                    rollout_s = time.perf_counter() - t0
                    trained, micro_batches, _ = prepare_update(batch, rl_cfg, env, trainer, reference, tokenizer.pad_id)
                    stats = trainer.train_step(micro_batches, policy_loss(rl_cfg, trainer.raw_model.lm_head,
                                                                          scale=len(micro_batches)))
                    llm.reset_prefix_cache()
                    rewards = [s.reward for s in batch]
                    trainer.log({"reward": sum(rewards) / len(rewards), "rollout_s": rollout_s,
                                 "trained": len(trained) / len(batch),
                                 "parse_rate": sum(s.text.count("\\boxed") > 0 for s in batch) / len(batch), **stats})
                    if trainer.end_of_step():
                        break
                return trainer.save_checkpoint()

        self._train("rl", lambda rl_cfg, resume: run_stage(loop, rl_cfg, resume), rl_cfg)
        point_latest(self.out, self.judge_dir("rl"))  # the recipe's judge: the RL-trained one

    # ---- 6. best-of-N (by default in a second process, beside steps 7-8)

    def best_of_n(self) -> None:
        """The policy's own held-out samples: pass@1 (mean over samples), maj@N, and the sample the
        GRM scores highest (each response judged alone, best_of_n_k judgments summed; ties random)."""
        from nanoseek.grm import rerank

        t0, c0 = time.perf_counter(), time.process_time()
        judge = GRM(find_checkpoint(self.out / "latest"), max_tokens=self.cfg.judge_max_tokens)
        rows = [json.loads(line) for line in (self.out / "data" / "policy_eval.jsonl").read_text().splitlines()]
        n = len(rows[0]["samples"])
        picks, parsed = rerank(judge, [r["question"] for r in rows], [r["samples"] for r in rows],
                               k=self.cfg.best_of_n_k, seed=self.cfg.seed)
        pass1 = sum(sum(r["labels"]) / n for r in rows) / len(rows)
        maj = sum(majority_is_right(r["samples"], r["labels"]) for r in rows)
        grm = sum(r["labels"][pick] for r, pick in zip(rows, picks))
        self.save_result("best_of_n", {"result": {"policy_pass1": pass1, f"maj@{n}": maj / len(rows),
                                                  f"grm@{n}": grm / len(rows), "n": n, "questions": len(rows),
                                                  "parse_rate": parsed}}, t0, c0)

    # ---- 7. the meta RM

    def meta(self) -> None:
        from nanoseek.checkpoint import load_model

        cfg = self.cfg
        judge_dir = find_checkpoint(self.out / "latest")
        judge = GRM(judge_dir, max_tokens=cfg.judge_max_tokens)
        items = [it for it in self.items("items_train") if it.kind != "single"][-cfg.meta_items:]
        samples = judge.sample([it.pair for it in items], cfg.meta_samples, seed=derive_seed(cfg.seed, "meta"),
                               temperature=cfg.eval_temperature)
        per_item = [[(meta_text(it.question, it.responses, j), float(item_correct(it, j.scores))) for j in js]
                    for it, js in zip(items, samples)]
        # selection happens within an item, so what the meta RM must learn is which judgment of an item to
        # trust: the items whose judgments disagree carry that (the others only say which items are hard)
        mixed = [ex for ex in per_item if 0 < sum(y for _, y in ex) < len(ex)]
        right = sum(y for ex in per_item for _, y in ex) / max(1, sum(map(len, per_item)))
        stats = {"items": len(items), "judgments": sum(map(len, per_item)), "right": right, "mixed_items": len(mixed),
                 "loss": cfg.meta_loss if mixed else "bce"}  # no item with both: BCE is all there is to learn
        print(f"grm: meta RM data {stats}", flush=True)
        rm = ScalarRM(load_model(judge_dir))
        rng = random.Random(derive_seed(cfg.seed, "meta-pairs"))
        if cfg.meta_loss == "pairwise" and mixed:
            # within-item contrast: -log sigmoid(r(right judgment) - r(wrong judgment of the same item))
            examples = []
            for ex in mixed:
                good, bad = [e for e in ex if e[1]], [e for e in ex if not e[1]]
                for _ in range(max(1, cfg.meta_samples // 2)):
                    examples += [rng.choice(good), rng.choice(bad)]

            train_scalar(rm, judge.tokenizer, examples, pairwise_loss, cfg.meta_steps, cfg.meta_lr, cfg.seed, paired=True)
        else:  # eq. 10: BCE on every judgment, the classes balanced
            examples = [e for ex in per_item for e in ex]
            positive = sum(y for _, y in examples) / len(examples)
            pos_weight = torch.tensor((1 - positive) / max(positive, 1e-6))

            def loss(scores, batch_labels):
                return F.binary_cross_entropy_with_logits(scores, batch_labels, pos_weight=pos_weight)

            train_scalar(rm, judge.tokenizer, examples, loss, cfg.meta_steps, cfg.meta_lr, cfg.seed)
        self._write(self.out / "data" / "meta_stats.json", stats)
        rm.save(self.out / "meta", judge.tokenizer)

    # ---- 8. evaluation

    def evaluate(self) -> None:
        cfg = self.cfg
        items = self.items("items_eval")
        if not items:
            raise NanoseekError("no held-out item: the policy's eval samples never had one right and one wrong "
                                "response; raise eval_questions or use a stronger policy")
        report = {"task": self.task.name, "items": len(items), "kinds": dict(Counter(i.kind for i in items)),
                  "eval_temperature": cfg.eval_temperature, "k": max(cfg.eval_k)}
        judge = GRM(find_checkpoint(self.out / "latest"), meta=self.out / "meta", max_tokens=cfg.judge_max_tokens)
        K = max(cfg.eval_k)
        t0 = time.perf_counter()
        samples = judge.sample([it.pair for it in items], K, seed=derive_seed(cfg.seed, "eval"),
                               temperature=cfg.eval_temperature)
        report["judge_seconds"] = time.perf_counter() - t0
        report["parse_rate"] = sum(j.parsed for js in samples for j in js) / (K * len(items))
        report["single_sample"] = sum(item_correct(it, j.scores) for it, js in zip(items, samples)
                                      for j in js) / (K * len(items))
        report["voting"] = {str(k): voting_accuracy(items, samples, k) for k in cfg.eval_k}
        ratings = judge.meta_scores([it.pair for it in items], samples)
        report["meta"] = {str(k): voting_accuracy(items, samples, k, ratings) for k in cfg.eval_k if k >= 2}
        report["ties"] = {str(k): tie_rate(items, samples, k) for k in cfg.eval_k}
        report["best_of_n"] = self._read(self.out / "best_of_n.json", {}).get("result", {})  # {}: the step left out
        ablations = self._read(self.out / "ablations.json", {})  # {} when the ablations step was left out
        report["ablations"] = ablations.get("accuracy", {})
        report["ablation_parse_rate"] = ablations.get("parse_rate", {})
        report["rft"] = self._read(self.out / "data" / "rft_stats.json", {})
        report["meta_rm"] = self._read(self.out / "data" / "meta_stats.json", {})
        self.timings_into(report)
        self._write(self.out / REPORT, report)
        save_grm_figure(report, self.out / FIGURE)
        print(format_grm_report(report), flush=True)

    def timings_into(self, report: dict) -> None:
        """Each step's wall and CPU seconds, and the totals: a step that ran beside the main line
        adds to the wall time only what the main line waited for it."""
        report["seconds"] = {step: t["wall_s"] for step, t in self.timings.items()}
        report["cpu_seconds"] = {step: t["cpu_s"] for step, t in self.timings.items()}
        report["beside"] = {step: t["waited_s"] for step, t in self.timings.items() if "waited_s" in t}
        report["total_seconds"] = sum(t.get("waited_s", t["wall_s"]) for t in self.timings.values())
        report["total_cpu_seconds"] = sum(t["cpu_s"] for t in self.timings.values())

    # ---- 3. the ablations (by default in a second process, beside steps 4-8), and what they use

    def ablations(self) -> None:
        """The ablations on the held-out items, into ablations.json: the judge trained without
        principles (the same cold start, no principle line) against the GRM's own cold start, the
        Bradley-Terry scalar RM, and solve-and-compare."""
        cfg, k = self.cfg, self.cfg.ablation_k
        items = self.items("items_eval")
        t0, c0 = time.perf_counter(), time.process_time()
        accuracy, parse_rate = {}, {}
        if "no_principles" in cfg.ablations:
            if not self.trained("no_principles"):
                self._sft("no_principles", self.base, self.cold_rows(False), cfg.cold_steps, cfg.cold_lr)
            for name, principles in (("no_principles", False), ("cold_start", True)):
                judge = GRM(self.judge_dir(name), principles=principles, max_tokens=cfg.judge_max_tokens)
                samples = judge.sample([it.pair for it in items], k, seed=derive_seed(cfg.seed, "ablation"),
                                       temperature=cfg.eval_temperature)
                accuracy[f"{name}@1"] = voting_accuracy(items, samples, 1)
                accuracy[f"{name}@{k}"] = voting_accuracy(items, samples, k)
                parse_rate[name] = sum(j.parsed for js in samples for j in js) / (k * len(items))
        if "bt" in cfg.ablations:
            accuracy["bt_scalar_rm"] = self.bradley_terry(items)
        if "solve" in cfg.ablations:
            accuracy.update(self.solve_and_compare(items))
        self.save_result("ablations", {"accuracy": accuracy, "parse_rate": parse_rate}, t0, c0)

    def bradley_terry(self, items: list[Item]) -> float:
        """A scalar RM on the base's backbone, trained on the same items with the Bradley-Terry loss
        -log sigmoid(r_right - r_wrong); accuracy: the right response strictly highest."""
        from nanoseek.checkpoint import load_model
        from nanoseek.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(self.base)
        path = self.out / "bt"
        if (path / "score_head.safetensors").is_file():
            rm = ScalarRM.load(path)
        else:
            rm = ScalarRM(load_model(self.base))
            pairs = [(bt_text(it.question, it.responses[it.best]), bt_text(it.question, r))
                     for it in self.items("items_train") if it.kind != "single"
                     for i, r in enumerate(it.responses) if i != it.best]
            examples = [(t, 0.0) for pair in pairs for t in pair]  # right, wrong, right, wrong, ...
            train_scalar(rm, tokenizer, examples, pairwise_loss, self.cfg.bt_steps, self.cfg.meta_lr, self.cfg.seed, paired=True)
            rm.save(path, tokenizer)
        right = 0
        for it in items:
            scores = rm.score_texts(tokenizer, [bt_text(it.question, r) for r in it.responses])
            right += strictly_best(scores) == it.best
        return right / len(items)

    def solve_and_compare(self, items: list[Item]) -> dict:
        """The judge answers the question itself (the base, as it answers unprompted, and with its
        chain forced) and scores each response 10 if its answer agrees, else 1."""
        from nanoseek.inference.engine import LLM
        from nanoseek.inference.sampling import SamplingParams

        llm = LLM(self.base, max_num_seqs=256, block_size=16, device=self.cfg.device)
        out = {}
        for name, prefill in (("solve_and_compare", ""), ("solve_and_compare_chain", self.task.chain_opening or "")):
            outputs = llm.generate([self.task.prompt(it.question) + prefill for it in items],
                                   SamplingParams(temperature=0.0, max_tokens=self.cfg.policy_max_tokens))
            right = 0
            for it, o in zip(items, outputs):
                own = extract_answer(prefill + o.outputs[0].text)
                scores = [10 if own is not None and extract_answer(r) == own else 1 for r in it.responses]
                right += strictly_best(scores) == it.best
            out[name] = right / len(items)
        return out


def bt_text(question: str, response: str) -> str:
    return judge_prompt(question, [response], principles=False)


def pairwise_loss(scores: torch.Tensor, _targets=None) -> torch.Tensor:
    """Bradley-Terry on (right, wrong) pairs laid out as consecutive scores: -log sigmoid(r_right - r_wrong)."""
    return -F.logsigmoid(scores[0::2] - scores[1::2]).mean()


def train_scalar(rm: ScalarRM, tokenizer, examples: list[tuple[str, float]], loss_fn, steps: int, lr: float,
                 seed: int, batch_size: int = 32, paired: bool = False) -> None:
    """Train a ScalarRM's backbone and head on (text, target) examples with `loss_fn(scores,
    targets)` (the meta RM: the pairwise loss by default, BCE with meta_loss="bce"; Bradley-Terry for
    the ablation; `paired` keeps each (right, wrong) pair of consecutive examples together). AdamW
    with the shared schedule."""
    from nanoseek.train.trainer import build_optimizers, lr_at

    rm.train()
    rm.backbone.mtp_layers.requires_grad_(False)
    cfg = TrainConfig(lr=lr, max_steps=steps, warmup_steps=min(10, steps // 10), weight_decay=0.0)
    (optimizer,) = build_optimizers(rm, cfg)  # AdamW
    rng = random.Random(derive_seed("scalar-rm", seed))
    unit = 2 if paired else 1
    groups = [examples[i: i + unit] for i in range(0, len(examples), unit)]
    limit = rm.backbone.config.max_position_embeddings
    for step in range(steps):
        chosen = [e for g in rng.sample(groups, min(batch_size // unit, len(groups))) for e in g]
        ids, lengths = encode_batch(tokenizer, [t for t, _ in chosen], limit)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = loss_fn(rm(ids, lengths), torch.tensor([y for _, y in chosen]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"grm: scalar RM step {step} loss {loss.item():.4f}", flush=True)
    rm.eval()


def voting_accuracy(items: list[Item], samples: list[list[Judgment]], k: int,
                    ratings: list[list[float]] | None = None) -> float:
    """Accuracy of summing the first k judgments of every item (all of them, or the k/2 the meta RM
    rates highest): the right response must get the strictly highest sum (a tie is a miss)."""
    from nanoseek.grm import meta_select

    right = 0
    for i, (it, js) in enumerate(zip(items, samples)):
        chosen = js[:k] if ratings is None else meta_select(js[:k], ratings[i][:k], max(1, k // 2))
        right += item_correct(it, summed_scores(chosen, len(it.responses)))
    return right / len(items)


def tie_rate(items: list[Item], samples: list[list[Judgment]], k: int) -> float:
    """Share of items whose top summed score (over the first k judgments) is shared."""
    ties = sum(strictly_best(summed_scores(js[:k], len(it.responses))) is None for it, js in zip(items, samples))
    return ties / len(items)


def _run_beside(cfg: GRMConfig, step: str, log: str) -> None:
    """A second process's work (`Recipe.start_beside`): one step of the recipe, its output into
    `log`; exit status 130 when Ctrl-C / SIGTERM stopped its training (saved, as in line)."""
    import os
    import sys

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # what C and Python write, tracebacks included
    sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        getattr(Recipe(cfg), step)()
    except Stopped:
        sys.exit(stage.STOPPED_EARLY)
    except NanoseekError as e:  # a user error: its message, for the main line to show as its own
        print(f"{USER_ERROR}{e}", flush=True)
        sys.exit(2)


# ============================================================== the report


def format_grm_report(report: dict) -> str:
    lines = [f"GRM on {report['items']} held-out items {report['kinds']}: parse rate {report['parse_rate']:.3f}, "
             f"one sample {report['single_sample']:.3f}"]
    lines.append("  Voting@k " + "  ".join(f"@{k} {v:.3f}" for k, v in report["voting"].items()))
    lines.append("  MetaRM@k " + "  ".join(f"@{k} {v:.3f}" for k, v in report["meta"].items()))
    lines.append("  ablations " + "  ".join(f"{k} {v:.3f}" for k, v in report["ablations"].items()))
    bon = report["best_of_n"]
    lines.append("  best-of-N " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in bon.items()))
    beside = report.get("beside", {})
    lines.append("  seconds " + "  ".join(f"{k} {v:.0f}" + (" (beside)" if k in beside else "")
                                        for k, v in report["seconds"].items()))
    return "\n".join(lines)


def save_grm_figure(report: dict, out: Path) -> Path | None:
    from nanoseek.plots import grm_scaling_figure

    try:
        return grm_scaling_figure(report, out)
    except ImportError:
        print("grm: matplotlib is not installed, so no figure (pip install -e '.[rl]')", flush=True)
        return None


# ============================================================== entry points


def train(cfg: GRMConfig, resume=None) -> Path:
    """Run the recipe's configured steps (skipping finished ones); returns the run directory.
    Each step is resumable at step granularity: `resume` is accepted for the shared CLI."""
    return run_recipe(cfg)[0]


def run_recipe(cfg: GRMConfig) -> tuple[Path, bool]:
    """(the run directory, whether Ctrl-C / SIGTERM stopped the recipe before its last step)."""
    if launch_world_size() > 1:  # every rank would sample, judge and write the same files
        raise ConfigError("nanoseek grm runs in one process: start it without torchrun")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    recipe = Recipe(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = recipe.run()
    except Stopped as e:
        print(f"grm: stopped early (saved {e}); run the same command again to continue", flush=True)
        return recipe.out, True
    if (out / REPORT).is_file():
        report = json.loads((out / REPORT).read_text())
        recipe.timings_into(report)
        recipe._write(out / REPORT, report)
    print(f"grm: this invocation {time.perf_counter() - t0:.1f}s wall, {time.process_time() - c0:.1f}s CPU", flush=True)
    return out, False


def add_arguments(parser) -> None:
    stage.add_arguments(parser, """init=runs/pretrain_reasoning/latest 'steps=["data","cold_start"]' rl_steps=10""")


def run(args) -> int:
    from nanoseek.train.config import load_run_config

    if args.resume_from:  # the shared option would otherwise be ignored without a word
        raise ConfigError("--resume-from: nanoseek grm continues by running it again into the same out_dir "
                          "(finished steps are skipped); it cannot start from another checkpoint")
    cfg = load_run_config(GRMConfig, args.config, args.overrides)
    check_out_dir(cfg.out_dir, "out_dir")
    return stage.STOPPED_EARLY if run_recipe(cfg)[1] else 0


__all__ = ["GRMConfig", "Item", "build_items", "verdict_of", "program_judgment", "voting_accuracy", "train"]
