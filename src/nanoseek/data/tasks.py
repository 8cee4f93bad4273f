"""Verifiable tasks for R1-Zero RL and evaluation: registry, prompts, answer extraction, scoring.

A `Task` makes seeded `Problem`s and scores an extracted answer in [0, 1]. Four kinds exist:

- `"digit_sum"`: the last digit of the sum of `length` (default 10) random digits, the R1-Zero
  demo's task (`DigitSumTask`), asked in its own short prompt (`DIGIT_SUM_TEMPLATE`).
- reasoning-gym datasets, by name (`"chain_sum"` or `"rg:chain_sum"`), with difficulty keyword
  arguments passed to `reasoning_gym.create_dataset`; scored by the dataset's own `score_answer`.
- jsonl files of {"question", "answer"} rows (`"jsonl:path/to/file.jsonl"`), scored with math-verify,
  so "0.5", "1/2" and "\\frac{1}{2}" all match.
- named mixes of the above (`"default"`): the task set the RL stage and eval use unless told otherwise.

Train and eval splits are disjoint by construction: a question belongs to the eval split iff a hash
of its text falls in the eval bucket (`split_of`), whatever task, seed or size produced it. So no
seed arithmetic can leak an eval problem into RL training, and `nanoseek.data.synthetic` draws its
pretraining problems from the train side only. Each `Problem` carries the task that scores it
(`problem.task`), so a reward needs nothing but the completion and the problem.

The prompt follows DeepSeek-R1-Zero (reasoning inside <think> </think>, then the answer inside
<answer> </answer>), shortened for a tiny model; see `PROMPT_TEMPLATE`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import THINK_END, THINK_START

ANSWER_START, ANSWER_END = "<answer>", "</answer>"
BOXED = "\\boxed{"

# DeepSeek-R1 paper, Table 1, verbatim ("prompt" replaced by the question).
R1ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {question}. Assistant:"
)

# The default prompt. The verbatim template costs ~75 tokens (byte-level BPE cannot merge across
# words) of a 256-token context and of every pretraining document that teaches the format, so a tiny
# model gets the same structure in one sentence. It ends with "<think>" already written (as Dr. GRPO
# and TinyZero do), so the model's first decision is how to reason, not whether to open the tag;
# completions therefore look like " reasoning </think> <answer>42</answer>" (`r1zero_completion`).
PROMPT_TEMPLATE = (
    "A conversation between User and Assistant. The Assistant first thinks about the reasoning process, "
    "then gives the answer, enclosed in <think> </think> and <answer> </answer> tags.\n"
    "User: {question}\nAssistant: <think>"
)

EVAL_BUCKETS = 20  # percent of the question space held out for evaluation
SPLITS = ("eval", "train")


def r1zero_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The R1-Zero prompt for `question`: the template with the question filled in.

    The default template prefills "<think>"; pass `R1ZERO_TEMPLATE` for the paper's verbatim
    wording (the model then writes "<think>" itself, which `extract_answer` and the format reward
    accept as well).
    """
    return template.format(question=question)


def r1zero_completion(reasoning: str, answer: str) -> str:
    """The completion that follows `r1zero_prompt(question)`: reasoning, `</think>`, tagged answer.

    Empty `reasoning` gives an answer-only completion (" </think> <answer>42</answer>").
    """
    think = f" {reasoning.strip()} " if reasoning.strip() else " "
    return f"{think}{THINK_END} {ANSWER_START}{answer}{ANSWER_END}"


def reasoning_of(completion: str) -> str:
    """The reasoning a completion writes before its answer: the text before the first `</think>`
    (without a leading `<think>`), stripped; "" for an answer-only completion or one that never
    closes its reasoning (that one has no answer either)."""
    head, sep, _ = completion.partition(THINK_END)
    if not sep:
        return ""
    return head.strip().removeprefix(THINK_START).strip()


def reasons(completion: str) -> bool:
    """Whether a completion reasons: it writes something inside <think> </think> before answering."""
    return bool(reasoning_of(completion))


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion, or None when there is none.

    The answer is the text after the first `</think>`, narrowed to the inside of `<answer>...</answer>`
    when that tag is present (up to the end of the text if the closing tag was cut off), or else to
    the last `\\boxed{...}`, where R1 and its distills put their final answer. A completion that
    never closes its reasoning has no answer: partial thoughts must not be graded as answers.
    """
    _, sep, tail = completion.partition(THINK_END)
    if not sep:
        return None
    if ANSWER_START in tail:
        tail = tail.split(ANSWER_START, 1)[1].split(ANSWER_END, 1)[0]
    boxed = last_boxed(tail)  # also inside <answer>: "<answer>\\boxed{7}</answer>" is 7
    if boxed is None and BOXED in tail:  # cut off inside its only box
        return None
    answer = (tail if boxed is None else boxed).strip()
    return answer or None


def last_boxed(text: str) -> str | None:
    """The inside of the last closed `\\boxed{...}` in `text`, nested braces included; None if none."""
    end = len(text)
    while (at := text.rfind(BOXED, 0, end)) >= 0:
        start, depth = at + len(BOXED), 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
        end = at  # cut off inside this box: an earlier, closed one is the answer
    return None


def split_of(question: str) -> str:
    """"eval" or "train": the split a question belongs to, fixed by a hash of its text.

    Hashing the text (rather than partitioning seeds) keeps the splits disjoint for every task,
    seed and size, and lets any generator check that it stays out of the eval split. Whitespace is
    normalised first, so near-duplicates that differ only in spacing never straddle the split.
    """
    text = " ".join(question.split())  # runs of whitespace collapsed: "0 + 5" and "0  + 5" share a split
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return "eval" if bucket < EVAL_BUCKETS else "train"


def derive_seed(*parts) -> int:
    """A stable 31-bit seed from any printable parts: independent streams per task, split and seed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big") >> 1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise NanoseekError(f"unknown split {split!r}: use 'eval' or 'train'")


@dataclass
class Problem:
    """One verifiable problem. `task` is the task that scores it (not compared, not printed)."""

    question: str
    answer: str
    metadata: dict = field(default_factory=dict)
    task: Task | None = field(default=None, compare=False, repr=False)


class Task:
    """A source of seeded problems with a scorer. Subclasses implement `problems` and `score`.

    `template` is the R1-Zero prompt the task's questions are asked with (`prompt`); a task whose
    worked solutions open with a fixed text names it `chain_opening`, so that an evaluation can
    prefill it and measure whether the model can carry the chain through (`nanoseek eval --prefill`).
    """

    name: str
    template: str = PROMPT_TEMPLATE
    chain_opening: str | None = None

    def prompt(self, question: str) -> str:
        """The R1-Zero prompt of `question` in this task's template."""
        return r1zero_prompt(question, self.template)

    def problems(self, n: int, seed: int = 0, split: str = "eval") -> list[Problem]:
        """`n` problems from `split`, the same list for the same seed."""
        raise NotImplementedError

    def score(self, answer: str | None, problem: Problem) -> float:
        """Credit in [0, 1] for an extracted answer (None scores 0)."""
        raise NotImplementedError

    def same_answer(self, a: str, b: str, problem: Problem) -> bool:
        """Whether two extracted answers to `problem` are one answer, for majority voting (maj@K):
        the same text here; a task whose scorer accepts several forms of one answer says so."""
        return a.strip() == b.strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def prompt_of(problem: Problem) -> str:
    """The prompt `problem` is asked with: its task's template (the default one for a bare problem)."""
    return problem.task.prompt(problem.question) if problem.task is not None else r1zero_prompt(problem.question)


# The reasoning base's task (`DigitSumTask`): a short R1-Zero-style prompt, "<think>" prefilled as
# in PROMPT_TEMPLATE. The one-sentence instruction of the default template would triple the length
# of every pretraining document; this base has never seen any other prompt, so it needs none.
DIGIT_SUM_TEMPLATE = "User: {question}\nAssistant: <think>"


class DigitSumTask(Task):
    """The last digit of the sum of `length` random digits: "User: 3815920471" -> "0".

    A parity-like function: a small model cannot compute it in one forward pass, yet it becomes a
    chain of easy, local steps when written out as running sums mod 10, the reasoning base's worked
    solution (`reasoning`): " sums 3127688290 </think> <answer>0</answer>". Each step adds the
    previous running sum and one digit of the question, and with a fixed `length` and template that
    digit sits at a fixed distance back, which rotary attention finds easily. The chain opens with
    the fixed word `chain_opening` (" sums"), so prefilling it forces the chain without revealing
    any step. Questions are split by hash like every task; the problem space (10^length) is large
    enough that a seeded draw never runs short.
    """

    chain_opening = " sums"

    def __init__(self, length: int = 10, name: str | None = None):
        if not isinstance(length, int) or not 2 <= length <= 64:
            raise NanoseekError(f"digit_sum length={length!r}: expected an integer in [2, 64]")
        self.length, self.name = length, name or ("digit_sum" if length == 10 else f"digit_sum/{length}")
        self.template = DIGIT_SUM_TEMPLATE

    def problems(self, n: int, seed: int = 0, split: str = "eval") -> list[Problem]:
        _check_split(split)
        rng = random.Random(derive_seed("digit_sum", self.length, split, seed))
        out, seen, draws = [], set(), 0
        while len(out) < n:
            draws += 1
            if draws > 50 * n + 1000:  # the split holds fewer distinct questions than asked for
                raise NanoseekError(f"digit_sum length={self.length}: found only {len(out)} of {n} {split} "
                                    f"questions among its {10 ** self.length:,} possible ones; ask for fewer or "
                                    "use a longer length")
            question = "".join(rng.choice("0123456789") for _ in range(self.length))
            if question in seen or split_of(question) != split:
                continue
            seen.add(question)
            answer = str(sum(map(int, question)) % 10)
            out.append(Problem(question, answer, {"length": self.length}, task=self))
        return out

    def score(self, answer: str | None, problem: Problem) -> float:
        return float(answer is not None and answer.strip() == problem.answer)

    @staticmethod
    def reasoning(problem: Problem) -> str:
        """The worked chain: the running sums mod 10, one digit per digit of the question."""
        total, sums = 0, []
        for digit in problem.question:
            total = (total + int(digit)) % 10
            sums.append(str(total))
        return f"{DigitSumTask.chain_opening.strip()} {''.join(sums)}"


class ReasoningGymTask(Task):
    """A reasoning-gym procedural dataset at a fixed difficulty.

    Problems are drawn in seeded batches and kept only if they fall in the requested split, so
    `n` eval problems cost about 5n generations (cheap: chain_sum makes 40k per second). Scores are
    the dataset's own, partial credit included (chain_sum gives "17" half credit when the answer is
    "7"), so count a pass as a score of 1.
    """

    def __init__(self, dataset: str, name: str | None = None, **difficulty):
        if _reasoning_gym_datasets() is None:  # an optional extra; the default mix is made of its datasets
            raise NanoseekError(f"reasoning-gym's {dataset!r} task needs the reasoning-gym package, which is "
                                f"not installed: {RL_EXTRA}")
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            raise NanoseekError(f"unknown reasoning-gym dataset {dataset!r}. {_available()}")
        self.dataset, self.difficulty, self.name = dataset, dict(difficulty), name or dataset
        try:
            # One instance scores every problem; score_answer reads only the answer and the entry.
            self._scorer = reasoning_gym.create_dataset(dataset, size=1, seed=0, **difficulty)
        except (TypeError, AssertionError, ValueError) as e:
            raise NanoseekError(f"bad difficulty {difficulty} for reasoning-gym {dataset!r}: {e}") from e

    def problems(self, n: int, seed: int = 0, split: str = "eval") -> list[Problem]:
        import reasoning_gym

        _check_split(split)
        out: list[Problem] = []
        batch, round_ = max(64, 2 * n), 0
        while len(out) < n:
            if round_ == 50:  # a split still short after this many batches means a tiny problem space
                raise NanoseekError(
                    f"task {self.name!r} {self.difficulty}: found only {len(out)} of {n} {split} problems; "
                    "the difficulty leaves too few distinct questions"
                )
            seed_ = derive_seed(self.dataset, sorted(self.difficulty.items()), split, seed, round_)
            ds = reasoning_gym.create_dataset(self.dataset, size=batch, seed=seed_, **self.difficulty)
            out += [
                Problem(entry["question"], str(entry["answer"]), {"entry": entry}, task=self)
                for entry in ds
                if split_of(entry["question"]) == split
            ]
            round_ += 1
        return out[:n]

    def score(self, answer: str | None, problem: Problem) -> float:
        if answer is None:
            return 0.0
        try:  # some scorers raise on junk (prime_factorization, game_of_life, ...): a reward must not crash RL
            credit = self._scorer.score_answer(answer, problem.metadata["entry"])
        except Exception:
            return 0.0
        return float(min(1.0, max(0.0, credit)))


def math_verify_score(answer: str | None, gold: str) -> float:
    """1.0 iff math-verify finds `answer` equal to `gold` ("0.5" == "1/2" == "\\frac{1}{2}").

    Bare strings are wrapped in $...$ because math-verify only reads LaTeX inside a math
    environment (without it "2x+1" parses as just 2). Its timeouts use SIGALRM, which exists only on
    the main thread, so elsewhere (a threaded server or rollout worker) it runs without one.
    """
    if not answer:
        return 0.0
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parse_math(s: str):
        return parse(s if "$" in s or "\\boxed" in s else f"${s}$", parsing_timeout=timeout)

    gold_parsed = parse_math(gold)
    if not gold_parsed:
        return float(answer.strip() == gold.strip())  # gold is not math: fall back to exact text
    return float(verify(gold_parsed, parse_math(answer), timeout_seconds=timeout))


class JsonlTask(Task):
    """Problems from a jsonl file of {"question": ..., "answer": ...} rows, scored with math-verify.

    The file is split by question hash like every task, so about a fifth of its rows are eval
    problems; `problems` returns a seeded sample of at most `n` rows of the split.
    """

    def __init__(self, path: str | Path):
        self.path, self.name = Path(path), f"jsonl:{path}"
        if importlib.util.find_spec("math_verify") is None:  # said now, not after generating every sample
            raise NanoseekError(f"task {self.name!r} is scored with math-verify, which is not installed: {RL_EXTRA}")
        if not self.path.is_file():
            raise NanoseekError(f"task file {str(self.path)!r} not found (expected jsonl rows of question, answer)")
        from nanoseek.data.corpus import jsonl_rows

        self.rows: list[tuple[str, str]] = []
        for lineno, row in jsonl_rows(self.path):
            question, answer = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
            # null became the question or answer "None"; an empty question was asked as is
            problem = (f"a JSON {type(row).__name__}, not an object" if not isinstance(row, dict) else
                       f"question is {question!r}, not a non-empty string"
                       if not isinstance(question, str) or not question.strip() else
                       f"answer is {answer!r}, not a non-empty string or a number"
                       if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip()
                       else None)
            if problem:
                raise NanoseekError(f"{self.path}:{lineno}: {problem}; expected a JSON object with question, answer")
            self.rows.append((question, str(answer)))

    def problems(self, n: int, seed: int = 0, split: str = "eval") -> list[Problem]:
        _check_split(split)
        rows = [r for r in self.rows if split_of(r[0]) == split]
        if n >= 1 and not rows:  # else eval and RL fail later with an engine error about empty prompts
            raise NanoseekError(f"{self.path}: none of its {len(self.rows)} rows is in the {split} split (a hash of "
                                f"the question picks each row's split, about {EVAL_BUCKETS}% of them eval); "
                                "add rows to the file")
        random.Random(derive_seed(self.name, split, seed)).shuffle(rows)
        return [Problem(q, a, {"source": str(self.path)}, task=self) for q, a in rows[:n]]

    def score(self, answer: str | None, problem: Problem) -> float:
        return math_verify_score(answer, problem.answer)

    def same_answer(self, a: str, b: str, problem: Problem) -> bool:
        """"0.5", "1/2" and "\\frac{1}{2}" are one answer, as the scorer sees them."""
        return a.strip() == b.strip() or math_verify_score(a, b) == 1.0


class MixTask(Task):
    """Several tasks sampled in fixed proportions; each problem is scored by the task that made it."""

    def __init__(self, name: str, components: list[tuple[Task, float]]):
        self.name, self.components = name, components

    def problems(self, n: int, seed: int = 0, split: str = "eval") -> list[Problem]:
        _check_split(split)
        out: list[Problem] = []
        for i, (task, count) in enumerate(zip(self.tasks, allocate_counts(n, self.weights))):
            out += task.problems(count, seed=derive_seed(self.name, i, seed), split=split)
        random.Random(derive_seed(self.name, "order", split, seed)).shuffle(out)
        return out

    def score(self, answer: str | None, problem: Problem) -> float:
        if problem.task is None or isinstance(problem.task, MixTask):
            raise NanoseekError(f"problem {problem.question[:60]!r} does not name the task that scores it")
        return problem.task.score(answer, problem)

    def same_answer(self, a: str, b: str, problem: Problem) -> bool:
        if problem.task is None or isinstance(problem.task, MixTask):
            raise NanoseekError(f"problem {problem.question[:60]!r} does not name the task that scores it")
        return problem.task.same_answer(a, b, problem)

    @property
    def tasks(self) -> list[Task]:
        return [t for t, _ in self.components]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.components]


def allocate_counts(n: int, weights: list[float]) -> list[int]:
    """Split n into integer counts proportional to weights (largest remainder, ties to the first)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


# The default RL/eval mix: chain sums just past what the synthetic pretraining corpus shows worked
# solutions for (up to 3 one-digit terms, or 2 terms of up to 3 digits). One component needs a longer
# chain of the familiar steps, the other the familiar 3-term chain on two-digit numbers. The corpus
# never shows these settings, so getting them right more often is left for RL to find.
DEFAULT_MIX: list[tuple[str, dict, float]] = [
    ("chain_sum/3x2digit", dict(min_terms=3, max_terms=3, min_digits=2, max_digits=2), 0.5),
    ("chain_sum/4x1digit", dict(min_terms=4, max_terms=4, min_digits=1, max_digits=1), 0.5),
]


def _default_mix() -> MixTask:
    return MixTask("default", [(ReasoningGymTask("chain_sum", name=label, **d), w) for label, d, w in DEFAULT_MIX])


# Named tasks (mixes and user additions); reasoning-gym datasets and jsonl files resolve by prefix.
TASKS: dict[str, Callable[[], Task]] = {"default": _default_mix}


def register_task(name: str, factory: Callable[[], Task]) -> None:
    """Make `get_task(name)` return `factory()`, e.g. a new MixTask for an RL config to name."""
    TASKS[name] = factory


RL_EXTRA = "pip install -e '.[rl]'"  # the pyproject.toml extra that installs reasoning-gym and math-verify


def _reasoning_gym_datasets() -> list[str] | None:
    """reasoning-gym's dataset names, or None when it is not installed (it is an optional extra)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return None
    return sorted(DATASETS)


def _available() -> str:
    datasets = _reasoning_gym_datasets()
    listed = ", ".join(datasets) if datasets is not None else f"none, as reasoning-gym is not installed ({RL_EXTRA})"
    return (
        f"Available tasks: {', '.join(sorted(TASKS))}; 'digit_sum'; 'jsonl:<path>'; or a reasoning-gym dataset "
        f"('rg:<name>' or '<name>'): {listed}"
    )


def get_task(name: str, **difficulty) -> Task:
    """The task called `name`; `difficulty` goes to reasoning-gym's dataset config.

    Names: a registered task ("default"), "digit_sum" (difficulty: length), "jsonl:<path>", "rg:<dataset>" or a bare reasoning-gym
    dataset name. Unknown names raise NanoseekError listing what exists.
    """
    if name == "digit_sum":
        unknown = sorted(set(difficulty) - {"length"})
        if unknown:
            raise NanoseekError(f"digit_sum takes only length=N; got {unknown}")
        return DigitSumTask(**difficulty)
    if name in TASKS:
        if difficulty:
            raise NanoseekError(f"task {name!r} fixes its own difficulty; got {difficulty}")
        return TASKS[name]()
    if name.startswith("jsonl:"):
        if difficulty:
            raise NanoseekError(f"jsonl tasks take no difficulty arguments; got {difficulty}")
        return JsonlTask(name.removeprefix("jsonl:"))
    dataset, datasets = name.removeprefix("rg:"), _reasoning_gym_datasets()
    if datasets is None and name.startswith("rg:"):  # surely reasoning-gym's: ReasoningGymTask names the extra
        return ReasoningGymTask(dataset, **difficulty)
    if dataset not in (datasets or []):  # a typo ("digitsum") is unknown with or without it
        raise NanoseekError(f"unknown task {name!r}. {_available()}")
    return ReasoningGymTask(dataset, **difficulty)
