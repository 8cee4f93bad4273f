"""The generative reward model (SPCT / DeepSeek-GRM) at inference: judge, voting, meta RM.

    grm = GRM("runs/grm_small/latest")
    j = grm.judge("3815920471", [" sums 3127688290 </think> <answer>0</answer>", " </think> <answer>7</answer>"], k=8)
    j.scores        # summed pointwise scores, one per response: [76, 41]
    j.best          # the index with the highest sum (ties broken at random with the seed)
    j.samples[0]    # Judgment(principles=[("work", 7), ("form", 3)], critique="[1] ok [2] none", scores=[10, 6])

    nanoseek judge --model runs/grm_small/latest --input pairs.jsonl [--k 8] [--meta] > judgments.jsonl

A judgment is pointwise and generative (Liu et al. 2025, eq. 7): for a question and n >= 1
responses the judge writes its principles (weighted criteria), then a critique of each response
against them, then one integer score in 1..10 per response on a final `\\boxed{x, y, ...}` line:

    P: work 7 form 3
    C: [1] ok [2] none
    \\boxed{10, 6}

Scores are parsed from the last `\\boxed{...}` (clamped to 1..10); a judgment without one, or with
the wrong number of integers, scores no response and is counted in `parse_rate`, never raised.

Inference-time scaling (§4): k judgments are sampled (T = 0.5 by default), the responses shuffled
anew for each, and the pointwise scores summed over the samples (eq. 14) - voting over k sets of
principles. With a meta RM (a scalar head on the judge's backbone, trained to predict whether a
judgment is right), only the k_meta (default k/2) judgments it rates highest are summed. All k
samples of many items go through the engine in one batch.

At toy scale the texts are short: the model's context is 256 tokens and the byte-level BPE spends
about a token per character, so the principles are two named weights and the critique is one
verdict per response (`ok`: worked reasoning that checks out, `bad`: reasoning that does not,
`none`: an answer without reasoning, `void`: no answer). See `nanoseek.train.grm` for how the
judge learns to write them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from nanoseek.data.tasks import derive_seed
from nanoseek.device import THREADS
from nanoseek.errors import ContextLengthError, NanoseekError

MIN_SCORE, MAX_SCORE = 1, 10
HINT = "The best response is: Response {j}"  # hinted sampling (RFT), 1-based like the prompt
DEFAULT_TEMPERATURE = 0.5
# A judgment of 4 responses is ~70 tokens at about a token per character: `nanoseek judge` and the
# recipe's judges (GRMConfig.judge_max_tokens) use this; 64 cut a group's \boxed{} line short
JUDGE_MAX_TOKENS = 96
META_HEAD = "score_head.safetensors"  # the scalar head beside a meta RM's (or BT RM's) backbone checkpoint

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_PRINCIPLE = re.compile(r"([A-Za-z_]+)\s+(\d+)")


# ============================================================== the text format


def one_line(text: str) -> str:
    """A response as the judge sees it: one line (newlines would break the prompt's layout)."""
    return " ".join(text.split())


def judge_prompt(question: str, responses: list[str], hint: int | None = None, principles: bool = True) -> str:
    """The judge's prompt: the question, the numbered responses, then the judgment's opening
    ("P:" when the judge writes principles, "C:" when it goes straight to the critique). `hint`
    (0-based) appends the RFT hint naming the best response."""
    if not responses:
        raise NanoseekError("a judgment needs at least one response")
    lines = [f"Judge: {one_line(question)}"]
    lines += [f"[{i + 1}] {one_line(r)}" for i, r in enumerate(responses)]
    if hint is not None:
        lines.append(HINT.format(j=hint + 1))
    lines.append("P:" if principles else "C:")
    return "\n".join(lines)


def format_judgment(principles: list[tuple[str, int]] | None, verdicts: list[str], scores: list[int]) -> str:
    """The text a judgment continues its prompt with (principles=None: the no-principles judge,
    whose prompt already ends with "C:")."""
    critique = " ".join(f"[{i + 1}] {v}" for i, v in enumerate(verdicts))
    boxed = "\\boxed{" + ", ".join(str(s) for s in scores) + "}"
    if principles is None:
        return f" {critique}\n{boxed}"
    return " " + " ".join(f"{name} {w}" for name, w in principles) + f"\nC: {critique}\n{boxed}"


@dataclass
class Judgment:
    """One sampled judgment: its text, what parsed out of it, and its scores in the caller's order
    of the responses (None when it did not parse)."""

    text: str
    principles: list[tuple[str, int]] = field(default_factory=list)
    critique: str = ""
    scores: list[int] | None = None
    order: list[int] = field(default_factory=list)  # order[p] = the response shown at position p
    # what RL needs about the generation (filled when sampled with logprobs=True)
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    token_ids: list[int] = field(default_factory=list, repr=False)
    logprobs: list[float] = field(default_factory=list, repr=False)
    finish_reason: str = ""

    @property
    def parsed(self) -> bool:
        return self.scores is not None


def parse_judgment(text: str, n: int) -> tuple[list[tuple[str, int]], str, list[int] | None]:
    """(principles, critique, scores) of a judgment's text for n responses. Scores come from the
    last `\\boxed{...}`: n integers, each clamped to 1..10; anything else gives None. Principles
    are the (name, weight) pairs of the first line, the critique the text before the boxed line."""
    head, _, _ = text.partition("\\boxed")
    lines = head.strip().splitlines()
    principles, critique = [], head.strip()
    if lines and not lines[0].lstrip().startswith("C:") and len(lines) > 1:
        principles = [(name, int(w)) for name, w in _PRINCIPLE.findall(lines[0])]
        critique = "\n".join(lines[1:]).strip()
    critique = critique.removeprefix("C:").strip()
    boxes = _BOXED.findall(text)
    if not boxes:
        return principles, critique, None
    parts = [p.strip() for p in boxes[-1].split(",")]
    if len(parts) != n or not all(re.fullmatch(r"-?\d{1,3}", p) for p in parts):
        return principles, critique, None
    return principles, critique, [min(MAX_SCORE, max(MIN_SCORE, int(p))) for p in parts]


# ============================================================== voting, accuracy, the +1/-1 rule


def summed_scores(judgments: list[Judgment], n: int) -> list[int]:
    """Eq. 14: each response's scores summed over the judgments that parsed."""
    total = [0] * n
    for j in judgments:
        if j.scores is not None:
            total = [t + s for t, s in zip(total, j.scores)]
    return total


def strictly_best(scores: list[int | float]) -> int | None:
    """The index with the strictly highest score; None on a tie for the top (a tie is a miss)."""
    top = max(scores)
    winners = [i for i, s in enumerate(scores) if s == top]
    return winners[0] if len(winners) == 1 else None


def pick_best(scores: list[int | float], seed) -> int:
    """The index with the highest score, ties broken at random by `seed` (best-of-N must choose)."""
    top = max(scores)
    winners = [i for i, s in enumerate(scores) if s == top]
    return random.Random(derive_seed("tie", seed)).choice(winners)


def judgment_correct(scores: list[int] | None, best: int, label: int | None = None) -> bool:
    """Eq. 10: a judgment is right iff its scores single out the true best response (strictly
    highest; a tie is wrong). For one response (`label` its 0/1 verdict) it is right iff the score
    falls on the label's side of the scale's middle (>= 6 for good, <= 5 for bad)."""
    if scores is None:
        return False
    if len(scores) == 1:
        return (scores[0] > (MIN_SCORE + MAX_SCORE) // 2) == bool(label)
    return strictly_best(scores) == best


def rule_reward(scores: list[int] | None, best: int, label: int | None = None) -> float:
    """Eq. 11, the online-RL reward: +1 if the judgment is right (eq. 10), else -1 (unparsed: -1)."""
    return 1.0 if judgment_correct(scores, best, label) else -1.0


def meta_select(judgments: list[Judgment], meta_scores: list[float], k_meta: int) -> list[Judgment]:
    """Meta-RM guided voting: the k_meta judgments the meta RM rates highest, to be summed instead
    of all k (`meta_kept`)."""
    return [judgments[i] for i in meta_kept(judgments, meta_scores, k_meta)]


def meta_kept(judgments: list[Judgment], meta_scores: list[float], k_meta: int) -> list[int]:
    """The indices of the k_meta judgments the meta RM rates highest, in sample order (stable:
    earlier samples win ties). Judgments that parse come first: one that does not scores no
    response, so keeping it would only leave a vote out."""
    order = sorted(range(len(judgments)), key=lambda i: (not judgments[i].parsed, -meta_scores[i]))
    return sorted(order[:k_meta])


# ============================================================== the scalar head (meta RM, BT RM)


class ScalarRM(nn.Module):
    """A scalar reward head on a nanoseek backbone: the last token's final hidden state -> one
    logit. The meta RM (is this judgment right? pairwise within an item by default, or BCE) and
    the Bradley-Terry ablation use it."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) -> scores (B,)."""
        hidden = self.backbone(input_ids, logits=False).hidden  # (B, T, D)
        last = hidden[torch.arange(len(lengths)), lengths - 1]  # (B, D)
        return self.head(last).squeeze(-1)

    def save(self, path: str | Path, tokenizer=None) -> Path:
        from safetensors.torch import save_file

        from nanoseek.checkpoint import save_model

        path = save_model(self.backbone, path, tokenizer)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(Path(path) / META_HEAD))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "ScalarRM":
        from safetensors.torch import load_file

        from nanoseek.checkpoint import load_model

        path = Path(path)
        if not (path / META_HEAD).is_file():
            raise NanoseekError(f"{path} is not a scalar reward model (no {META_HEAD})")
        rm = cls(load_model(path, device=device))
        rm.head.load_state_dict(load_file(str(path / META_HEAD)))
        return rm.eval()

    @torch.no_grad()
    def score_texts(self, tokenizer, texts: list[str], batch_size: int = 64) -> list[float]:
        """One scalar per text (bos + text), batched."""
        self.eval()
        out = []
        device = next(self.parameters()).device
        limit = self.backbone.config.max_position_embeddings
        for start in range(0, len(texts), batch_size):
            ids, lengths = encode_batch(tokenizer, texts[start: start + batch_size], limit)
            out += self(ids.to(device), lengths.to(device)).float().tolist()
        return out


def encode_batch(tokenizer, texts: list[str], limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) of bos + text (the last `limit` tokens kept) and their lengths (B,)."""
    rows = [tokenizer.encode_prompt(t)[-limit:] for t in texts]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


# ============================================================== the judge


@dataclass
class Verdict:
    """What `GRM.judge` returns for one item: summed scores per response (in the caller's order),
    the chosen best, every sampled judgment (its principles, critique, scores), the per-sample
    votes, and which samples the meta RM kept (all of them without one)."""

    scores: list[int]
    best: int
    samples: list[Judgment]
    kept: list[int]
    parse_rate: float

    @property
    def votes(self) -> list[list[int] | None]:
        return [j.scores for j in self.samples]

    def to_dict(self) -> dict:
        # best: None where no judgment parsed (every score 0: the pick would be a random tie-break)
        return {"scores": self.scores, "best": self.best if self.parse_rate else None,
                "parse_rate": self.parse_rate, "kept": self.kept,
                "votes": self.votes,
                "judgments": [{"principles": j.principles, "critique": j.critique, "scores": j.scores,
                               "order": j.order, "text": j.text} for j in self.samples]}


class GRM:
    """A generative reward model: a nanoseek checkpoint trained by `nanoseek grm`, sampled through
    the inference engine. `meta`: a meta RM directory (a `ScalarRM`), or None."""

    def __init__(self, model, tokenizer=None, *, meta: str | Path | ScalarRM | None = None,
                 principles: bool = True, max_num_seqs: int = 256, temperature: float = DEFAULT_TEMPERATURE,
                 max_tokens: int = JUDGE_MAX_TOKENS, device: str = "auto"):
        from nanoseek.inference.engine import LLM

        if isinstance(model, (str, Path)):
            from nanoseek.train.checkpointing import find_checkpoint

            path = Path(model)
            if not path.exists():
                raise NanoseekError(f"GRM checkpoint {path} not found (train one: nanoseek grm --config ...)")
            model = find_checkpoint(path)
            self.llm = LLM(model, max_num_seqs=max_num_seqs, block_size=16, device=device)
        else:
            self.llm = model if hasattr(model, "generate") else LLM(model, tokenizer, max_num_seqs=max_num_seqs,
                                                                     block_size=16, device=device)
        self.tokenizer = self.llm.tokenizer
        self.meta = ScalarRM.load(meta) if isinstance(meta, (str, Path)) else meta
        self.principles, self.temperature, self.max_tokens = principles, temperature, max_tokens

    # ---- sampling

    def sample(self, items: list[tuple[str, list[str]]], k: int, seed: int = 0, temperature: float | None = None,
               hints: list[int | None] | None = None, shuffle: bool = True,
               logprobs: bool = False) -> list[list[Judgment]]:
        """k judgments of each (question, responses) item, all generated in one engine batch; the
        responses are shuffled anew for every sample (seeded by (seed, item, sample)) and each
        judgment's scores are mapped back to the caller's order. `hints` (0-based, caller's order)
        append the RFT hint; `logprobs` keeps the token ids and log-probabilities (for RL)."""
        from nanoseek.inference.sampling import SamplingParams

        temperature = self.temperature if temperature is None else temperature
        prompts, params, orders = [], [], []
        for i, (question, responses) in enumerate(items):
            for j in range(k):
                order = list(range(len(responses)))
                if shuffle:
                    random.Random(derive_seed("order", seed, i, j)).shuffle(order)
                hint = None if hints is None or hints[i] is None else order.index(hints[i])
                prompts.append(judge_prompt(question, [responses[o] for o in order], hint, self.principles))
                orders.append(order)
                try:  # the engine's own error says "shorten the prompt", a prompt the caller did not write
                    length = len(self.llm.prompt_ids(prompts[-1]))
                except ContextLengthError as e:
                    length = e.tokens
                if length >= self.llm.max_model_len - 1:
                    raise ContextLengthError(f"item {i + 1}: its judge prompt of {length} tokens does not fit the "
                                             f"judge's context of {self.llm.max_model_len}; judge fewer or shorter "
                                             "responses", tokens=length, limit=self.llm.max_model_len)
                params.append(SamplingParams(temperature=temperature, seed=derive_seed("judge", seed, i, j),
                                             max_tokens=min(self.max_tokens, self.llm.max_model_len - length),
                                             logprobs=0 if logprobs else None))
        outputs = self.llm.generate(prompts, params)
        judgments = []
        for out, order in zip(outputs, orders):
            c = out.outputs[0]
            principles, critique, shown = parse_judgment(c.text, len(order))
            scores = None
            if shown is not None:
                scores = [0] * len(order)
                for position, original in enumerate(order):
                    scores[original] = shown[position]
            judgment = Judgment(c.text, principles, critique, scores, order, finish_reason=c.finish_reason or "")
            if logprobs:
                judgment.prompt_ids, judgment.token_ids = list(out.prompt_token_ids), list(c.token_ids)
                judgment.logprobs = [lp["logprob"] for lp in c.logprobs]
            judgments.append(judgment)
        return [judgments[i * k: (i + 1) * k] for i in range(len(items))]

    def meta_scores(self, items: list[tuple[str, list[str]]], judgments: list[list[Judgment]]) -> list[list[float]]:
        """The meta RM's rating of every judgment (its prompt as the judge saw it, plus its text)."""
        texts = [meta_text(question, responses, j, self.principles)
                 for (question, responses), js in zip(items, judgments) for j in js]
        flat = self.meta.score_texts(self.tokenizer, texts)
        out, at = [], 0
        for js in judgments:
            out.append(flat[at: at + len(js)])
            at += len(js)
        return out

    # ---- the API

    def judge_many(self, items: list[tuple[str, list[str]]], k: int = 8, seed: int = 0, meta: bool | None = None,
                   k_meta: int | None = None, temperature: float | None = None) -> list[Verdict]:
        """Verdicts for many (question, responses) items at once (see `judge`)."""
        use_meta = self.meta is not None if meta is None else meta
        if use_meta and self.meta is None:
            raise NanoseekError("meta-RM voting needs a meta RM: GRM(path, meta=DIR)")
        if k < 1:
            raise NanoseekError(f"k={k}: sample at least one judgment")
        for i, (question, responses) in enumerate(items):  # else an AttributeError, or a string judged letter by letter
            if not isinstance(question, str) or not isinstance(responses, (list, tuple)) or not all(
                    isinstance(r, str) for r in responses):
                raise NanoseekError(f"item {i + 1}: a judgment takes a question string and a list of response "
                                    f"strings, got {type(question).__name__} and {responses!r:.80}")
        if use_meta and k_meta is not None and k_meta < 1:  # 0 summed no vote, -1 all but one
            raise NanoseekError(f"k_meta={k_meta}: the meta RM keeps at least one judgment (default k/2)")
        if use_meta and k_meta is not None and k_meta > k:
            raise NanoseekError(f"k_meta={k_meta} keeps more judgments than the k={k} sampled")
        k_meta = max(1, k // 2) if k_meta is None else k_meta
        judgments = self.sample(items, k, seed, temperature)
        ratings = self.meta_scores(items, judgments) if use_meta else None
        verdicts = []
        for i, ((_, responses), js) in enumerate(zip(items, judgments)):
            kept = list(range(k)) if ratings is None else meta_kept(js, ratings[i], k_meta)
            scores = summed_scores([js[c] for c in kept], len(responses))
            verdicts.append(Verdict(scores, pick_best(scores, (seed, i)), js, kept,
                                    sum(j.parsed for j in js) / k))
        return verdicts

    def judge(self, question: str, responses: list[str], k: int = 8, meta: bool | None = None, seed: int = 0,
              k_meta: int | None = None) -> Verdict:
        """Judge `responses` to `question` with k sampled judgments: summed scores per response, the
        best one (ties broken at random with `seed`), and each judgment's principles, critique and
        scores. `meta`: keep only the k_meta (default k/2) judgments the meta RM rates highest."""
        if isinstance(responses, str):
            responses = [responses]
        return self.judge_many([(question, list(responses))], k, seed, meta, k_meta)[0]


def meta_text(question: str, responses: list[str], judgment: Judgment, principles: bool = True) -> str:
    """What the meta RM reads: the judgment's prompt as the judge saw it (its shuffled order) and
    the judgment's text."""
    shown = [responses[o] for o in judgment.order] if judgment.order else responses
    return judge_prompt(question, shown, principles=principles) + judgment.text


# ============================================================== best-of-N reranking


def rerank(grm: GRM, questions: list[str], candidates: list[list[str]], k: int = 1, seed: int = 0
           ) -> tuple[list[int], float]:
    """Best-of-N: for each question, the index of the candidate the GRM scores highest, each
    candidate judged alone (a pointwise judgment; the mean score of its k samples that parse, so a
    judgment that does not parse scores no candidate rather than a 0 for one; identical texts
    judged once), ties broken at random with the seed. Returns (picks, parse rate of the judgments)."""
    unique = sorted({(q, c) for q, cs in zip(questions, candidates) for c in cs})
    verdicts = grm.judge_many([(q, [c]) for q, c in unique], k=k, seed=derive_seed(seed, "rerank"), meta=False)
    score_of = {key: mean_score(v) for key, v in zip(unique, verdicts)}
    picks = [pick_best([score_of[(q, c)] for c in cs], (seed, i)) for i, (q, cs) in enumerate(zip(questions, candidates))]
    return picks, sum(v.parse_rate for v in verdicts) / max(1, len(verdicts))


def mean_score(verdict: Verdict) -> float:
    """A single response's mean score over the judgments that parse (0, below the scale, if none)."""
    parsed = sum(j.parsed for j in verdict.samples)
    return verdict.scores[0] / parsed if parsed else 0.0


# ============================================================== the GRM as an RL reward


class GRMReward:
    """`rewards = { grm = 1.0 }` in `nanoseek rl`: each completion judged alone (a pointwise,
    single-response judgment), k samples summed, mapped to [0, 1] as (mean score - 1) / 9. The RL
    loop calls `prepare` with the whole rollout first, so the judgments are generated in one batch;
    a call for a completion it has not seen judges that one alone."""

    __name__ = "grm"

    def __init__(self, path: str | Path, k: int = 1, seed: int = 0):
        self.grm = GRM(path)
        self.k, self.seed, self.calls = k, seed, 0
        self.cache: dict[tuple[str, str], list[float]] = {}  # one prepared reward per completion, duplicates too

    def prepare(self, pairs) -> None:
        todo = [(p.question, c) for c, p in pairs]
        if not todo:
            return
        self.calls += 1
        verdicts = self.grm.judge_many([(q, [c]) for q, c in todo], k=self.k, seed=derive_seed(self.seed, self.calls))
        for key, v in zip(todo, verdicts):
            reward = (mean_score(v) - MIN_SCORE) / (MAX_SCORE - MIN_SCORE) if any(j.parsed for j in v.samples) else 0.0
            self.cache.setdefault(key, []).append(reward)

    def state_dict(self) -> dict:
        """What a resumed RL run needs to judge on as an uninterrupted one: the judgment seeds
        follow the count of prepared batches (the cache is empty between rollouts)."""
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]

    def __call__(self, completion: str, problem) -> float:
        key = (problem.question, completion)
        if not self.cache.get(key):
            self.prepare([(completion, problem)])
        reward = self.cache[key].pop()
        if not self.cache[key]:
            del self.cache[key]
        return reward


# ============================================================== CLI: nanoseek judge


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="GRM checkpoint (e.g. runs/grm_small/latest)")
    parser.add_argument("--input", required=True,
                        help='jsonl, one item a line: {"question": ..., "responses": [...]} (or "response": ...)')
    parser.add_argument("--output", help="write the judgments here (default: stdout)")
    parser.add_argument("--k", type=int, default=8, help="judgments sampled per item (votes)")
    parser.add_argument("--meta", nargs="?", const="auto", default=None, metavar="DIR",
                        help="meta-RM guided voting (alone: the meta RM saved beside the GRM, ../meta)")
    parser.add_argument("--k-meta", type=int, default=None, help="judgments the meta RM keeps (default k/2)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=THREADS, default=0, help="torch CPU threads (0: torch's default)")


def read_items(path: str | Path) -> list[tuple[str, list[str]]]:
    """(question, responses) items from a jsonl file; a bad line is a NanoseekError naming it."""
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"input file {path} not found")
    from nanoseek.data.corpus import jsonl_rows

    items = []
    for lineno, row in jsonl_rows(path):
        problem = None
        if not isinstance(row, dict):
            problem = f"a JSON {type(row).__name__}, not an object"
        elif not isinstance(row.get("question"), str):
            problem = "no \"question\" string"
        elif "responses" not in row and "response" not in row:
            problem = "no \"responses\" list (or one \"response\")"
        else:
            responses = row["responses"] if "responses" in row else [row["response"]]
            if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
                problem = "responses must be a non-empty list of strings"  # a string is not a list of its letters
        if problem:
            raise NanoseekError(f"{path}:{lineno}: {problem}; expected {{\"question\": str, \"responses\": "
                                "[str, ...]}")
        items.append((row["question"], list(responses)))
    if not items:
        raise NanoseekError(f"{path} has no items")
    return items


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    items = read_items(args.input)
    if args.output:  # before the judging, which can take hours: not a crash at the end
        output = Path(args.output)
        if output.is_dir() or not output.parent.is_dir():
            raise NanoseekError(f"--output {output}: " + ("is a directory; give a file path" if output.is_dir() else
                                                          f"no directory {output.parent} to write it in"))

    meta = args.meta
    if meta == "auto":
        from nanoseek.train.checkpointing import find_checkpoint

        meta = Path(find_checkpoint(args.model)).resolve().parent.parent / "meta"
        if not (meta / META_HEAD).is_file():
            raise NanoseekError(f"no meta RM at {meta}: pass --meta DIR")
    grm = GRM(args.model, meta=meta, temperature=args.temperature)
    verdicts = grm.judge_many(items, k=args.k, seed=args.seed, k_meta=args.k_meta)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for (question, responses), v in zip(items, verdicts):
            out.write(json.dumps({"question": question, "responses": responses, **v.to_dict()}) + "\n")
    finally:
        if args.output:
            out.close()
    parsed = sum(v.parse_rate for v in verdicts) / len(verdicts)
    print(f"judge: {len(items)} items x k={args.k}, parse rate {parsed:.3f}", file=sys.stderr)
    if parsed == 0:  # a model that never learnt the format: every item scored nothing
        print(f"judge: no judgment parsed, so no response got a score; is {args.model} a generative reward "
              "model (`nanoseek grm`'s judge, e.g. runs/grm_small/latest)?", file=sys.stderr)
    return 0


__all__ = ["GRM", "GRMReward", "Judgment", "Verdict", "ScalarRM", "judge_prompt", "format_judgment",
           "parse_judgment", "summed_scores", "strictly_best", "pick_best", "judgment_correct", "rule_reward",
           "meta_select"]
