"""R1-Zero RL: the GRPO / Dr. GRPO / DAPO objectives against hand-computed values, rewards on
crafted completions, real updates on a tiny model (one changes the parameters, twenty raise a
reward), and `nanoseek rl` end to end with resume.

The model is the `tiny` preset with random weights and a BPE trained here on a few hundred
synthetic documents, so nothing it samples is right: the runs use a custom reward (the share of
digits in the completion), which also checks that users can plug in their own rewards.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.checkpoint import load_model, save_model
from nanoseek.config import preset
from nanoseek.data.synthetic import generate_documents
from nanoseek.data.tasks import Problem, get_task, r1zero_completion
from nanoseek.errors import ConfigError
from nanoseek.model.transformer import Transformer
from nanoseek.rewards import REWARDS, accuracy_reward, combine_rewards, format_reward, register_reward
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train import grpo
from nanoseek.train.grpo import (
    GRPOConfig, Sample, group_advantages, make_micro_batches, overlong_punishment, sequence_weights,
    token_losses, train,
)
from nanoseek.train.config import load_run_config
from nanoseek.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "rl_r1zero_tiny.toml"


def digit_share(completion: str, problem) -> float:
    """A reward a random model can earn sometimes: the share of digits in its completion."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random checkpoint with a tokenizer trained on synthetic R1-Zero documents."""
    path = tmp_path_factory.mktemp("rl") / "base"
    tok = train_tokenizer(generate_documents(300, seed=0), vocab_size=512)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_model(Transformer(cfg), path, tokenizer=tok)
    return path


@pytest.fixture(autouse=True, scope="module")
def digits_reward():
    register_reward("digits", digit_share)
    yield
    REWARDS.pop("digits", None)


def rl_config(base, out_dir, *overrides) -> GRPOConfig:
    return load_run_config(GRPOConfig, TINY, [f"init={base}", f"out_dir={out_dir}", "rewards.digits=1.0", *overrides])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the objective, by hand


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of {1, 0, 0, 1}
    a = 0.5 / (std + 1e-4)
    assert group_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], rel=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_sequence_weights():
    assert sequence_weights([2, 4], "grpo", 8) == pytest.approx([1 / 4, 1 / 8])  # 1/(N |o_i|)
    assert sequence_weights([2, 4], "dr_grpo", 8) == pytest.approx([1 / 16, 1 / 16])  # 1/(N L_max)
    assert sequence_weights([2, 4], "dapo", 8) == pytest.approx([1 / 6, 1 / 6])  # 1/sum |o_i|
    # split over ranks: the global counts decide
    assert sequence_weights([2], "dapo", 8, total_sequences=2, total_tokens=6) == pytest.approx([1 / 6])
    with pytest.raises(ConfigError):
        sequence_weights([2], "ppo", 8)


def test_token_losses_clip_both_ways():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    old = torch.full((5,), -1.0)
    loss, info = token_losses(old + ratio.log(), old, adv, 0.2, 0.2)
    # min(rho A, clip(rho) A): 1.2 | 0.5 | -1.5 | -0.8 | 2.0, negated
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8, -2.0], rel=1e-6)
    assert info["clipped"].tolist() == [1, 0, 0, 1, 0]
    loss, _ = token_losses(old + ratio.log(), old, adv, 0.2, 0.28)  # DAPO clip-higher
    assert loss[0].item() == pytest.approx(-1.28)


def test_token_losses_k3_kl():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    kl = 0.5 - math.log(0.5) - 1  # pi_ref/pi - log(pi_ref/pi) - 1
    loss, info = token_losses(logp, logp, torch.tensor([0.0]), 0.2, 0.2, beta=0.1, ref_logp=ref)
    assert info["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)
    assert kl > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_loss_on_a_tiny_batch(loss_type):
    """One group of G=2: o_1 (2 tokens, ratios 1 and 1.5, reward 1) and o_2 (1 token, ratio 0.5,
    reward 0); eps 0.2 (0.28 above for DAPO), beta 0, L_max 4. Hand-computed totals below."""
    cfg = GRPOConfig(init="x", loss=loss_type, num_generations=2, batch_size=2, max_completion_length=4)
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, cfg.scale_rewards)
    a = 0.5 / (math.sqrt(0.5) + 1e-4) if loss_type != "dr_grpo" else 0.5
    assert adv.tolist() == pytest.approx([a, -a], rel=1e-6)
    w = sequence_weights([2, 1], cfg.loss, cfg.max_completion_length)
    logp = torch.tensor([[0.0, math.log(1.5)], [math.log(0.5), 0.0]])  # old logp = 0
    per_token_adv = torch.tensor([[adv[0], adv[0]], [adv[1], adv[1]]])
    weight = torch.tensor([[w[0], w[0]], [w[1], 0.0]])  # o_2 has one token
    loss, _ = token_losses(logp, torch.zeros(2, 2), per_token_adv, cfg.epsilon, cfg.epsilon_high)
    total = (loss * weight).sum().item()
    expected = {
        "grpo": 0.5 * ((-a - 1.2 * a) / 2 + 0.8 * a),  # mean over sequences of per-sequence token means
        "dr_grpo": (-0.5 - 0.6 + 0.4) / (2 * 4),  # sum over tokens / (N L_max)
        "dapo": (-a - 1.28 * a + 0.8 * a) / 3,  # sum over tokens / all tokens, clip-higher 0.28
    }[loss_type]
    assert total == pytest.approx(expected, rel=1e-5)


def test_loss_defaults_per_variant():
    grpo, dr, dapo = (GRPOConfig(init="x", loss=k) for k in ("grpo", "dr_grpo", "dapo"))
    assert (grpo.beta, grpo.scale_rewards, grpo.epsilon_high, grpo.dynamic_sampling) == (0.04, True, 0.2, False)
    assert (dr.beta, dr.scale_rewards, dr.overlong_buffer) == (0.0, False, 0)
    assert (dapo.epsilon_high, dapo.dynamic_sampling, dapo.overlong_buffer) == (0.28, True, 32)
    assert GRPOConfig(init="x", loss="dapo", epsilon_high=0.3, dynamic_sampling=False).epsilon_high == 0.3
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        GRPOConfig(init="x", batch_size=10, num_generations=4)
    with pytest.raises(ConfigError, match="loss"):
        load_run_config(GRPOConfig, None, ["loss=ppo"])


def test_reward_errors_list_every_reward_and_check_weights():
    with pytest.raises(ConfigError, match=r"unknown reward 'accurcy' in rewards; available: accuracy, digits, "
                                          r"format, grm$"):
        load_run_config(GRPOConfig, TINY, ["rewards={accurcy=1.0}"])
    with pytest.raises(ConfigError, match=r"rewards.format='abc': expected float"):
        load_run_config(GRPOConfig, TINY, ["rewards.format=abc"])


def test_overlong_punishment():
    assert [overlong_punishment(n, 10, 4) for n in (5, 6, 8, 10, 11)] == pytest.approx([0, 0, -0.5, -1, -1])
    assert overlong_punishment(10, 10, 0) == 0.0


def test_micro_batches_align_completions_with_logits():
    p = Problem("q", "1")
    a = Sample(p, [0, 10, 11], [20, 21, 1], [-0.1, -0.2, -0.3], "", False, advantage=1.0, weight=0.5)
    b = Sample(p, [0, 12], [22], [-0.4], "", True, advantage=-1.0, weight=0.25)
    first = make_micro_batches([a, b], 2, pad_id=2)[0]
    assert first["input_ids"].tolist() == [[0, 10, 11, 20, 21, 1], [0, 12, 22, 2, 2, 2]]
    assert first["mask"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]  # logits row t scores token t+1
    assert first["targets"][0, 2:5].tolist() == [20, 21, 1] and first["targets"][1, 1].item() == 22
    assert first["old_logp"][0, 2:5].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert first["weight"].sum().item() == pytest.approx(3 * 0.5 + 0.25)
    assert first["advantages"][1, 1].item() == -1.0
    assert len(make_micro_batches([a, b], 1, pad_id=2)) == 2


def test_completion_logprobs_and_entropy_by_hand():
    """The log-probability of each completion token at the row before it, and the entropy there."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    model = lambda ids: SimpleNamespace(logits=logits)  # noqa: E731
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "mask": torch.tensor([[0.0, 1.0, 1.0, 0.0]]),
             "targets": torch.tensor([[0, 3, 1, 0]])}
    logp, entropy = grpo.completion_logprobs(model, batch)
    ref = logits[0].log_softmax(-1)
    torch.testing.assert_close(logp, torch.stack([ref[1, 3], ref[2, 1]]))
    torch.testing.assert_close(entropy, -(ref.exp() * ref).sum(-1)[1:3])
    assert (entropy > 0).all()


def test_informative_groups_are_those_whose_rewards_differ():
    p = Problem("q", "1")
    group = lambda *rewards: [Sample(p, [0], [1], [0.0], "", False, reward=r) for r in rewards]  # noqa: E731
    assert not grpo.informative(group(0.5, 0.5, 0.5)) and grpo.informative(group(0.5, 0.5, 0.0))


# ---------------------------------------------------------------- rewards on crafted completions


@pytest.fixture(scope="module")
def problem():
    return get_task("default").problems(1, seed=0)[0]


def test_accuracy_is_binary_even_where_the_scorer_gives_partial_credit(problem):
    padded = problem.answer + "1"  # chain_sum's scorer gives part credit to an answer containing the right one
    assert 0 < problem.task.score(padded, problem) < 1
    assert accuracy_reward(r1zero_completion("x", padded), problem) == 0.0
    assert accuracy_reward(r1zero_completion("x", problem.answer), problem) == 1.0
    assert accuracy_reward(f" x </think> <answer> {problem.answer} </answer>", problem) == 1.0


def test_combined_reward_with_a_user_callable(problem):
    good = r1zero_completion("1 + 2 = 3.", problem.answer)
    reward = combine_rewards({"accuracy": 1.0, "format": 0.5, digit_share: 2.0})
    assert reward(good, problem) == pytest.approx(1.0 + 0.5 + 2.0 * digit_share(good, problem))
    assert reward.breakdown("no answer", problem)["accuracy"] == 0.0
    assert format_reward("no answer") == 0.0


def test_the_logged_loss_and_the_update_do_not_depend_on_the_micro_batch_size(base, tmp_path):
    """The step's objective is split over micro-batches for memory only: one step over all the
    completions at once and one in micro-batches of 2 log the same loss and make the same update."""
    # DAPO's token-level weights: at the first step (ratio 1, KL 0) the loss is -sum_i A_i |o_i| / sum |o|,
    # not 0 as GRPO's mean over sequences of mean-zero advantages would be
    args = ["max_steps=1", "eval_every=0", "save_every=0", "beta=0.04", "loss=dapo"]
    whole = weights(load_model(train(rl_config(base, tmp_path / "whole", *args, "micro_batch_size=8"))))
    split = weights(load_model(train(rl_config(base, tmp_path / "split", *args, "micro_batch_size=2"))))
    losses = [next(r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r) for d in ("whole", "split")]
    assert abs(losses[0]) > 1e-3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- real updates on a tiny model


@pytest.mark.parametrize("freeze_router", [False, True])
def test_one_rl_step_changes_the_parameters(base, tmp_path, freeze_router):
    cfg = rl_config(base, tmp_path, "max_steps=1", "eval_every=0", "save_every=0", "beta=0.0", "log_kl=false",
                    f"freeze_router={str(freeze_router).lower()}")
    before = weights(load_model(base))
    after = weights(load_model(train(cfg)))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    n_main = preset("tiny").num_hidden_layers
    # everything the policy forward touches moves; routed experts only if routed to, MTP never (not trained
    # in RL), the routers not when frozen
    router = [k for k in before if k.endswith("mlp.gate.weight") and not k.startswith(f"model.layers.{n_main}.")]
    trained = [k for k in before if "experts." not in k and "e_score_correction_bias" not in k
               and not k.startswith(f"model.layers.{n_main}.") and not (freeze_router and k in router)]
    assert router and set(trained) <= changed
    assert not any(k.startswith(f"model.layers.{n_main}.") for k in changed)
    assert not (freeze_router and set(router) & changed)
    record = next(r for r in read_metrics(tmp_path) if "grad_norm" in r)
    assert record["grad_norm"] > 0 and record["reward_std"] > 0


def test_rl_raises_a_reward_the_policy_can_find(base, tmp_path):
    """The whole loop learns: 20 GRPO steps on the share of digits take the sampled reward from
    about 1% to tens of percent. A reward credited to the wrong completion, an advantage with the
    wrong sign or a policy the engine stops sharing would each leave it flat or push it down."""
    cfg = rl_config(base, tmp_path, "max_steps=20", "lr=1e-2", "eval_every=0", "save_every=0", "beta=0.0",
                    "log_kl=false", "rewards.accuracy=0.0", "rewards.format=0.0")
    train(cfg)
    rewards = [r["reward"] for r in read_metrics(tmp_path) if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > 0.15 and last > 4 * first, rewards


def test_cli_run_writes_metrics_and_checkpoints_and_resumes_exactly(base, tmp_path):
    run_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    args = ["rl", "--config", str(TINY), f"init={base}", "rewards.digits=1.0", "max_steps=2"]
    assert cli.main(args + [f"out_dir={run_dir}"]) == 0
    records = read_metrics(run_dir)
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "reward_std", "acc", "format", "len", "clip_frac", "kl", "entropy", "rollout_s",
                "update_s", "loss", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in steps), key
    # the reference is the starting policy, a separate copy: KL 0 before the first update, > 0 after it
    assert abs(steps[0]["kl"]) < 1e-6 < steps[1]["kl"], [r["kl"] for r in steps]
    assert [r["step"] for r in records if "eval_pass@1" in r] == [0, 2]
    assert (run_dir / "checkpoint-2" / "config.json").is_file() and (run_dir / "latest").is_symlink()
    assert json.loads((run_dir / "run_config.json").read_text())["loss"] == "grpo"

    # the same run stopped after step 1 and resumed: same weights, same step-2 record
    assert cli.main(args + [f"out_dir={resumed_dir}", "max_steps=1"]) == 0
    assert cli.main(args + [f"out_dir={resumed_dir}", "--resume"]) == 0
    full, resumed = weights(load_model(run_dir / "checkpoint-2")), weights(load_model(resumed_dir / "checkpoint-2"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    timing = ("rollout_s", "reference_s", "update_s", "completions_per_s", "eval_s")
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert strip(read_metrics(resumed_dir)[-2]) == strip(records[-2])


class SeededJudge:
    """GRM.judge_many's shape: each completion gets a score drawn from the call's seed alone, so the
    rewards show which seed the judge was given."""

    def __init__(self, path, **_):
        pass

    def judge_many(self, items, k=1, seed=0):
        import random

        from nanoseek.grm import Judgment, Verdict

        rng = random.Random(seed)
        return [Verdict([score], 0, [Judgment("x", scores=[score])], [0], 1.0)
                for score in (rng.randint(1, 10) for _ in items)]


def test_a_resumed_run_judges_with_the_grm_as_an_uninterrupted_one(base, tmp_path, monkeypatch):
    """The GRM reward seeds each rollout's judgments by the count of batches it judged: that count is
    checkpointed, so a run resumed at step 1 scores step 2 as a run straight through does. (It
    restarted at 0: the resumed run judged step 2 with step 1's seed.)"""
    monkeypatch.setattr("nanoseek.grm.GRM", SeededJudge)
    args = ["max_steps=2", "eval_n=0", "save_every=1", "keep_checkpoints=0", "rewards={grm=1.0}", f"grm_model={base}"]
    train(load_run_config(GRPOConfig, TINY, [f"init={base}", f"out_dir={tmp_path / 'full'}", *args]))
    train(load_run_config(GRPOConfig, TINY, [f"init={base}", f"out_dir={tmp_path / 'resumed'}", *args]),
          resume=tmp_path / "full" / "checkpoint-1")
    rewards = {d: [r["reward_grm"] for r in read_metrics(tmp_path / d) if "reward_grm" in r] for d in ("full", "resumed")}
    assert rewards["resumed"] == rewards["full"][1:] and rewards["full"][0] != rewards["full"][1], rewards
    full, resumed = (weights(load_model(tmp_path / d / "checkpoint-2")) for d in ("full", "resumed"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_other_variants_run(base, tmp_path, loss_type):
    cfg = rl_config(base, tmp_path, f"loss={loss_type}", "max_steps=1", "eval_every=0", "save_every=0", "mu=2")
    train(cfg)
    updates = [r for r in read_metrics(tmp_path) if "grad_norm" in r]
    assert [r["step"] for r in updates] == [1, 2]  # mu=2: one rollout, two optimizer steps on it
    assert "reward" in updates[0] and "reward" not in updates[1]
    assert ("sampling_rounds" in updates[0]) == (loss_type == "dapo")


def test_dynamic_sampling_trains_on_a_full_batch_of_informative_groups(base, tmp_path, monkeypatch):
    """DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more prompts are
    sampled until the step has its prompts_per_step groups, no more. The rewards are set per round
    here: step 1's round 1 has one all-equal group and one informative, its round 2 two informative;
    step 2's round 1 two informative, so it samples no second round."""
    G = 4  # num_generations
    flat_groups = [{0}, set(), set()]  # per round sampled, the groups whose rewards are all equal
    rounds, updated = [], []
    score = grpo.score

    def scripted_score(samples, *args):
        score(samples, *args)
        flat = flat_groups[len(rounds)] if len(rounds) < len(flat_groups) else set()
        for i, s in enumerate(samples):
            s.reward = 0.0 if i // G in flat else (i % G) / G
        rounds.append(samples)

    def recording_prepare(batch, *args):
        updated.append(list(batch))
        return prepare(batch, *args)

    prepare = grpo.prepare_update
    monkeypatch.setattr(grpo, "score", scripted_score)
    monkeypatch.setattr(grpo, "prepare_update", recording_prepare)
    train(rl_config(base, tmp_path, "loss=dapo", "max_steps=2", "eval_n=0", "save_every=0", "log_kl=false",
                    "overlong_buffer=0", "max_sampling_rounds=3"))
    assert len(rounds) == 3 and len(updated) == 2
    # round 1's second group, then round 2's first: the batch is full, round 2's second is left out
    assert updated[0] == rounds[0][G: 2 * G] + rounds[1][:G]
    assert updated[1] == rounds[2]
    records = [(r["sampling_rounds"], r["groups_trained"], r["zero_std_groups"])
               for r in read_metrics(tmp_path) if "reward" in r]
    assert records == [(2, 2, 0.25), (1, 2, 0.0)]


def test_config_errors(base, tmp_path):
    with pytest.raises(ConfigError, match="init"):
        train(load_run_config(GRPOConfig, TINY, [f"out_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="seq_len"):
        train(rl_config(base, tmp_path, "seq_len=40"))


def test_completions_without_advantage_are_left_out_of_an_unchanged_update(base, tmp_path, monkeypatch):
    """With beta = 0 a completion whose advantage is 0 adds nothing to the loss or its gradient:
    training on the others only gives the parameters that training on every completion gives."""
    # half the prompts earn a constant 0 (all-equal groups, advantage 0), the rest a varying reward
    register_reward("some_digits", lambda c, p: digit_share(c, p) if len(p.question) % 2 else 0.0)
    args = ["max_steps=2", "eval_every=0", "save_every=0", "beta=0.0", "log_kl=false",
            "rewards.digits=0.0", "rewards.some_digits=1.0"]
    try:
        skipped = weights(load_model(train(rl_config(base, tmp_path / "skip", *args))))
        trained = [r["trained"] for r in read_metrics(tmp_path / "skip") if "trained" in r]
        monkeypatch.setattr(grpo, "samples_to_train", lambda batch, *args: batch)
        everything = weights(load_model(train(rl_config(base, tmp_path / "all", *args))))
    finally:
        REWARDS.pop("some_digits", None)
    assert all(0 < t < 1 for t in trained), trained
    for key in skipped:
        torch.testing.assert_close(skipped[key], everything[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_two_ranks_sample_and_update_as_one_process(base, tmp_path, fused_loss):
    """Under torchrun each rank samples its share of the step's prompts, each prompt seeded by its
    index in the step as one process seeds it, so 2 ranks make one process's update; and the
    rollout metrics cover both ranks' completions. (A rule reward on a random policy is 0
    everywhere: the overlong punishment is what varies here.) With fused_loss the head runs outside
    DDP's wrapped forward (completion_logprobs): its gradient must still be averaged over ranks."""
    import os
    import subprocess
    import sys

    args = [f"init={base}", "eval_every=0", "save_every=0", "overlong_buffer=12", "max_steps=2",
            f"fused_loss={str(fused_loss).lower()}"]
    grpo.train(load_run_config(GRPOConfig, TINY, [*args, f"out_dir={tmp_path / 'one'}"]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "nanoseek.cli", "rl", "--config", str(TINY), *args, f"out_dir={tmp_path / 'two'}"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    a, b = (load_model(tmp_path / run / "latest").state_dict() for run in ("one", "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    keys = ("reward", "reward_std", "len", "truncated", "zero_std_groups", "trained")
    one, two = ([{k: r[k] for k in keys} for r in read_metrics(tmp_path / run) if "reward" in r] for run in ("one", "two"))
    assert len(one) == 2 and two == [pytest.approx(r) for r in one]


def test_fsdp_is_refused_in_one_line(base, tmp_path):
    """The rollout engine runs on each rank's policy: FSDP's sharded one hung (the rank-0 eval) or failed
    its first forward under inference mode, with a traceback per rank."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "nanoseek.cli", "rl", "--config", str(TINY), f"init={base}", "parallel=fsdp",
                             f"out_dir={tmp_path}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers (each in a session of its own)
        proc.communicate()
        pytest.fail("rl with parallel=fsdp hung")
    assert proc.returncode != 0
    assert "RL under torchrun runs with parallel=ddp" in stderr
    assert "[rank0]: Traceback" not in stderr
