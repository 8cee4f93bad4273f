"""R1-Distill: rejection-sample a teacher's reasoning traces, then fine-tune a student on them.

    nanoseek distill --teacher runs/rl/latest --student student-small --task default \\
        [--config configs/distill_small.toml] [--resume] [key=value ...]

DeepSeek-R1 §2.3.3 and §2.4, at toy scale:

1. Rejection sampling. The teacher (an R1-Zero checkpoint, run by the inference engine) answers
   `num_prompts` training-split problems of `task`, `samples_per_prompt` times each, in the R1-Zero
   prompt format (the task's, `nanoseek.data.tasks.prompt_of`). A trace is kept only if the verifier
   accepts it: accuracy reward 1 (the task's scorer gives full credit to the extracted answer) and
   format reward 1 (`<think> ... </think> <answer> ... </answer>`, nothing else). Identical traces
   of one prompt are kept once (`dedupe`).
2. The kept traces are written to `<out_dir>/traces.jsonl`, one inspectable row each: the chat view
   (`messages`: the question, then the assistant's `<think>` reasoning and answer), the verbatim
   prompt / completion the teacher saw and wrote, and `metadata` (task, gold answer, sample index,
   rewards). `traces.summary.json` records the recipe and the counts; a later run with the same
   recipe (e.g. `--resume`) reuses the file instead of sampling again. Sampling saves its progress
   chunk by chunk (`traces.partial.jsonl`), so a run killed while sampling re-runs only the chunks
   it had not finished.
3. SFT of the student (`nanoseek.train.sft`) on those rows, plus any `data` files given. By
   default on the prompt / completion view (`format`): the student learns to answer the exact prompt
   `nanoseek eval` asks; `format="messages"` trains the chat view instead. With `kd_weight > 0`
   the loss also distils the teacher's logits (forward KL on the completion tokens), which needs
   the student to share the teacher's tokenizer (a student built from a preset always does).

The student is a dense preset (`student-small`, built with the teacher's tokenizer), a DeepSeek-V3
preset, or any checkpoint directory. R1-Distill fine-tunes pretrained bases; here a fresh student
can be warmed up on the corpus first (`nanoseek sft` on `{"text"}` rows, configs/sft_student_small.toml).
configs/distill_small.toml is the CPU recipe, with the commands of the whole pipeline (its settings
were measured with an earlier teacher, on 3-term chain sums: `task=chain_sum task_args.min_terms=3 ...`);
scripts/distill_demo.sh is its measured run from the R1-Zero demo's teacher, on digit_sum.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from nanoseek.checkpoint import atomic_write_text
from nanoseek.data.tasks import Problem, Task, derive_seed, get_task, prompt_of
from nanoseek.errors import ConfigError
from nanoseek.rewards import accuracy_reward, format_reward
from nanoseek.tokenizer import THINK_START
from nanoseek.train import sft, stage
from nanoseek.train.distributed import DistEnv, barrier, gather_objects, setup_distributed, teardown_distributed
from nanoseek.train.metrics import parse_records
from nanoseek.train.sft import SFTConfig


@dataclass
class DistillConfig(SFTConfig):
    out_dir: str = "runs/distill"
    # the view of the traces the student trains on (see the module docstring)
    format: Literal["auto", "messages", "prompt_completion"] = "prompt_completion"
    # teacher sampling (the teacher itself is SFTConfig.teacher; the student is SFTConfig.init)
    task: str = "default"  # a nanoseek.data.tasks name; problems come from its train split
    task_args: dict[str, Any] = field(default_factory=dict)  # reasoning-gym difficulty: task_args.min_terms=3
    num_prompts: int = 1000
    samples_per_prompt: int = 4  # k traces per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_num_seqs: int = 256  # sequences the engine decodes at once
    dedupe: bool = True  # keep each distinct verified trace of a prompt once
    dataset: str = ""  # where to write the traces; "" = <out_dir>/traces.jsonl
    # after training
    eval_n: int = 0  # > 0: report the student's greedy pass@1 on this many eval-split problems

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_prompts", "samples_per_prompt", "max_new_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def dataset_path(self) -> Path:
        return Path(self.dataset) if self.dataset else Path(self.out_dir) / "traces.jsonl"


# ============================================================================ rejection sampling


def verify(completion: str, problem: Problem) -> dict[str, float]:
    """The R1-Zero rule-based rewards of a completion: accuracy and format."""
    return {"accuracy": accuracy_reward(completion, problem), "format": format_reward(completion)}


def is_verified(rewards: dict[str, float]) -> bool:
    """The rejection-sampling filter: keep a trace only when the answer is right and well-formed."""
    return rewards["accuracy"] == 1.0 and rewards["format"] == 1.0


def trace_row(problem: Problem, prompt: str, completion: str, metadata: dict) -> dict:
    """One dataset row: the chat view, the verbatim prompt / completion, and metadata."""
    return {
        "messages": [{"role": "user", "content": problem.question},
                     # the prompt prefilled "<think>": the assistant's turn starts with it
                     {"role": "assistant", "content": THINK_START + completion}],
        "prompt": prompt,
        "completion": completion,
        "metadata": metadata,
    }


def distill_problems(cfg: DistillConfig) -> tuple[Task, list[Problem]]:
    """The task (with its `task_args` difficulty) and the train-split problems the teacher is asked."""
    task = get_task(cfg.task, **cfg.task_args)
    return task, task.problems(cfg.num_prompts, seed=cfg.seed, split="train")


def sample_traces(cfg: DistillConfig, env: DistEnv | None = None) -> dict:
    """Sample the teacher, keep the verified traces, write them (and a summary) atomically.
    Returns the summary: the recipe plus counts and timings.

    The prompts go to the engine in chunks of a few engine-fulls, and each finished chunk is
    appended to `<dataset>.partial.jsonl`: a run killed while sampling (hours at real size) picks
    up after its last chunk, with the same traces an uninterrupted run writes (each prompt has its
    own seed). Under torchrun (`env`) each rank samples its share of every chunk on its own
    device, and rank 0 writes what they all kept, in prompt order."""
    from nanoseek.inference.engine import LLM

    env = env or DistEnv()
    task, problems = distill_problems(cfg)
    llm = LLM(cfg.teacher, max_num_seqs=cfg.max_num_seqs, block_size=16, device=str(env.device))
    partial = partial_path(cfg.dataset_path)
    # prompt index -> (its kept rows, verified samples, generated tokens), and the seconds they took
    results, seconds = gather_objects(read_partial(partial, cfg) if env.is_main else None)[0]
    todo = [i for i in range(len(problems)) if i not in results]
    if env.is_main:
        again = f", {len(results)} already sampled ({partial})" if results else ""
        print(f"sampling {cfg.samples_per_prompt} traces for each of {len(problems)} {task.name} prompts "
              f"from {cfg.teacher} (temperature {cfg.temperature}, at most {cfg.max_new_tokens} tokens){again}",
              flush=True)
        if not results:  # a fresh start (or another recipe's leftovers): the file names its recipe first
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"recipe": sampling_recipe(cfg)}) + "\n", encoding="utf-8")

    chunk = max(1, 4 * cfg.max_num_seqs // cfg.samples_per_prompt)  # prompts per saved chunk
    t_start = time.perf_counter()
    for first in range(0, len(todo), chunk):
        t0 = time.perf_counter()
        mine = sample_prompts(llm, task, problems, todo[first: first + chunk][env.rank:: env.world_size], cfg)
        gathered = gather_objects(mine)
        spent = time.perf_counter() - t0  # the ranks sample side by side
        seconds += spent
        done = {i: r for other in gathered for i, r in other.items()}
        results.update(done)
        if env.is_main:
            with partial.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"seconds": spent, "prompts": done}, ensure_ascii=False) + "\n")
            left = len(todo) - first - chunk
            if left > 0:
                eta = (time.perf_counter() - t_start) / (first + chunk) * left
                print(f"  {len(results)}/{len(problems)} prompts sampled, ETA {eta:.0f}s", flush=True)

    rows = [row for i in range(len(problems)) for row in results[i][0]]
    verified = sum(v for _, v, _ in results.values())
    generated_tokens = sum(t for _, _, t in results.values())
    covered = sum(bool(r) for r, _, _ in results.values())
    total = len(problems) * cfg.samples_per_prompt
    summary = {
        "recipe": sampling_recipe(cfg),
        "prompts": len(problems), "samples": total, "verified": verified, "rows": len(rows),
        "prompts_with_a_trace": covered, "teacher_pass_rate": verified / total,
        "generated_tokens": generated_tokens, "seconds": round(seconds, 1),
        "tokens_per_s": round(generated_tokens / max(seconds, 1e-9), 1),
    }
    if env.is_main:
        path = atomic_write_text(cfg.dataset_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        summary_path(path).write_text(json.dumps(summary, indent=2) + "\n")  # marks the dataset complete
        partial.unlink(missing_ok=True)
        print(f"kept {len(rows)} traces ({verified} of {total} samples verified, {covered} of {len(problems)} prompts "
              f"covered) -> {path} | {generated_tokens:,} tokens in {seconds:.0f}s "
              f"({summary['tokens_per_s']:.0f} tok/s)", flush=True)
    barrier()  # the dataset is on disk before any rank reads it
    return summary


def sample_prompts(llm, task: Task, problems: list[Problem], indices: list[int], cfg: DistillConfig) -> dict:
    """Sample the prompts `indices` of `problems` and filter their traces: prompt index -> (its
    kept rows, verified samples, generated tokens)."""
    from nanoseek.inference.sampling import SamplingParams

    prompts = [prompt_of(problems[i]) for i in indices]
    params = [SamplingParams(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=cfg.max_new_tokens, seed=derive_seed("distill", cfg.seed, i))
              for i in indices]
    outputs = llm.generate(prompts, params) if prompts else []
    results = {}
    for i, prompt, out in zip(indices, prompts, outputs):
        problem, kept, rows, verified, tokens = problems[i], set(), [], 0, 0
        for sample in out.outputs:
            tokens += len(sample.token_ids)
            rewards = verify(sample.text, problem)
            if not is_verified(rewards):
                continue
            verified += 1
            if cfg.dedupe and sample.text in kept:
                continue
            kept.add(sample.text)
            task_name = problem.task.name if problem.task is not None else task.name
            rows.append(trace_row(problem, prompt, sample.text, {
                "task": task_name, "question": problem.question, "answer": problem.answer,
                "sample": sample.index, "teacher": str(cfg.teacher), "rewards": rewards,
                "finish_reason": sample.finish_reason, "completion_tokens": len(sample.token_ids)}))
        results[i] = (rows, verified, tokens)
    return results


def partial_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.stem + ".partial.jsonl")


def read_partial(path: Path, cfg: DistillConfig) -> tuple[dict, float]:
    """The prompts an interrupted sampling of this recipe finished, and the seconds it spent on
    them; nothing for another recipe's file (it is started afresh). A last line torn by the kill
    is dropped."""
    records = parse_records(path.read_text(encoding="utf-8")) if path.is_file() else []
    if not records or records[0].get("recipe") != sampling_recipe(cfg):
        return {}, 0.0
    results = {int(i): tuple(r) for record in records[1:] for i, r in record["prompts"].items()}
    return results, sum(record["seconds"] for record in records[1:])


def sampling_recipe(cfg: DistillConfig) -> dict:
    """What determines the traces: a dataset made with the same recipe is reused."""
    keys = ("teacher", "task", "task_args", "num_prompts", "samples_per_prompt", "temperature", "top_p",
            "max_new_tokens", "dedupe", "seed")
    return {k: getattr(cfg, k) for k in keys}


def summary_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.stem + ".summary.json")


def existing_traces(cfg: DistillConfig) -> dict | None:
    """The summary of a finished dataset with this recipe, or None."""
    path = summary_path(cfg.dataset_path)
    if cfg.dataset_path.is_file() and path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("recipe") == sampling_recipe(cfg):
            return summary
    return None


def check_resumed_recipe(cfg: DistillConfig) -> None:
    """A ConfigError when --resume would continue the student on traces of another sampling recipe:
    sampling them anew would change the data under a half-trained student without a word."""
    path = summary_path(cfg.dataset_path)
    if not path.is_file():  # a run stopped before its traces were finished: sampling continues them
        return
    saved = json.loads(path.read_text()).get("recipe", {})
    changed = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in sampling_recipe(cfg).items() if saved.get(k) != v)
    raise ConfigError(f"--resume: the student is training on traces of another sampling recipe ({changed}); "
                      "resume with the run's settings, or distil into a new out_dir")


# ============================================================================ the stage


def distill(cfg: DistillConfig, resume: str | Path | None = None) -> Path:
    """Sample and filter the teacher's traces (unless this recipe's dataset exists), then SFT the
    student on them; returns the student's final checkpoint directory."""
    if not cfg.teacher or not Path(cfg.teacher).is_dir():
        raise ConfigError(f"teacher={cfg.teacher!r}: name the teacher's checkpoint directory (--teacher DIR)")
    if not cfg.init:
        raise ConfigError("name the student: --student PRESET_OR_DIR (e.g. student-small)")
    # what SFT would find wrong only after the teacher has been sampled (minutes at real size)
    stage.check_init(cfg.init, "--student")
    sft.check_data_files(cfg.data)
    sft_cfg = student_config(cfg)
    if sft_cfg.kd_weight > 0:
        sft.check_teacher_tokenizer(sft_cfg, sft.load_tokenizer(sft_cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # under torchrun the ranks share the teacher's prompts; sft.train then trains in this process group
    summary = existing_traces(cfg)
    if summary is None and resume is not None:
        check_resumed_recipe(cfg)
    env = setup_distributed(cfg.device)
    try:
        if summary is not None:
            if env.is_main:
                print(f"reusing {cfg.dataset_path}: {summary['rows']} traces of the same recipe", flush=True)
        else:
            summary = sample_traces(cfg, env)
        if summary["rows"] == 0:
            raise ConfigError(f"the teacher passed none of {summary['samples']} samples; nothing to distil "
                              "(raise num_prompts / samples_per_prompt, or check the teacher with `nanoseek eval`)")

        path = sft.train(sft_cfg, resume=resume)
    finally:
        teardown_distributed()

    if cfg.eval_n and env.is_main:
        from nanoseek.eval import evaluate, format_report

        task = get_task(cfg.task, **cfg.task_args)
        print("student: " + format_report(evaluate(path, task=task, n=cfg.eval_n, seed=cfg.seed,
                                                    max_tokens=cfg.max_new_tokens)), flush=True)
    return path


def student_config(cfg: DistillConfig) -> SFTConfig:
    """The SFT run of the student: the traces (plus any `data` files) and the student's tokenizer."""
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    sft_cfg = SFTConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in sft_fields})
    sft_cfg.data = [*cfg.data, str(cfg.dataset_path)]
    if not cfg.tokenizer and not Path(cfg.init).is_dir():
        sft_cfg.tokenizer = cfg.teacher  # a student built from a preset speaks the teacher's tokenizer
    return sft_cfg


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", help="teacher checkpoint directory (an R1-Zero model); sets teacher=")
    parser.add_argument("--student", help="student: a preset (student-small) or a checkpoint directory; sets init=")
    parser.add_argument("--task", help="task to sample problems from (default: the RL mix); sets task=")
    stage.add_arguments(parser, "num_prompts=500 samples_per_prompt=8 kd_weight=0.5")


def run(args) -> int:
    flags = [f"{key}={value}" for key, value in (("teacher", args.teacher), ("init", args.student), ("task", args.task))
             if value is not None]
    return stage.run_cli(args, DistillConfig, distill, sft.steps_given_win([*flags, *args.overrides]))
