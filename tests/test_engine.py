"""The inference engine end to end on tiny random models: exactness against plain forwards and
transformers, batching, preemption, prefix caching, sampling, speculation, streaming, errors, and the
generate and chat CLIs."""

import json
import os
import re

import pytest
import torch
from decoding_checks import reference_greedy
from eager_graphs import eager_record

from nanoseek import LLM, SamplingParams
from nanoseek.config import preset
from nanoseek.errors import NanoseekError
from nanoseek.model.transformer import Transformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 200, 300, 400, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5], [42] * 9]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, block_size=4)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_matches_full_forward_argmax(model, llm):
    outs = llm.generate(PROMPTS, GREEDY)
    assert tokens(outs) == [reference_greedy(model, p, 10) for p in PROMPTS]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert outs[1].prompt_token_ids == PROMPTS[1]


def test_batch_equals_each_prompt_alone(model):
    batched = tokens(LLM(model, block_size=4).generate(PROMPTS, GREEDY))
    alone = [tokens(LLM(model, block_size=4).generate(p, GREEDY))[0] for p in PROMPTS]
    assert batched == alone


def test_preemption_does_not_change_outputs(model, llm):
    expected = tokens(llm.generate(PROMPTS, GREEDY))
    small = LLM(model, block_size=4, num_cache_blocks=9, enable_prefix_caching=False)
    assert tokens(small.generate(PROMPTS, GREEDY)) == expected
    assert small.stats()["num_preemptions"] > 0


def test_prefix_cache_hits_are_reported_and_exact(model):
    llm = LLM(model, block_size=4)
    base = list(range(20, 33))  # 13 tokens: 3 full blocks
    first = llm.generate(base + [1], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate(base + [2, 3], GREEDY)[0]
    assert second.num_cached_tokens == 12
    fresh = LLM(model, block_size=4, enable_prefix_caching=False).generate(base + [2, 3], GREEDY)[0]
    assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert llm.stats()["prefix_cache_hit_tokens"] == 12
    # generated tokens fill blocks too: continuing an earlier output hits beyond the prompt
    third = llm.generate(base + [1] + first.outputs[0].token_ids[:6], GREEDY)[0]
    assert third.num_cached_tokens == 16


def test_n_samples_share_the_prompt_blocks(model):
    llm = LLM(model, block_size=4)
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    out = llm.generate(list(range(10, 23)), params)[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert llm.stats()["prefix_cache_hit_tokens"] == 2 * 12  # samples 1 and 2 reuse sample 0's blocks
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_seeded_sampling_is_reproducible_across_batches(model):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    alone = tokens(LLM(model, block_size=4).generate(PROMPTS[0], params))[0]
    others = [SamplingParams(temperature=0.8, seed=i, max_tokens=5, ignore_eos=True) for i in range(3)]
    mixed = LLM(model, block_size=4).generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]],
                                              [others[0], params, others[1], others[2]])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=124, max_tokens=12, ignore_eos=True)
    assert tokens(LLM(model, block_size=4).generate(PROMPTS[0], other_seed))[0] != alone


def test_truncation_to_one_token_is_greedy(model, llm):
    expected = tokens(llm.generate(PROMPTS, GREEDY))
    for params in (SamplingParams(temperature=1.0, top_k=1, seed=0, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=1.0, min_p=1.0, seed=0, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=1.0, top_p=1e-6, seed=0, max_tokens=10, ignore_eos=True)):
        assert tokens(llm.generate(PROMPTS, params)) == expected


def test_presence_penalty_forbids_repeats(llm):
    # the tiny model's logits are small, so a full-strength penalty dominates
    params = SamplingParams(temperature=0, presence_penalty=2.0, max_tokens=40, ignore_eos=True)
    out = llm.generate([42] * 3, params)[0].outputs[0].token_ids
    assert len(set(out)) == len(out)
    params = SamplingParams(temperature=0, repetition_penalty=1e6, max_tokens=30, ignore_eos=True)
    out = llm.generate([42] * 3, params)[0].outputs[0].token_ids
    assert 42 not in out and len(set(out)) == len(out)


def test_a_tiny_temperature_is_greedy(model, llm):
    """logits / 1e-39 overflow to inf and softmax to NaN (every token was id 0): below 1e-5, argmax."""
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=1e-39, max_tokens=10, seed=0))[0].outputs[0]
    assert out.token_ids == reference_greedy(model, PROMPTS[0], 10)


def test_penalties_apply_in_vllms_order():
    """Repetition first (over prompt and output), then presence / frequency (over the output)."""
    import types

    from nanoseek.inference.sampling import Sampler

    params = SamplingParams(repetition_penalty=2.0, presence_penalty=2.0, frequency_penalty=0.5)
    seq = types.SimpleNamespace(params=params, output_ids=[0, 0], token_ids=[2, 0, 0])  # prompt [2]
    logits = torch.tensor([3.0, -1.0, 0.5, 3.0])
    Sampler(vocab_size=4)._apply_penalties(logits, seq)
    # token 0: 3 / 2 = 1.5, then - 2 (presence) - 0.5 * 2 (frequency) = -1.5 (the other order: 0 x 2 = 0);
    # token 2 (in the prompt only): 0.5 / 2
    assert logits.tolist() == [-1.5, -1.0, 0.25, 3.0]


def test_sampler_truncation_and_per_row_temperature_by_hand():
    """Sampler.probs against hand-computed distributions, rows of one batch at different settings:
    each row keeps its own temperature, top-k, top-p (the smallest prefix reaching top_p) and min-p
    (relative to the likeliest token), then renormalises; the vocabulary is not in probability order."""
    from nanoseek.inference.sampling import Sampler

    order = [2, 0, 3, 1]  # token ids from the likeliest down
    p = torch.tensor([0.3, 0.05, 0.5, 0.15])
    logits = p.log().expand(5, 4)
    rows = [SamplingParams(temperature=1.0, top_k=2),  # 0.5, 0.3 kept
            SamplingParams(temperature=1.0, top_p=0.7),  # mass before 0.3 is 0.5 < 0.7: kept; before 0.15: 0.8
            SamplingParams(temperature=1.0, min_p=0.25),  # below 0.25 * 0.5 = 0.125 dropped: 0.05
            SamplingParams(temperature=0.5),  # p^2, renormalised
            SamplingParams(temperature=2.0, top_k=3)]  # sqrt(p) over the top three
    probs = Sampler(vocab_size=4).probs(logits, rows)

    def keep(q, n):  # q restricted to the n likeliest tokens, renormalised
        kept = torch.zeros(4).index_copy(0, torch.tensor(order[:n]), q[order[:n]])
        return kept / kept.sum()

    want = torch.stack([keep(p, 2), keep(p, 2), keep(p, 3), keep(p ** 2, 4), keep(p.sqrt(), 3)])
    torch.testing.assert_close(probs, want)


def test_stop_token_ids_max_tokens_and_logprobs(model, llm):
    expected = reference_greedy(model, PROMPTS[0], 10)
    stop_at = expected[4]
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at], logprobs=3)
    out = llm.generate(PROMPTS[0], params)[0].outputs[0]
    cut = expected.index(stop_at) + 1
    assert out.token_ids == expected[:cut] and out.finish_reason == "stop"
    assert len(out.logprobs) == cut
    for record, token in zip(out.logprobs, out.token_ids):
        assert record["token_id"] == token and len(record["top_logprobs"]) == 3
        assert record["top_logprobs"][0][0] == token  # greedy: the chosen token is the most likely
        assert record["logprob"] == pytest.approx(record["top_logprobs"][0][1])
    assert out.cumulative_logprob == pytest.approx(sum(r["logprob"] for r in out.logprobs))
    # eos stops unless ignored
    eos_model_llm = LLM(model, block_size=4)
    eos_model_llm.eos_ids = {expected[2]}
    out = eos_model_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert out.token_ids == expected[: expected.index(expected[2]) + 1] and out.finish_reason == "stop"


def test_max_model_len_finishes_with_length(model):
    llm = LLM(model, block_size=4, max_model_len=12)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 12 - len(PROMPTS[0]) and out.finish_reason == "length"


def agreeing_mtp_model(context_scale=0.02):
    """A model whose MTP module drafts what the main model will say next: the main layers'
    attention and FFN outputs are scaled by context_scale, so for small scales the next token
    depends (almost) only on the current one, and the MTP block passes the embedding of t_{i+1}
    through to the shared head. Larger scales make the context matter and drafts fail more often."""
    torch.manual_seed(1)
    m = Transformer(preset("tiny"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(context_scale if ".layers.0." in name or ".layers.1." in name else 0.0)
        mtp = m.mtp_layers[0]
        D = m.config.hidden_size
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = torch.eye(D)
    return m.eval()


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculation_equals_plain_greedy(model, llm, k):
    expected = tokens(llm.generate(PROMPTS, GREEDY))
    spec = LLM(model, block_size=4, speculative_mtp=k, speculative_max_batch=8)
    assert tokens(spec.generate(PROMPTS, GREEDY)) == expected
    assert spec.stats()["spec_draft_tokens"] > 0


@pytest.mark.parametrize("context_scale, min_rate, max_rate", [(0.02, 0.9, 1.0), (0.5, 0.2, 0.9)])
def test_mtp_speculation_accepts_agreeing_drafts(context_scale, min_rate, max_rate):
    m = agreeing_mtp_model(context_scale)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = tokens(LLM(m, block_size=4).generate(PROMPTS, params))
    assert expected == [reference_greedy(m, p, 24) for p in PROMPTS]
    spec = LLM(m, block_size=4, speculative_mtp=3, speculative_max_batch=8)
    assert tokens(spec.generate(PROMPTS, params)) == expected
    stats = spec.stats()
    assert min_rate <= stats["spec_acceptance_rate"] <= max_rate
    # fewer decode steps than tokens: several tokens per step
    assert stats["spec_draft_tokens"] / 3 < stats["generation_tokens"] - len(PROMPTS)


def test_speculation_with_mixed_batch(model):
    """Greedy rows are exactly plain decoding; rows with penalties ride along without drafts (the
    same samples as plain decoding); sampled rows speculate."""
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    penalized = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, presence_penalty=0.5)
    params = [GREEDY, penalized, GREEDY, sampled]
    plain = tokens(LLM(model, block_size=4).generate(PROMPTS, params))
    spec = LLM(model, block_size=4, speculative_mtp=2, speculative_max_batch=8)
    out = tokens(spec.generate(PROMPTS, params))
    assert out[:3] == plain[:3]
    assert len(out[3]) == 10
    assert spec.stats()["spec_draft_tokens"] > 0


def test_speculative_accept_keeps_the_target_distribution():
    """Rejection sampling: whatever the draft distribution, the emitted token follows the target,
    and drafts are kept with probability sum_x min(p(x), q(x)) = 1 - TV(p, q)."""
    from nanoseek.inference.sampling import draw, speculative_accept

    n, V = 20000, 5
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.3, 0.3, 0.2]])  # target at positions 0, 1
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])  # the draft's at position 0
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    draft_ids = draw(q.expand(n, V), gens).unsqueeze(1)  # (n, 1)
    kept, extra = speculative_accept(p.expand(n, 2, V), q.expand(n, 1, V), draft_ids, gens)
    kept = torch.tensor(kept)
    first = torch.where(kept == 1, draft_ids[:, 0], torch.tensor(extra))
    freq = torch.bincount(first, minlength=V).float() / n
    assert (freq - p[0]).abs().sum() / 2 < 0.015  # TV to the target; a draft taken as is: 0.5
    assert abs(kept.float().mean() - torch.minimum(p[0], q[0]).sum()) < 0.015
    after = torch.tensor(extra)[kept == 1]  # the bonus token after a kept draft follows p_1
    assert (torch.bincount(after, minlength=V).float() / len(after) - p[1]).abs().sum() / 2 < 0.03


def test_speculative_accept_of_a_batch_is_that_of_each_row_alone():
    """A row's acceptances and token depend on its own generator only, not on its neighbours (a
    one-row call takes a shortcut, which must draw the same numbers)."""
    from nanoseek.inference.sampling import speculative_accept

    torch.manual_seed(0)
    b, k, V = 6, 3, 7
    target = torch.rand(b, k + 1, V).softmax(-1)
    draft = torch.rand(b, k, V).softmax(-1)
    draft_ids = torch.randint(V, (b, k))
    draft_ids[0] = target[0, :k].argmax(-1)  # some rows keep drafts
    batch = speculative_accept(target, draft, draft_ids, [torch.Generator().manual_seed(i) for i in range(b)])
    alone = [speculative_accept(target[i: i + 1], draft[i: i + 1], draft_ids[i: i + 1],
                                [torch.Generator().manual_seed(i)]) for i in range(b)]
    assert batch == ([a for (a,), _ in alone], [t for _, (t,) in alone])


def test_speculative_sampling_matches_the_model_distribution(model):
    """Three sampled tokens per prompt with MTP drafts (k=2): their joint frequency over many
    samples equals the model's own distribution, computed exactly with full forwards."""
    prompt, top_k, n = [5, 6, 7, 8], 3, 3000
    params = SamplingParams(temperature=1.5, top_k=top_k, n=n, seed=0, max_tokens=3, ignore_eos=True)
    spec = LLM(model, block_size=4, speculative_mtp=2, speculative_max_batch=512, max_num_seqs=512)
    out = spec.generate(prompt, params)[0].outputs
    assert spec.stats()["spec_accepted_tokens"] > 0

    def next_probs(prefixes):  # the sampling distribution after each prefix: (len, V)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(t) for t in prefixes])).logits[:, -1] / 1.5
        kth = logits.topk(top_k).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    exact = {(): 1.0}
    for _ in range(3):
        prefixes = list(exact)
        probs = next_probs(prefixes)
        exact = {t + (int(x),): exact[t] * float(probs[i, x]) for i, t in enumerate(prefixes)
                 for x in probs[i].nonzero().flatten()}
    seen = {}
    for o in out:
        seen[tuple(o.token_ids)] = seen.get(tuple(o.token_ids), 0) + 1 / n
    assert set(seen) <= set(exact)
    tv = sum(abs(seen.get(t, 0) - p) for t, p in exact.items()) / 2
    assert tv < 0.06, tv  # 27 outcomes, 3000 samples: sampling noise alone gives about 0.03


def test_speculation_turns_off_above_its_batch_size_and_catches_up():
    """Above speculative_max_batch a decode step is plain; when the batch shrinks again the MTP
    cache is caught up over the positions decoded meanwhile. Greedy output never changes."""
    m = agreeing_mtp_model(0.5)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = [long, short, short, short]  # 4 sequences for 3 steps, then one alone
    expected = tokens(LLM(m, block_size=4).generate(PROMPTS, params))
    spec = LLM(m, block_size=4, speculative_mtp=2, speculative_max_batch=1)
    assert tokens(spec.generate(PROMPTS, params)) == expected
    assert spec.stats()["spec_draft_tokens"] > 0 and spec.stats()["spec_acceptance_rate"] > 0.2
    off = LLM(m, block_size=4, speculative_mtp=2, speculative_max_batch=1)
    off.generate(PROMPTS, short)  # never alone: never speculates
    assert off.stats()["spec_draft_tokens"] == 0
    assert LLM(m, speculative_mtp=2).speculative_max_batch == 1  # the CPU default: measured


def test_speculation_survives_preemption_and_prefix_hits():
    m = agreeing_mtp_model(0.5)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = PROMPTS + [PROMPTS[2] + [9, 9]]
    expected = tokens(LLM(m, block_size=4).generate(prompts, params))
    small = LLM(m, block_size=4, num_cache_blocks=12, speculative_mtp=2, speculative_max_batch=8)
    assert tokens(small.generate(prompts, params)) == expected
    assert small.stats()["num_preemptions"] > 0


def test_matches_transformers_generate(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    from nanoseek.checkpoint import save_model

    torch.manual_seed(3)
    m = Transformer(preset("tiny", num_nextn_predict_layers=0)).eval()
    save_model(m, tmp_path / "ckpt")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    hf.generation_config.eos_token_id = None
    prompt = [7, 8, 9, 10, 11, 12, 13]
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    llm = LLM(str(tmp_path / "ckpt"), block_size=4)
    assert llm.tokenizer is None
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == hf_ids[0, len(prompt):].tolist()


def test_step_api_and_stream(model, llm):
    expected = reference_greedy(model, PROMPTS[0], 10)
    seen = [out.outputs[0].token_ids for out in llm.stream(PROMPTS[0], GREEDY)]
    assert seen == [expected[: i + 1] for i in range(10)]
    rid = llm.add_request(PROMPTS[1], GREEDY, request_id="mine")
    assert rid == "mine" and llm.has_unfinished_requests()
    last = None
    while llm.has_unfinished_requests():
        for out in llm.step():
            last = out
    assert last.finished and last.request_id == "mine"


def test_abort_frees_blocks(llm):
    rid = llm.add_request(PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    llm.step()
    assert llm.stats()["cache_usage"] > 0
    llm.abort_request(rid)
    assert llm.stats()["cache_usage"] == 0 and not llm.has_unfinished_requests()
    llm.abort_request("no-such-request")


def test_training_mode_model_is_left_untouched(model):
    model.train()
    try:
        counts = [m.tokens_per_expert.clone() for m in model.modules() if hasattr(m, "tokens_per_expert")]
        LLM(model, block_size=4).generate(PROMPTS[0], GREEDY)
        assert model.training
        after = [m.tokens_per_expert for m in model.modules() if hasattr(m, "tokens_per_expert")]
        assert all(torch.equal(a, b) for a, b in zip(counts, after))
    finally:
        model.eval()


def test_generate_switches_a_training_model_to_eval_once(model, monkeypatch):
    """Switching modes walks every module (as long as a decode step of a small model): generate()
    switches once for its whole loop, and step() callers get the model back in training mode too."""
    model.train()
    switches = []
    real_train = model.train
    monkeypatch.setattr(model, "train", lambda mode=True: switches.append(mode) or real_train(mode))
    try:
        llm = LLM(model, block_size=4)
        llm.generate(PROMPTS, GREEDY)  # a prefill and 9 decode steps
        assert switches == [False, True] and model.training
        llm.add_request(PROMPTS[0], GREEDY)
        llm.step()
        assert model.training
    finally:
        monkeypatch.undo()
        model.eval()


@pytest.mark.parametrize("prompt, params, message", [
    ([], GREEDY, "empty prompt"),
    ([1] * 600, GREEDY, "prompt has 600 tokens"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(top_p=1.5), "top_p"),
    ([1, 2], SamplingParams(stop=3), "stop"),
    ([1, 2], SamplingParams(temperature=-1), "temperature"),
    ([1, 2], SamplingParams(temperature=float("inf")), "temperature=inf: must be a finite"),  # was uniform noise
    ([1, 2], SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
    ([1, 2], SamplingParams(logprobs=600), "logprobs"),  # topk past the vocabulary broke the engine for good
    ([1, 999], GREEDY, "token ids"),
    ("text", GREEDY, "no tokenizer"),
])
def test_bad_input_raises_without_disturbing_others(model, llm, prompt, params, message):
    expected = reference_greedy(model, PROMPTS[0], 10)
    rid = llm.add_request(PROMPTS[0], GREEDY)
    llm.step()
    with pytest.raises(NanoseekError, match=message):
        llm.add_request(prompt, params)
    with pytest.raises(NanoseekError, match=message):
        llm.generate([PROMPTS[1], prompt], params)
    outs = {}
    while llm.has_unfinished_requests():
        outs.update({o.request_id: o for o in llm.step()})
    assert list(outs) == [rid] and outs[rid].outputs[0].token_ids == expected


def test_speculation_needs_mtp_modules():
    m = Transformer(preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(NanoseekError, match="MTP"):
        LLM(m, speculative_mtp=2)


def test_negative_speculation_is_not_blamed_on_the_model():
    """speculative_mtp=-1 on a model with an MTP module said it "needs a model with MTP modules"."""
    with pytest.raises(NanoseekError, match="speculative_mtp=-1: draft a positive number of tokens"):
        LLM(Transformer(preset("tiny")), speculative_mtp=-1)


# ------------------------------------------------------------------ with a tokenizer


@pytest.fixture(scope="module")
def text_llm():
    from nanoseek.tokenizer import train_tokenizer

    texts = ["the cat sat on the mat. the dog ate the bone. stop here please."] * 30
    tok = train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=tok.vocab_size)).eval()
    return LLM(m, tok, block_size=4)


def test_text_prompts_and_stop_strings(text_llm):
    tok = text_llm.tokenizer
    out = text_llm.generate("the cat", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.prompt == "the cat" and out.prompt_token_ids[0] == tok.bos_id
    full = out.outputs[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    # pick a stop string that occurs inside the generated text
    text = full.text
    assert len(text) >= 3
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    out = text_llm.generate("the cat", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                     stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert full.token_ids[: len(out.token_ids)] == out.token_ids
    # streamed text only ever grows, and ends where generate ends
    texts = [o.outputs[0].text for o in text_llm.stream("the cat", SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=stop))]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == text[:cut]


def test_streaming_decodes_only_the_new_tokens(text_llm, monkeypatch):
    """Each step decodes a sequence's new tokens (with a few tokens of context, more while a
    multi-byte character is incomplete), not its whole output again (40 * 41 / 2 = 820 token
    decodes over 40 tokens); and the text, random bytes included, is the whole decode's."""
    tok = text_llm.tokenizer
    decoded = []
    real_decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: decoded.append(len(ids)) or real_decode(ids, **kw))
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    outs = list(text_llm.stream("the cat", params))
    final = outs[-1].outputs[0]
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert final.text == real_decode(final.token_ids, skip_special_tokens=True)
    assert len(final.token_ids) == 40 and sum(decoded) < 820 / 2


def test_chat_template_prompt_gets_no_second_bos(text_llm):
    tok = text_llm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "the dog"}])
    out = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.prompt_token_ids == tok.encode(prompt)


def test_a_prompt_far_past_the_context_is_refused_from_a_prefix(text_llm, monkeypatch):
    """A 10 MB prompt took the server 7 s to tokenize (on its event loop) only to be refused; a
    text longer than PREFIX_CHARS_PER_TOKEN characters per context token is measured on that
    prefix first. A shorter one is tokenized whole, as before."""
    from nanoseek.errors import ContextLengthError
    from nanoseek.inference.engine import PREFIX_CHARS_PER_TOKEN

    tok = text_llm.tokenizer
    seen, encode = [], tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: seen.append(len(text)) or encode(text, **kw))
    cut = PREFIX_CHARS_PER_TOKEN * text_llm.max_model_len
    huge = "the cat sat on the mat. " * (cut // 4)
    for add_bos in (True, False):
        with pytest.raises(ContextLengthError, match=f"at least .* tokens \\(its first {cut:,} of {len(huge):,}"):
            text_llm.prompt_ids(huge, add_bos)
    assert seen == [cut, cut]
    with pytest.raises(ContextLengthError, match=r"prompt has \d+ tokens, but"):  # under the cut: counted whole
        text_llm.prompt_ids(huge[:cut - 1])
    assert seen[-1] == cut - 1


# ---------------------------------------------------------------- the generate and chat CLIs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with a tokenizer, as `nanoseek generate` / `chat` load it."""
    from nanoseek.checkpoint import save_model
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog. 12 + 3 = 15."] * 20, vocab_size=300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    save_model(Transformer(preset("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)), path, tokenizer=tok)
    return path


def test_generate_cli_prints_each_prompts_completion_the_same_as_the_api(checkpoint, capsys):
    from nanoseek.cli import main

    args = ["generate", "--model", str(checkpoint), "--prompt", "the fox", "--prompt", "12 +", "--max-tokens", "6",
            "--temperature", "0"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = LLM(checkpoint).generate(["the fox", "12 +"], SamplingParams(temperature=0, max_tokens=6))
    assert lines == [f"[{i}] {o.prompt}{o.outputs[0].text}  ({o.outputs[0].finish_reason})"
                     for i, o in enumerate(expected)]
    assert main(args[:5] + ["--max-tokens", "6", "--temperature", "0", "--stream"]) == 0
    assert capsys.readouterr().out == expected[0].outputs[0].text + "\n"


def test_generate_cli_constrains_the_output_with_regex_and_json_schema(checkpoint, capsys, tmp_path):
    """--regex and --json-schema (its text or @FILE) reach SamplingParams; a missing file, bad JSON
    and a schema outlines-core cannot enforce are one line each, before or instead of a traceback."""
    from nanoseek.cli import main

    assert main(["generate", "--model", str(checkpoint), "--prompt", "the fox", "--max-tokens", "8",
                 "--temperature", "0", "--regex", "[0-9]{3}"]) == 0
    assert re.fullmatch(r"\[0\] the fox[0-9]{3}  \(stop\)", capsys.readouterr().out.strip())
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}')
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the fox", "--max-tokens", "40",
                 "--temperature", "0", "--json-schema", f"@{schema}"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("[0] the fox{") and out.endswith("(stop)")
    assert isinstance(json.loads(out[len("[0] the fox"):-len("  (stop)")])["n"], int)
    for flags, message in ((["--json-schema", "@no/such.json"], "no such file"),
                           (["--json-schema", "{not json"], "is not valid JSON"),
                           (["--json-schema", '{"type": "nosuch"}'], "cannot be enforced")):
        assert main(["generate", "--model", str(checkpoint), "--prompt", "x", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_chat_cli_replies_through_the_chat_template_resets_and_checks_flags_first(checkpoint, capsys, monkeypatch):
    import io

    from nanoseek.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhello\n/exit\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    replies = [part for part in out.split("> ") if part.strip()]  # input() writes each "> " prompt
    assert len(replies) == 2 and replies[0] == replies[1]  # after /reset, the same first turn: the same reply
    llm = LLM(checkpoint)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert replies[0] == llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text + "\n"
    # a bad sampling flag fails before the (here missing) model is loaded
    assert main(["chat", "--model", "no/such/dir", "--max-tokens", "0"]) == 2
    assert "max_tokens=0" in capsys.readouterr().err
    assert main(["generate", "--model", "no/such/dir", "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature=-1" in capsys.readouterr().err


def test_max_model_len_flag_rejects_non_positive_values_and_says_when_it_is_clamped(checkpoint, model, capsys):
    """-5 used to fail naming cache_memory_bytes / num_cache_blocks, 0 to mean the model's default,
    and a value past the model's positions to be clamped without a word."""
    from nanoseek.cli import main

    for bad in ("-5", "0", "many"):
        for command in (["generate", "--prompt", "x"], ["chat"], ["serve"]):
            with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit 2, before the model loads
                main([*command, "--model", str(checkpoint), "--max-model-len", bad])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and "--max-model-len" in err and "positive number of tokens" in err
            assert "cache" not in err and "Traceback" not in err
    with pytest.raises(NanoseekError, match="max_model_len=0 must be a positive"):  # Python callers too
        LLM(model, max_model_len=0)

    assert main(["generate", "--model", str(checkpoint), "--prompt", "the", "--max-tokens", "2",
                 "--max-model-len", "100000"]) == 0
    assert ("nanoseek generate: --max-model-len 100000 is more than the model's 512 positions "
            "(max_position_embeddings); using 512") in capsys.readouterr().err
    # --max-tokens past the context: the completion ends at the context's end, and says so
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the", "--max-tokens", "100",
                 "--max-model-len", "20"]) == 0
    out, err = capsys.readouterr()
    assert "(length)" in out and "the context (20 tokens, prompt included) ended a completion before --max-tokens 100" in err


def test_speculation_and_eager_flags_reach_the_engine_and_say_when_speculation_is_off(checkpoint, capsys,
                                                                                    monkeypatch):
    """--speculative-max-batch and --enforce-eager (generate, chat, serve; eval has --enforce-eager)
    are the LLM's fields; a negative batch is a usage error naming the flag; and where the device's
    default turns speculation off (a GPU replaying graphs: 0), asking for --speculative-mtp says so."""
    import argparse

    from nanoseek.cli import main
    from nanoseek.inference import engine as engine_module
    from nanoseek.inference.generate import add_arguments, build_engine

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(checkpoint), "--prompt", "x", "--speculative-mtp", "1",
                              "--speculative-max-batch", "4", "--enforce-eager"])
    args.command = "generate"
    llm = build_engine(args)
    assert (llm.speculative_mtp, llm.speculative_max_batch, llm.runner.cuda_graphs) == (1, 4, False)
    assert "off by default" not in capsys.readouterr().err
    for command, flag in ((["generate", "--prompt", "x"], "--speculative-max-batch"), (["chat"], "--speculative-max-batch"),
                          (["serve"], "--speculative-max-batch"), (["serve"], "--max-waiting"),
                          (["eval"], "--threads"), (["eval"], "--show")):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--model", str(checkpoint), flag, "-1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"{flag}: '-1' is not" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(checkpoint), "--max-num-seqs", "0"])
    assert "--max-num-seqs: '0' is not a number of sequences: 1 or more" in capsys.readouterr().err
    with pytest.raises(NanoseekError, match="speculative_max_batch=1.5 must be an integer >= 0"):
        LLM(checkpoint, speculative_mtp=1, speculative_max_batch=1.5)
    monkeypatch.setitem(engine_module.DEFAULT_SPECULATIVE_MAX_BATCH, "cpu", 0)  # as "cuda_graphs" is
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the", "--max-tokens", "2",
                 "--speculative-mtp", "1"]) == 0
    assert "--speculative-mtp 1 is off by default" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the", "--max-tokens", "2",
                 "--speculative-mtp", "1", "--speculative-max-batch", "0"]) == 0
    assert "off by default" not in capsys.readouterr().err  # asked for in so many words: no note
    # two sequences above the (CPU) limit of 1: nothing was drafted, and the summary says why
    monkeypatch.undo()
    assert main(["generate", "--model", str(checkpoint), "--prompt", "the", "--prompt", "fox", "--max-tokens", "2",
                 "--speculative-mtp", "1"]) == 0
    err = capsys.readouterr().err
    assert "no MTP drafts: every decode step ran more than --speculative-max-batch 1 sequences" in err
    assert "acceptance" not in err
    for flags, why in ((["--max-tokens", "1"], "no decode step ran"),
                       (["--speculative-max-batch", "0"], "speculation is off (--speculative-max-batch 0)")):
        assert main(["generate", "--model", str(checkpoint), "--prompt", "the", "--speculative-mtp", "1", *flags]) == 0
        assert f"no MTP drafts: {why}" in capsys.readouterr().err


def test_a_run_directory_serves_as_its_latest_checkpoint(checkpoint, tmp_path, capsys):
    """generate / chat / eval / serve / info, LLM(path) and load_model take a run directory as init=
    and judge do (it said "runs/x is not a checkpoint directory (no config.json)")."""
    from nanoseek.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-3").symlink_to(checkpoint, target_is_directory=True)
    (run / "latest").symlink_to("checkpoint-3")
    params = SamplingParams(temperature=0, max_tokens=3)
    assert [o.outputs[0].token_ids for o in LLM(run).generate(["the"], params)] == \
        [o.outputs[0].token_ids for o in LLM(checkpoint).generate(["the"], params)]
    assert main(["generate", "--model", str(run), "--prompt", "the", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("[0] the")
    import nanoseek

    assert nanoseek.load_model(run).config == nanoseek.load_model(checkpoint).config
    assert main(["info", "--model", str(run)]) == 0
    assert "checkpoint-3" in capsys.readouterr().out
    # a checkpoint's file, or nothing at all, is named as what it is
    for model, says in ((checkpoint / "config.json", "is a file, not a checkpoint directory"),
                        (tmp_path / "missing", "does not exist"), (tmp_path, "has no config.json")):
        assert main(["generate", "--model", str(model), "--prompt", "the"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def test_chat_cli_reports_a_failed_turn_drops_it_and_goes_on(checkpoint, capsys, monkeypatch):
    """A turn that does not fit the context used to end the session (exit 2, conversation lost)."""
    import io

    from nanoseek.cli import main

    turn = "the quick brown fox jumps over the lazy dog"
    lines = ["dog " * 60, *[turn] * 5, "dog " * 60, "/reset", turn, "/exit"]  # too long alone; then the history outgrows 48
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(checkpoint), "--max-tokens", "5", "--max-model-len", "48"]) == 0
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error: message not sent" in line]
    assert "shorten the message" in errors[0] and "/reset" not in errors[0]  # no history to blame
    assert "shorten the message" in errors[-1] and "/reset" not in errors[-1]  # too long with or without history
    full = errors[1:-1]
    assert full and all("with the earlier turns" in e and "/reset to start a new conversation" in e for e in full)
    assert len(set(full)) == 1  # the dropped message is not in the history: each retry is the same size
    replies = [part for part in out.split("> ") if part.strip()]
    assert len(replies) == 5 - len(full) + 1  # every turn that fit was answered, and one more after /reset
    assert replies[-1] == replies[0]  # after /reset: the first turn's reply again


def test_chat_cli_goes_on_after_the_template_refuses_a_turn(checkpoint, tmp_path, capsys, monkeypatch):
    import io
    import json
    import shutil

    from nanoseek.cli import main
    from nanoseek.tokenizer import CHAT_TEMPLATE

    directory = tmp_path / "one_turn"
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages | length > 1 %}{{ raise_exception('one message per conversation') }}"
                               "{% endif %}" + CHAT_TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhello\n/reset\nhello\n"))
    assert main(["chat", "--model", str(directory), "--max-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert ("error: the chat template failed: one message per conversation; message not sent; "
            "/reset starts a new conversation") in err
    assert len([part for part in out.split("> ") if part.strip()]) == 2  # the first turn and the one after /reset


def test_chat_cli_passes_chat_template_kwargs_to_the_template(checkpoint, tmp_path, capsys, monkeypatch):
    """--chat-template-kwargs reaches the template as variables (V3.1's template reads `thinking`);
    not JSON, or a template that refuses without it, fails before the first message."""
    import io
    import json
    import shutil

    from nanoseek.cli import main
    from nanoseek.tokenizer import CHAT_TEMPLATE

    directory = tmp_path / "needs_thinking"
    shutil.copytree(checkpoint, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if not thinking %}{{ raise_exception('thinking is off') }}{% endif %}" + CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "--model", str(directory), "--max-tokens", "5", "--temperature", "0"]) == 2
    assert "thinking is off" in capsys.readouterr().err
    assert main(["chat", "--model", str(directory), "--max-tokens", "5", "--temperature", "0",
                 "--chat-template-kwargs", '{"thinking": true}']) == 0
    out, err = capsys.readouterr()
    llm = LLM(checkpoint)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert out.split("> ")[1] == llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5))[0].outputs[0].text + "\n"
    with pytest.raises(SystemExit):
        main(["chat", "--model", str(directory), "--chat-template-kwargs", "thinking"])
    assert "not JSON" in capsys.readouterr().err


def test_sampling_defaults_come_from_generation_config(tmp_path, capsys):
    """R1-Distill ships temperature 0.6 / top_p 0.95 in generation_config.json: generate and chat
    use them where no flag is given (a flag wins), the server for fields a request leaves out;
    without them the CLIs stay greedy and the server keeps OpenAI's defaults."""
    import argparse
    import json

    from nanoseek.checkpoint import generation_defaults
    from nanoseek.inference.generate import sampling_settings
    from nanoseek.serve.protocol import ChatCompletionRequest

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [1, 2], "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    assert generation_defaults(tmp_path / "nowhere") == {}

    flags = dict(model=str(tmp_path), command="chat", temperature=None, top_p=None, top_k=None)
    assert sampling_settings(argparse.Namespace(**flags)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 0}
    assert "temperature 0.6, top_p 0.95 from the checkpoint's generation_config.json" in capsys.readouterr().err
    assert sampling_settings(argparse.Namespace(**{**flags, "temperature": 0.0}))["temperature"] == 0.0
    bare = argparse.Namespace(**{**flags, "model": str(tmp_path / "nowhere")})
    assert sampling_settings(bare) == {"temperature": 0.0, "top_p": 1.0, "top_k": 0}

    messages = [{"role": "user", "content": "hi"}]
    unset = ChatCompletionRequest(messages=messages).sampling_kwargs(generation_defaults(tmp_path))
    assert (unset["temperature"], unset["top_p"]) == (0.6, 0.95)
    explicit = ChatCompletionRequest(messages=messages, temperature=1.0).sampling_kwargs({"temperature": 0.6})
    assert explicit["temperature"] == 1.0
    assert ChatCompletionRequest(messages=messages).sampling_kwargs()["temperature"] == 1.0


def test_graph_path_equals_eager_decoding(model, monkeypatch):
    """The CUDA-graph path: static padded inputs filled by one copy, batch sizes padded to a
    captured size, cache spans rounded up to a power of two of blocks, the output cloned before
    the next replay overwrites it. On the CPU the capture is replaced by running the same forward
    on the static inputs at each replay, so everything but CUDA's recording is checked here
    (tests/test_devices.py checks the real graphs on a GPU). Greedy (with logprobs), seeded
    sampling and MTP speculation give the eager engine's tokens; with speculation the batch of 3
    decodes plainly (above speculative_max_batch) until one finishes, then verifies k+1 = 3
    positions per step after catching the MTP module up on the plain steps' hidden states; the
    MTP module's run after a graphed verify replays that graph's companion (`mtp_replay`)."""
    from nanoseek.inference.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "_record", eager_record)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42] * 9]  # 3 sequences: padded to 4 rows
    greedy = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in (12, 5, 9)]
    sampled = [SamplingParams(temperature=1.0, seed=7, max_tokens=n, ignore_eos=True) for n in (12, 5, 9)]
    drafting = agreeing_mtp_model(0.5)  # accepts some drafts, not all: the MTP state's row varies
    # longer: the MTP companion of one verify graph replays several times, on new inputs each time
    drafted = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in (24, 5, 20)]
    for params, speculative, shapes_expected in ((greedy, 0, {(4, 1), (2, 1), (1, 1)}),
                                                 (sampled, 0, {(4, 1), (2, 1), (1, 1)}),
                                                 (drafted, 2, {(4, 1), (2, 3)})):
        kwargs = dict(block_size=4, speculative_mtp=speculative, speculative_max_batch=2)
        m = drafting if speculative else model
        eager_llm, graphed = LLM(m, **kwargs), LLM(m, **kwargs)
        eager = eager_llm.generate(prompts, params)
        # fp32 MoE: the expert loop, which CUDA could not capture; nothing is captured here
        graphed.runner.cuda_graphs, graphed.runner.graphs_need_bf16 = True, False
        outs = graphed.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
        # the same drafts were accepted: the MTP states the graphs left behind are the eager ones
        stats = {k: v for k, v in graphed.stats().items() if k.startswith("spec")}
        assert stats == {k: v for k, v in eager_llm.stats().items() if k.startswith("spec")}
        assert 0 < stats["spec_acceptance_rate"] < 1 if speculative else stats["spec_draft_tokens"] == 0
        # the caches end equal, the MTP module's included (stale hidden states would change only
        # its entries, which cost acceptance, never tokens); the scratch block differs (padding rows)
        end = graphed.runner.scratch_block * 4
        torch.testing.assert_close(graphed.runner.cache.pool[:, :end], eager_llm.runner.cache.pool[:, :end],
                                   atol=1e-5, rtol=1e-5)
        if params is not sampled:
            for o, e in zip(outs, eager):
                got = [lp["logprob"] for lp in o.outputs[0].logprobs]
                want = [lp["logprob"] for lp in e.outputs[0].logprobs]
                assert got == pytest.approx(want, abs=1e-5)
        shapes = set(graphed.runner.graphs)
        assert {(rows, T) for rows, T, _, _ in shapes} == shapes_expected
        assert all(span in (4, 8, 16, 32) for _, _, span, _ in shapes)  # 1, 2, 4, 8 blocks of 4
        assert len({span for _, _, span, _ in shapes}) > 1  # contexts of 6..21 tokens cross buckets
        assert {amp for *_, amp in shapes} == {None}
        companions = [shape for shape, graph in graphed.runner.graphs.items() if graph.mtp is not None]
        assert {T for _, T, _, _ in companions} == ({3} if speculative else set())
    # prompts of one length make a uniform prefill, which still runs eagerly: only decode is graphed
    graphed = LLM(model, block_size=4)
    graphed.runner.cuda_graphs, graphed.runner.graphs_need_bf16 = True, False
    graphed.generate([[5, 6, 7, 8], [1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert {T for _, T, _, _ in graphed.runner.graphs} == {1}


def test_graphs_of_fp32_moe_weights_only_under_bf16_autocast(model, monkeypatch):
    """RL's rollouts run the trainer's fp32 weights under bf16 autocast. The MoE's sync-free
    grouped GEMMs are bf16 ones, so an fp32 MoE model decodes eagerly without autocast and through
    graphs under it, keyed by the autocast dtype (a graph holds its casts: replayed outside autocast
    it would compute in bf16). The capture runs with autocast's weight cache off, else the graph
    would read bf16 copies freed when autocast exits (checked on a GPU in tests/test_devices.py)."""
    from nanoseek.inference.runner import ModelRunner

    cache_flags = []

    def record(self, run):
        cache_flags.append(torch.is_autocast_cache_enabled())
        return eager_record(self, run)

    monkeypatch.setattr(ModelRunner, "_record", record)
    prompts = [[5, 6, 7, 8, 9], [3, 4], [42] * 9]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 3, 5)]
    eager, graphed = LLM(model, block_size=4), LLM(model, block_size=4)
    graphed.runner.cuda_graphs = True
    assert [o.outputs[0].token_ids for o in graphed.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert not graphed.runner.graphs  # fp32 MoE: the expert loop, eagerly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params)]
    assert got == want
    assert graphed.runner.graphs and {amp for *_, amp in graphed.runner.graphs} == {torch.bfloat16}
    assert cache_flags and not any(cache_flags)


def test_speculative_max_batch_zero_never_speculates(model):
    """0 (the default with CUDA graphs, where eager drafting loses to a graph replay) keeps every
    decode step plain; a negative value names the field."""
    llm = LLM(model, block_size=4, speculative_mtp=1, speculative_max_batch=0)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert llm.stats()["spec_draft_tokens"] == 0
    with pytest.raises(NanoseekError, match="speculative_max_batch=-1"):
        LLM(model, speculative_mtp=1, speculative_max_batch=-1)
