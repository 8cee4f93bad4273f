"""R1-Zero reinforcement learning: GRPO, Dr. GRPO and DAPO with rule-based rewards.

    nanoseek rl --config configs/rl_r1zero_reasoning.toml [init=runs/pretrain_reasoning/latest key=value ...]
    nanoseek rl --config ... --resume            # continue exactly where the last checkpoint left off

Starting from a base checkpoint, each step reads top to bottom (`_train` below):

1. rollout    `batch_size / num_generations` problems from the task's train split, chosen by
              (seed, step), each sampled G = num_generations times by the inference engine, which
              shares the policy's weights (updated in place, never reloaded) and returns each
              token's log-probability under the policy that sampled it.
2. reward     weighted rule-based rewards (`nanoseek.rewards`: accuracy, format, or any callable
              registered there), plus DAPO's soft overlong punishment when enabled.
3. advantage  group-normalised: A_i = (r_i - mean(r)) / (std(r) + 1e-4) over the G samples of a
              prompt (GRPO, DAPO), or A_i = r_i - mean(r) (Dr. GRPO); every token of o_i gets A_i.
              DAPO's dynamic sampling drops groups whose rewards are all equal and samples more.
4. loss       per token, the clipped surrogate minus a k3 KL penalty to the frozen reference,
                  l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t,
                  rho_t = pi_theta(o_t) / pi_old(o_t),  KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1,
              (KL_t is DeepSeekMath's k3, not weighted by rho_t as TRL's default use_bias_correction_kl does)
              summed with the loss type's normaliser:
                  grpo      (1/N) sum_i (1/|o_i|) sum_t l_it      (DeepSeekMath eq. 3)
                  dr_grpo   (1/(N L_max)) sum_i sum_t l_it        (Dr. GRPO: no length bias)
                  dapo      (1/sum_i |o_i|) sum_i sum_t l_it      (DAPO eq. 12: token level)
5. step       `mu` optimizer steps on the batch (trainer.Trainer: AdamW, schedule, clipping), then
              the engine's prefix cache is reset, since its latents came from the old weights.
              With beta = 0 the completions whose advantage is 0 are left out of the forward and
              backward (`samples_to_train`): the step is the same, and entropy, clip fraction
              and KL are logged over the completions trained on (`trained`: their share).

The losses select these defaults (each can be set explicitly):

    loss      scale_rewards  epsilon / epsilon_high  beta   dynamic_sampling  overlong_buffer
    grpo      yes            0.2 / 0.2               0.04   no                0
    dr_grpo   no             0.2 / 0.2               0      no                0
    dapo      yes            0.2 / 0.28              0      yes               max_completion_length / 4

Deviations from the papers, all deliberate:

- pi_old is the rollout policy as the engine reports it (raw log-softmax of the logits, before
  temperature), not a recomputation by the trainer: the engine decodes MLA on the latent cache
  (the absorbed path) and the trainer runs the expanded path, so with mu = 1 the ratio is 1 only
  up to that numerical mismatch (logged as `logprob_gap`, ~1e-7 in fp32 on CPU), instead of exactly 1
  as in TRL. The scored policy is the untempered one; temperature only shapes exploration (TRL
  divides the logits by the temperature instead; at the default temperature 1 the two agree).
- The std in the GRPO advantage is the unbiased (Bessel-corrected) one, plus 1e-4, as in TRL;
  DeepSeekMath does not say.
- Dr. GRPO's constant normaliser is max_completion_length per completion, as in its code
  (`constant_normalizer=generate_max_length`) and TRL's `dr_grpo`.
- DAPO's overlong handling is the soft punishment (eq. 13) only, added to the reward; truncated
  samples are not also masked (DAPO's earlier "overlong filtering" step). Its reward is the
  configured rule reward (accuracy 1/0 by default), not DAPO's +1/-1.
- Dynamic sampling samples at most `max_sampling_rounds` rounds of prompts per step; if the batch
  is still short it trains on the groups it has, and if none survived, on the last round as is
  (its advantages are all zero, so only the KL term acts).
- The reference model is the initial checkpoint for the whole run (R1 refreshes it every 400
  steps; DeepSeekMath's iterative RL resets it per iteration). With beta = 0 it only serves the
  logged KL (`log_kl`), and none is loaded when that is off too.
- No expert-bias update during RL: the routing bias stays as pretraining left it. The MTP modules
  are frozen (the policy is the next-token head alone), so they keep drafting for the base model.
- `step` counts optimizer steps as in TRL, so with mu > 1 a rollout happens every mu steps;
  evaluation, checkpoints and stopping happen only between rollouts, so a resumed run (whose
  prompts and sampling seeds are functions of (seed, step)) continues bit for bit on CPU. A
  max_steps that is not a multiple of mu is rounded up to whole rollouts (max_steps=3 mu=2: 4 steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from nanoseek.checkpoint import load_model
from nanoseek.data.tasks import Problem, derive_seed, get_task, prompt_of, reasons
from nanoseek.errors import ConfigError
from nanoseek.eval import evaluate
from nanoseek.inference.engine import LLM
from nanoseek.inference.sampling import SamplingParams
from nanoseek.model.loss import token_logprobs
from nanoseek.model.moe import moe_layers
from nanoseek.plots import save_r1zero_figure
from nanoseek.rewards import REWARDS, accuracy_reward, combine_rewards, format_reward
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import stage
from nanoseek.train.checkpointing import find_checkpoint
from nanoseek.train.config import TrainConfig
from nanoseek.train.distributed import DistEnv, barrier, gather_objects, seed_everything, sum_over_ranks
from nanoseek.train.stage import run_stage, stage_model
from nanoseek.train.trainer import Trainer

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADV_EPS = 1e-4  # added to the group std, as in TRL


@dataclass
class GRPOConfig(TrainConfig):
    """The RL run. `batch_size` counts completions per step (as in TRL): batch_size / num_generations
    prompts, each sampled num_generations times. `seq_len` caps prompt + completion tokens."""

    out_dir: str = "runs/rl"
    init: str = ""  # the base checkpoint (a directory, or a run directory: the checkpoint its `latest` names)
    # task and rewards
    task: str = "default"  # a nanoseek.data.tasks name
    task_args: dict[str, Any] = field(default_factory=dict)  # reasoning-gym difficulty: task_args.min_terms=3
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})  # name -> weight
    grm_model: str = ""  # the generative reward model `rewards.grm` judges with (a `nanoseek grm` run)
    grm_samples: int = 1  # judgments summed per completion for `rewards.grm`
    # rollout
    num_generations: int = 8  # G, samples per prompt
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    freeze_router: bool = False  # keep the MoE routers' weights as the base's (routing then moves only with the hidden states)
    # objective
    loss: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    mu: int = 1  # optimizer steps per rollout batch
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip; None: 0.28 for dapo, else epsilon
    beta: float | None = None  # k3 KL weight; None: 0.04 for grpo, else 0
    log_kl: bool = True  # keep the reference to log the KL even when beta = 0 (one no-grad forward per step)
    scale_rewards: bool | None = None  # divide advantages by the group std; None: all but dr_grpo
    dynamic_sampling: bool | None = None  # drop all-equal groups and sample more; None: dapo only
    max_sampling_rounds: int = 3  # dynamic sampling: rounds of prompts per step at most
    overlong_buffer: int | None = None  # soft overlong punishment window (tokens); None: L/4 for dapo, else 0
    overlong_penalty: float = 1.0  # its largest penalty
    # held-out evaluation (every eval_every steps): greedy pass@1 on a fixed eval-split set
    eval_n: int = 200  # 0: no held-out evaluation
    eval_seed: int = 0
    # TrainConfig defaults that suit RL
    max_steps: int = 200
    batch_size: int = 128
    micro_batch_size: int = 32
    seq_len: int = 256
    lr: float = 1e-4
    schedule: Literal["cosine", "wsd", "constant"] = "constant"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    beta2: float = 0.99
    log_every: int = 1
    eval_every: int = 25
    save_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        if self.expert_parallel:  # its rollouts run the whole policy on each rank
            raise ConfigError("expert_parallel=true: RL generates with the inference engine, which needs every "
                              "expert on each rank; set expert_parallel=false (DDP or FSDP2 train the policy)")
        if self.loss not in LOSS_TYPES:
            raise ConfigError(f"loss={self.loss!r}: expected one of {', '.join(LOSS_TYPES)}")
        dapo = self.loss == "dapo"
        if self.epsilon_high is None:
            self.epsilon_high = 0.28 if dapo else self.epsilon
        if self.beta is None:
            self.beta = 0.04 if self.loss == "grpo" else 0.0
        if self.scale_rewards is None:
            self.scale_rewards = self.loss != "dr_grpo"
        if self.dynamic_sampling is None:
            self.dynamic_sampling = dapo
        if self.overlong_buffer is None:
            self.overlong_buffer = self.max_completion_length // 4 if dapo else 0
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: GRPO needs at least 2 samples per prompt")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"batch_size={self.batch_size} (completions per step) must be a multiple of "
                              f"num_generations={self.num_generations}")
        if self.eval_n < 0:
            raise ConfigError(f"eval_n={self.eval_n} must be >= 0")
        for name in ("mu", "max_completion_length", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.overlong_buffer <= self.max_completion_length:
            raise ConfigError(f"overlong_buffer={self.overlong_buffer} must be in [0, max_completion_length]")
        if self.epsilon < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ConfigError("epsilon, epsilon_high and beta must be >= 0")
        if not self.rewards:
            raise ConfigError("rewards is empty: give at least one, e.g. rewards.accuracy=1.0")
        # the registered rule rewards, and `grm`, which configured_rewards turns into the judge
        available = sorted({*REWARDS, "grm"})
        for name in self.rewards:
            if name not in available:
                raise ConfigError(f"unknown reward {name!r} in rewards; available: {', '.join(available)}")
        if "grm" in self.rewards and not self.grm_model:
            raise ConfigError("rewards.grm needs the judge: set grm_model=runs/grm_small/latest")
        if self.grm_samples < 1:
            raise ConfigError(f"grm_samples={self.grm_samples} must be >= 1")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations


# ============================================================== the objective, piece by piece


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Per-completion advantages (N,) from rewards (N,) laid out group by group (G consecutive
    samples of one prompt): r - mean(group), divided by (std(group) + 1e-4) when `scale`."""
    grouped = rewards.view(-1, group_size)  # (N/G, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (grouped.std(dim=1, keepdim=True) + ADV_EPS)
    return adv.flatten()


def sequence_weights(lengths: list[int], loss_type: str, max_completion_length: int,
                     total_sequences: int | None = None, total_tokens: int | None = None) -> list[float]:
    """The weight every token of each completion gets in the summed loss: the loss type's
    normaliser written per token, so micro-batches and ranks can be summed exactly.

    grpo: 1/(N |o_i|); dr_grpo: 1/(N L_max); dapo: 1/sum_j |o_j|. `total_sequences` (N) and
    `total_tokens` default to this list's; pass the global ones when the batch is split over ranks.
    """
    n = total_sequences if total_sequences is not None else len(lengths)
    tokens = total_tokens if total_tokens is not None else sum(lengths)
    if loss_type == "grpo":
        return [1.0 / (n * length) for length in lengths]
    if loss_type == "dr_grpo":
        return [1.0 / (n * max_completion_length)] * len(lengths)
    if loss_type == "dapo":
        return [1.0 / tokens] * len(lengths)
    raise ConfigError(f"loss={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                 eps_high: float, beta: float = 0.0, ref_logp: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss l_t = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta KL_t (any shape,
    all arguments broadcast), and per-token diagnostics: `clipped` (the clip bound is the active
    term, so the token gives no gradient) and `kl` (k3 to the reference, when given)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.min(unclipped, clipped)
    info = {"clipped": (clipped < unclipped).float()}
    if ref_logp is not None:
        log_ratio = ref_logp - logp  # log(pi_ref / pi_theta)
        kl = torch.exp(log_ratio) - log_ratio - 1
        info["kl"] = kl.detach()
        if beta:
            loss = loss + beta * kl
    return loss, info


def overlong_punishment(length: int, max_length: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_length - buffer tokens, then falling
    linearly to -penalty at max_length (and -penalty beyond)."""
    if buffer <= 0 or length <= max_length - buffer:
        return 0.0
    if length > max_length:
        return -penalty
    return penalty * ((max_length - buffer) - length) / buffer


# ============================================================== rollouts


@dataclass
class Sample:
    """One completion and everything the update needs about it."""

    problem: Problem
    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]  # per completion token, under the policy that sampled it
    text: str
    truncated: bool
    reward: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # each reward's unweighted value
    advantage: float = 0.0
    weight: float = 0.0  # per-token loss weight (sequence_weights)
    ref_logprobs: list[float] | None = None


def sample_groups(llm: LLM, problems: list[Problem], cfg: GRPOConfig, seed: int,
                  indices: Sequence[int] | None = None) -> list[Sample]:
    """G completions for each problem, in problem order (G consecutive samples per group).
    Sampling is seeded per prompt from `seed` and the prompt's index in the step (`indices`: a
    rank's share of the step's prompts; default 0, 1, ...), so the same policy gives the same
    samples however the prompts are split over ranks."""
    indices = range(len(problems)) if indices is None else indices
    params = [SamplingParams(n=cfg.num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=cfg.max_completion_length, seed=derive_seed(seed, i), logprobs=0)
              for i in indices]
    outputs = llm.generate([prompt_of(p) for p in problems], params)
    return [Sample(problem, out.prompt_token_ids, c.token_ids, [lp["logprob"] for lp in c.logprobs], c.text,
                   c.finish_reason == "length")
            for problem, out in zip(problems, outputs) for c in out.outputs]


def configured_rewards(cfg: GRPOConfig) -> dict:
    """The run's rewards for `combine_rewards`: names, except `grm`, which becomes the generative
    reward model at cfg.grm_model (the task's rule checker then serves the evaluation only)."""
    if "grm" not in cfg.rewards:
        return dict(cfg.rewards)
    from nanoseek.grm import GRMReward

    judge = GRMReward(cfg.grm_model, k=cfg.grm_samples, seed=cfg.seed)
    return {judge if name == "grm" else name: weight for name, weight in cfg.rewards.items()}


def reward_state(reward_fn) -> dict[str, Any]:
    """The state of the rewards that keep one (those with state_dict(): the GRM judge counts its
    batches to seed them), for the checkpoint: a resumed run must score as an uninterrupted one."""
    return {name: fn.state_dict() for name, fn in reward_fn.fns.items() if hasattr(fn, "state_dict")}


def load_reward_state(reward_fn, state: dict[str, Any]) -> None:
    for name, fn_state in state.items():
        reward_fn.fns[name].load_state_dict(fn_state)


def score(samples: list[Sample], reward_fn, cfg: GRPOConfig) -> None:
    """Fill each sample's reward (weighted rule rewards + overlong punishment) and its parts.
    A reward with `prepare` (the GRM) first sees the whole rollout, to judge it in one batch."""
    for fn in reward_fn.fns.values():
        if hasattr(fn, "prepare"):
            fn.prepare([(s.text, s.problem) for s in samples])
    for s in samples:
        s.parts = reward_fn.breakdown(s.text, s.problem)
        s.reward = sum(reward_fn.weights[k] * v for k, v in s.parts.items())
        if cfg.overlong_buffer:
            s.reward += overlong_punishment(len(s.completion_ids), cfg.max_completion_length,
                                            cfg.overlong_buffer, cfg.overlong_penalty)


def informative(group: list[Sample]) -> bool:
    """A group carries a learning signal only if its rewards differ (DAPO's dynamic-sampling test)."""
    return any(s.reward != group[0].reward for s in group)


# ============================================================== batches for the update


def samples_to_train(batch: list[Sample], beta: float, fsdp: bool = False) -> list[Sample]:
    """The completions the update needs. Without a KL penalty, a completion whose advantage is 0
    (all of an all-equal group) adds exactly 0 to the loss and to its gradient, while the loss
    weights still count it: leaving it out changes nothing but the time. Early in R1-Zero training
    most groups are all-equal. One completion is kept when none is left, so that the optimizer
    still takes its step (AdamW moves on its momentum even at zero gradient). Under FSDP every
    rank must run the same number of forwards (each gathers parameters), so all are kept there."""
    if beta or fsdp:
        return batch
    return [s for s in batch if s.advantage != 0] or batch[:1]


def make_micro_batches(samples: list[Sample], micro_batch_size: int, pad_id: int,
                       device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Right-padded prompt+completion rows with per-position tensors aligned to the logits, on
    `device`: position t predicts token t+1, so a completion token at index p is scored at t = p - 1."""
    batches = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start: start + micro_batch_size]
        T = max(len(s.prompt_ids) + len(s.completion_ids) for s in chunk)
        B = len(chunk)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        targets = torch.zeros((B, T), dtype=torch.long)
        mask, weight, adv, old, ref = (torch.zeros((B, T)) for _ in range(5))
        for i, s in enumerate(chunk):
            ids = s.prompt_ids + s.completion_ids
            input_ids[i, : len(ids)] = torch.tensor(ids)
            a, b = len(s.prompt_ids) - 1, len(ids) - 1  # logits rows scoring the completion
            targets[i, a:b] = torch.tensor(s.completion_ids)
            mask[i, a:b] = 1.0
            weight[i, a:b] = s.weight
            adv[i, a:b] = s.advantage
            old[i, a:b] = torch.tensor(s.old_logprobs)
            if s.ref_logprobs is not None:
                ref[i, a:b] = torch.tensor(s.ref_logprobs)
        batch = dict(input_ids=input_ids, targets=targets, mask=mask, weight=weight, advantages=adv, old_logp=old)
        if chunk[0].ref_logprobs is not None:
            batch["ref_logp"] = ref
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def completion_logprobs(model, batch: dict[str, torch.Tensor], head=None,
                        fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N,) of the N completion tokens of `batch` (row by row, in order) under
    `model`, and the entropy (N,) of each of their next-token distributions (no gradient).

    `head`: the model's lm_head, to apply it to the completion positions only (the prompt's logits
    are never needed; that saves a fifth of the update). Leave it None under DDP, whose wrapped
    forward must produce every output that gets a gradient, unless `fused` (the recipe's
    fused_loss): the head is then fused into the log-softmax so that the (N, V) logits never exist
    (model/loss.py), and its weight's gradient, used outside the wrapped forward, still reaches DDP's
    per-parameter hooks and is averaged over ranks (test_grpo's two-rank test checks it).
    """
    sel = batch["mask"].bool()
    targets = batch["targets"][sel]  # (N,)
    if head is None:
        logits = model(batch["input_ids"]).logits[sel]
    else:
        hidden = model(batch["input_ids"], logits=False).hidden[sel]
        if fused:
            return token_logprobs(hidden, head.weight, targets, entropy=True)
        logits = head(hidden)
    logprobs = logits.float().log_softmax(dim=-1)  # (N, V)
    token_logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return token_logp, entropy


@torch.no_grad()
def add_reference_logprobs(reference, samples: list[Sample], micro_batch_size: int, pad_id: int) -> None:
    """Fill each sample's ref_logprobs with the frozen reference model's log-probabilities."""
    device = next(reference.parameters()).device
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start: start + micro_batch_size]
        batch = make_micro_batches(chunk, len(chunk), pad_id, device)[0]
        logp, _ = completion_logprobs(reference, batch, reference.lm_head)
        for s, values in zip(chunk, logp.split([len(s.completion_ids) for s in chunk])):
            s.ref_logprobs = values.tolist()


# ============================================================== one update (shared with nanoseek grm)


def prepare_update(batch: list[Sample], cfg: GRPOConfig, env: DistEnv, trainer: Trainer, reference,
                   pad_id: int) -> tuple[list[Sample], list[dict[str, torch.Tensor]], float]:
    """Steps 3 and the inputs of 4 for a rolled-out, rewarded batch (G consecutive samples per
    group): each sample's advantage and per-token loss weight, the reference log-probabilities,
    and the micro-batches. Returns (the samples trained on, their micro-batches, reference seconds)."""
    rewards = torch.tensor([s.reward for s in batch])
    for s, a in zip(batch, group_advantages(rewards, cfg.num_generations, cfg.scale_rewards).tolist()):
        s.advantage = a
    lengths = [len(s.completion_ids) for s in batch]
    n_seq, n_tok = (int(v) for v in sum_over_ranks(env, [len(batch), sum(lengths)]))
    for s, w in zip(batch, sequence_weights(lengths, cfg.loss, cfg.max_completion_length, n_seq, n_tok)):
        s.weight = w
    trained = samples_to_train(batch, cfg.beta, trainer.fsdp)
    t0 = time.perf_counter()
    if reference is not None:
        with trainer.autocast():
            add_reference_logprobs(reference, trained, cfg.micro_batch_size or len(trained), pad_id)
    micro_batches = make_micro_batches(trained, cfg.micro_batch_size or len(trained), pad_id, env.device)
    return trained, micro_batches, time.perf_counter() - t0


def policy_loss(cfg: GRPOConfig, head, scale: float):
    """Step 4 as the Trainer's loss_fn: sum_t weight_t l_t over the micro-batch's completion tokens.
    train_step divides each micro-batch's objective by their count and DDP averages over ranks, so
    `scale` (micro-batches x ranks) multiplies both back."""

    def loss_fn(model, mb):
        sel = mb["mask"].bool()  # the completion tokens; every per-token tensor below is (N,)
        logp, entropy = completion_logprobs(model, mb, head, fused=cfg.fused_loss)
        old_logp = mb["old_logp"][sel]
        losses, info = token_losses(logp, old_logp, mb["advantages"][sel], cfg.epsilon, cfg.epsilon_high,
                                    cfg.beta, mb["ref_logp"][sel] if "ref_logp" in mb else None)
        objective = (losses * mb["weight"][sel]).sum()
        # the loss logged is the whole step's objective (the Trainer averages metrics over
        # micro-batches and ranks, so this micro-batch's share is scaled back, as for the gradient)
        metrics = {"loss": objective.detach() * scale, "clip_frac": info["clipped"].mean(),
                   "entropy": entropy.mean(), "logprob_gap": (logp.detach() - old_logp).abs().mean()}
        if "kl" in info:
            metrics["kl"] = info["kl"].mean()
        return objective * scale, metrics

    return loss_fn


# ============================================================== the loop


def train(cfg: GRPOConfig, resume: str | Path | None = None) -> Path:
    """Run R1-Zero RL (in this process, or as one rank under torchrun); returns the final
    checkpoint directory. `resume`: "latest" or a checkpoint directory to continue from."""
    return run_stage(_train, cfg, resume)


def _train(cfg: GRPOConfig, env: DistEnv, resume) -> Path:
    if not cfg.init:
        raise ConfigError("init is not set: give the base checkpoint, e.g. init=runs/pretrain_small/latest")
    if env.distributed and cfg.parallel == "fsdp":
        # the engine samples from trainer.raw_model on each rank (and the held-out eval on rank 0 alone): a sharded
        # policy hangs there, or fails its first forward under inference mode
        raise ConfigError("RL under torchrun runs with parallel=ddp: the rollout engine needs the whole policy on "
                          "every rank, which FSDP shards")

    # ---- setup: policy (trained), reference (frozen), engine (shares the policy's weights)
    base = find_checkpoint(cfg.init)
    tokenizer = Tokenizer.from_dir(base)
    seed_everything(cfg.seed)
    policy = stage_model(str(base), tokenizer, {}, cfg.seq_len).to(env.device)
    policy.mtp_layers.requires_grad_(False)  # RL scores next tokens only: the MTP modules get no gradient
    if cfg.freeze_router:
        for moe in moe_layers(policy):
            moe.gate.requires_grad_(False)
    reference = load_model(base, device=env.device).eval().requires_grad_(False) if cfg.beta or cfg.log_kl else None
    trainer = Trainer(cfg, policy, env, tokenizer=tokenizer, resume=resume)  # closed by the `with` below
    llm = LLM(trainer.raw_model, tokenizer, max_num_seqs=cfg.batch_size, max_model_len=cfg.seq_len,
              block_size=16, device=str(env.device))
    task = get_task(cfg.task, **cfg.task_args)
    reward_fn = combine_rewards(configured_rewards(cfg))
    load_reward_state(reward_fn, trainer.extra_state.get("rewards", {}))  # a resumed run's
    eval_problems = task.problems(cfg.eval_n, seed=cfg.eval_seed, split="eval") if cfg.eval_n else []
    longest = max(len(tokenizer.encode(prompt_of(p))) + 1  # + bos
                  for p in eval_problems or task.problems(8, seed=cfg.seed, split="train"))
    if longest + cfg.max_completion_length > cfg.seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} cannot hold a {longest}-token prompt and max_completion_length="
                          f"{cfg.max_completion_length}; raise seq_len to at least {longest + cfg.max_completion_length}")
    head = None if env.distributed and not cfg.fused_loss else trainer.raw_model.lm_head  # see completion_logprobs
    # each rank samples its own share of the step's prompts; groups never straddle ranks
    prompts_here = len(range(env.rank, cfg.prompts_per_step, env.world_size))
    if env.is_main:
        print(f"rl: {cfg.loss} from {base} | {cfg.prompts_per_step} prompts x G={cfg.num_generations} | "
              f"lr {cfg.lr:g} | beta {cfg.beta:g} | eps {cfg.epsilon:g}/{cfg.epsilon_high:g} | mu {cfg.mu} | "
              f"rewards {reward_fn.weights} | dynamic sampling {cfg.dynamic_sampling} | "
              f"overlong buffer {cfg.overlong_buffer}", flush=True)

    def held_out_eval():
        if env.is_main and eval_problems:
            with trainer.autocast():
                report = evaluate(llm, task=task, problems=eval_problems, max_tokens=cfg.max_completion_length)
            trainer.log({"eval_pass@1": report["pass@1"], "eval_format": report["format"],
                         "eval_reasoning": report["reasoning"], "eval_length": report["mean_length"],
                         "eval_s": report["seconds"]}, console=True)
        barrier()

    with trainer:  # closes the metrics writer and restores the signal handlers, however the loop ends
        if trainer.step == 0:
            held_out_eval()

        # ---- the loop: one rollout, then mu optimizer steps on it
        while trainer.step < cfg.max_steps:
            rollout_index = trainer.step // cfg.mu

            # 1. rollout: this step's prompts, G samples each (more rounds if dynamic sampling drops groups)
            t0 = time.perf_counter()
            llm.reset_prefix_cache()
            groups, seen, rounds = [], [], 0
            while len(groups) < prompts_here and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
                mine = range(env.rank, cfg.prompts_per_step, env.world_size)  # this rank's prompts of the step
                problems = task.problems(cfg.prompts_per_step, seed=derive_seed(cfg.seed, rollout_index, rounds),
                                         split="train")[env.rank:: env.world_size]
                with trainer.autocast():  # on a GPU the engine computes in bf16 like the update (fp32 weights)
                    samples = sample_groups(llm, problems, cfg, seed=derive_seed(cfg.seed, rollout_index, rounds,
                                                                                  "sample"), indices=mine)
                # 2. reward
                score(samples, reward_fn, cfg)
                round_groups = [samples[i: i + cfg.num_generations] for i in range(0, len(samples), cfg.num_generations)]
                seen += round_groups
                groups += [g for g in round_groups if informative(g)] if cfg.dynamic_sampling else round_groups
                rounds += 1
            groups = groups[:prompts_here] or round_groups  # nothing informative at all: train on the last round
            trainer.extra_state["rewards"] = reward_state(reward_fn)  # checkpointed with the step
            batch = [s for g in groups for s in g]
            rollout_s = time.perf_counter() - t0

            # 3. advantage and per-token weights; 4. the loss over the batch (both shared with nanoseek grm)
            trained, micro_batches, reference_s = prepare_update(batch, cfg, env, trainer, reference,
                                                                 tokenizer.pad_id)
            loss_fn = policy_loss(cfg, head, scale=len(micro_batches) * env.world_size)

            # 5. optimizer steps; the engine's cached latents are stale after each
            for iteration in range(cfg.mu):
                t2 = time.perf_counter()
                stats = trainer.train_step(micro_batches, loss_fn)
                llm.reset_prefix_cache()
                stats["update_s"] = time.perf_counter() - t2
                stats.pop("step_time_s")
                record = {}
                if iteration == 0:
                    record = rollout_stats(seen, batch, rounds, rollout_s, cfg)
                    record["reference_s"] = reference_s
                    trained_n, batch_n = sum_over_ranks(env, [len(trained), len(batch)])
                    record["trained"] = trained_n / batch_n
                trainer.log({**record, **stats})

            # evaluation, samples, checkpoints and stopping only between rollouts: `steps=cfg.mu`
            if trainer.end_of_step(validate=held_out_eval, sample=lambda: _print_sample(env, trainer.step, batch),
                                   steps=cfg.mu):
                break

        final = trainer.save_checkpoint()
    if env.is_main:
        save_r1zero_figure(cfg.out_dir)  # held-out accuracy and response length against step, as a PNG
    return final


def rollout_stats(seen: list[list[Sample]], batch: list[Sample], rounds: int, seconds: float,
                  cfg: GRPOConfig) -> dict[str, float]:
    """What the rollout looked like over every rank's completions: rewards, accuracy, format,
    lengths over every sampled completion (before dynamic sampling's filter), and the share of
    uninformative groups. Accuracy and format are the rule checkers' even when they are not
    rewards (e.g. under the GRM). Every rank must call it (a gather)."""
    local = [{"reward": s.reward, "len": len(s.completion_ids), "truncated": s.truncated, "reasoning": reasons(s.text),
              "acc": s.parts.get("accuracy", accuracy_reward(s.text, s.problem)) == 1.0,
              "format": s.parts.get("format", format_reward(s.text, s.problem)) == 1.0,
              **{f"reward_{name}": s.parts[name] for name in cfg.rewards}}
             for g in seen for s in g]
    groups = [(not informative(g)) for g in seen]
    ranks = gather_objects((local, groups, len(batch) // cfg.num_generations, rounds))
    samples = [row for rows, _, _, _ in ranks for row in rows]
    zero_std = [z for _, flags, _, _ in ranks for z in flags]
    rewards = torch.tensor([row["reward"] for row in samples])

    def mean(key: str) -> float:
        return sum(row[key] for row in samples) / len(samples)

    stats = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(samples) > 1 else 0.0,
        "acc": mean("acc"), "format": mean("format"), "reasoning": mean("reasoning"),
        "len": mean("len"), "truncated": mean("truncated"),
        "zero_std_groups": sum(zero_std) / len(zero_std),
        "rollout_s": seconds,
        "completions_per_s": len(samples) / seconds,  # all ranks', sampling side by side
    }
    for name in cfg.rewards:
        stats[f"reward_{name}"] = mean(f"reward_{name}")
    if cfg.dynamic_sampling:
        stats.update(sampling_rounds=max(r for _, _, _, r in ranks), groups_trained=sum(g for _, _, g, _ in ranks))
    return stats


def _print_sample(env: DistEnv, step: int, batch: list[Sample]) -> None:
    if env.is_main:
        s = max(batch, key=lambda s: s.reward)
        print(f"---- best sample at step {step} (reward {s.reward:.2f}, answer {s.problem.answer}) ----\n"
              f"{s.problem.question}\n{s.text}\n----", flush=True)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    stage.add_arguments(parser, "init=runs/pretrain_reasoning/latest loss=dapo lr=5e-5 rewards.format=0.5 "
                                "task_args.min_terms=3")


def run(args) -> int:
    return stage.run_cli(args, GRPOConfig, train)
