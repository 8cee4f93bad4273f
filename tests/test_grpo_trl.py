"""GRPO parity with the reference implementation: TRL's GRPOTrainer.

A tiny random Qwen2 (vocab 64, 2 layers, built and saved here: nothing is downloaded) is wrapped
in a real `trl.GRPOTrainer`. One real rollout (`_generate_and_score_completions`: sampling,
rewards, advantages, the reference model's log-probs) gives the batch; the trainer's own loss
(`compute_loss`) is then compared with nanoseek's on the same completions, scored by the same
model: `prepare_update` (group_advantages, sequence_weights, samples_to_train, the micro-batch)
and `policy_loss` (token_losses and the weighted sum), the functions `nanoseek rl` runs.
Checked per variant: the advantages, the scalar loss, and its gradient w.r.t. every parameter.

The mapping (nanoseek GRPOConfig -> trl.GRPOConfig):

    loss=grpo | dr_grpo | dapo       loss_type= the same name (TRL's bnpo has no nanoseek twin)
    scale_rewards=True | False       scale_rewards="group" | "none" (both: std + 1e-4, unbiased std)
    epsilon, epsilon_high            epsilon, epsilon_high (token-level clip)
    beta (k3 KL to the reference)    beta, use_bias_correction_kl=False
    num_generations, max_completion_length (Dr. GRPO's constant normaliser)   the same
    mu                               num_iterations
                                     importance_sampling_level="token", temperature=1.0

Deliberate differences (grpo.py's docstring) and the conditions that make both agree here:
- nanoseek scores the untempered policy, TRL divides the logits by the temperature: temperature=1.
- With mu = 1 TRL takes pi_old = pi_theta.detach() (ratio exactly 1), nanoseek the engine's
  log-probs: here nanoseek's old log-probs are the model's own, so the ratio is 1 up to rounding.
- With mu > 1 (and for the KL) the policy has moved since the rollout: that is emulated by
  shifting the rollout's old (and reference) log-probs by a fixed noise, fed to both sides, large
  enough that the clip binds in both directions. The completions are also cut one token short of
  max_completion_length, so that Dr. GRPO's constant differs from the longest completion.
- nanoseek's KL term is the plain k3 estimate of DeepSeekMath / R1. TRL (>= 1.x) multiplies it by
  the ratio rho_t by default (use_bias_correction_kl=True, DeepSeek-V3.2's unbiased estimator):
  that changes the loss when mu > 1 (grpo, beta 0.04, here: 0.027705 against 0.027507) and the
  KL gradient even on-policy (rho_t = 1 but differentiable). The test turns it off.
- fp32 on both sides: TRL's GRPOConfig defaults to bf16 autocast (nanoseek's trainer autocasts too,
  on a GPU), and here bf16 moves the log-probs by up to ~5e-4.
- One optimizer step is one micro-batch here (TRL: gradient_accumulation_steps=1,
  steps_per_generation=1), so TRL's per-micro-batch normalisers are the whole batch's.
"""

from types import SimpleNamespace

import pytest
import torch

# written against TRL 1.16's GRPOTrainer: its private rollout and log-prob methods and use_bias_correction_kl
trl = pytest.importorskip("trl", minversion="1.16")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' renames, inside TRL
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from nanoseek.train import grpo  # noqa: E402
from nanoseek.train.distributed import DistEnv  # noqa: E402

PROMPTS = ["w1 w2 w3", "w4 w5 w6", "w7 w8 w9"]  # three tokens each: no left padding on TRL's side
G = 3
REWARDS = [1.0, 0.0, 0.5,  # a mixed group (0.5: its mean, advantage 0)
           0.0, 0.0, 0.0,  # all equal: advantage 0 (nanoseek then leaves it out of the update when beta = 0)
           0.2, 1.0, 1.0]
MAX_LEN = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Qwen2 and a word-level tokenizer, saved where TRL can load them offline
    (it builds the reference model from the policy's path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("trl") / "tiny"
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def trl_trainer(tiny, tmp_path, loss, beta, epsilon_high, scale, mu):
    path, tokenizer = tiny

    def reward(completions, **kwargs):  # the batch's rewards, in rollout order
        return list(REWARDS[: len(completions)])

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no", seed=0,
        bf16=False, per_device_train_batch_size=len(REWARDS), gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=G, max_completion_length=MAX_LEN, temperature=1.0,
        loss_type=loss, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        scale_rewards="group" if scale else "none", num_iterations=mu, importance_sampling_level="token",
        use_bias_correction_kl=False)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    return trainer


def shifted(logps: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """logps + a fixed noise in [-0.6, 0.6] on the completion tokens: a policy that has moved."""
    noise = torch.rand(logps.shape, generator=torch.Generator().manual_seed(seed)) * 1.2 - 0.6
    return logps + noise * mask


VARIANTS = [
    # loss, beta, epsilon_high, scale_rewards, mu
    ("grpo", 0.04, 0.2, True, 2),
    ("grpo", 0.04, 0.2, True, 1),  # on-policy: ratio 1, only the advantage and the KL act
    ("dr_grpo", 0.0, 0.2, False, 2),
    ("dr_grpo", 0.04, 0.2, False, 2),
    ("dapo", 0.0, 0.28, True, 2),
    ("dapo", 0.04, 0.28, True, 2),
]


@pytest.mark.parametrize("loss, beta, epsilon_high, scale, mu", VARIANTS)
def test_loss_and_gradient_match_trl(tiny, tmp_path, loss, beta, epsilon_high, scale, mu):
    torch.set_num_threads(1)
    trainer = trl_trainer(tiny, tmp_path, loss, beta, epsilon_high, scale, mu)
    model = trainer.model
    model.train()

    # ---- one real TRL rollout: completions, rewards -> advantages, reference log-probs
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    # every completion loses its last slot, so that none is max_completion_length long: Dr. GRPO's constant
    # normaliser then differs from the longest completion's length (the tokens before are scored as they were)
    mask = inputs["completion_mask"]
    mask[:, MAX_LEN - 1:] = 0
    inputs["num_items_in_batch"] = mask.sum()  # DAPO's normaliser: the batch's completion tokens
    lengths = mask.sum(1).int().tolist()
    assert len(set(lengths)) > 1 and max(lengths) < MAX_LEN, lengths
    with torch.no_grad():
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], mask], 1)
        current, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention, mask.size(1))
    if mu > 1:  # the policy has moved since the rollout (mu - 1 optimizer steps on it)
        assert "old_per_token_logps" in inputs
        inputs["old_per_token_logps"] = old = shifted(inputs["old_per_token_logps"], mask, seed=1)
    else:  # TRL uses the current log-probs, detached; so does nanoseek's old policy here
        assert "old_per_token_logps" not in inputs
        old = current
    if beta:
        inputs["ref_per_token_logps"] = ref = shifted(inputs["ref_per_token_logps"], mask, seed=2)

    # ---- the same batch as nanoseek Samples
    problem = SimpleNamespace()
    samples = []
    for i, n in enumerate(lengths):
        prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
        s = grpo.Sample(problem, prompt, inputs["completion_ids"][i, :n].tolist(), old[i, :n].tolist(), "",
                        truncated=False, reward=REWARDS[i])
        if beta:
            s.ref_logprobs = ref[i, :n].tolist()
        samples.append(s)
    cfg = grpo.GRPOConfig(loss=loss, beta=beta, epsilon=0.2, epsilon_high=epsilon_high, scale_rewards=scale,
                          mu=mu, num_generations=G, batch_size=len(REWARDS), micro_batch_size=0,
                          max_completion_length=MAX_LEN)
    trained, micro_batches, _ = grpo.prepare_update(samples, cfg, DistEnv(), SimpleNamespace(fsdp=False),
                                                    reference=None, pad_id=0)
    assert len(micro_batches) == 1
    # without a KL term the zero-advantage completions (the all-equal group, and the 0.5 at its group's mean)
    # are left out of nanoseek's forward; TRL scores them all, and the loss must not differ
    assert len(trained) == (len(samples) if beta else len(samples) - G - 1)

    # ---- advantages
    assert [s.advantage for s in samples] == pytest.approx(inputs["advantages"].tolist(), rel=1e-6, abs=1e-7)
    assert grpo.group_advantages(torch.tensor(REWARDS), G, scale).tolist() == pytest.approx(
        inputs["advantages"].tolist(), rel=1e-6, abs=1e-7)

    if mu > 1:  # the clip binds in both directions (a token it stops from going further each way)
        ratio, adv = (current - old).exp(), inputs["advantages"].unsqueeze(1)
        assert ((ratio < 0.8) & (adv < 0) & mask.bool()).any()
        assert ((ratio > 1 + epsilon_high) & (adv > 0) & mask.bool()).any()

    # ---- the loss and its gradient
    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    nano_loss, metrics = grpo.policy_loss(cfg, head=None, scale=1.0)(model, micro_batches[0])
    nano_loss.backward()
    if beta:
        assert metrics["kl"] > 0

    assert nano_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in trl_grads.values())
