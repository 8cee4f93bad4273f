"""The OpenAI-compatible server: official client, raw HTTP errors, streaming, disconnects, reasoning.

Everything runs against the real engine on tiny checkpoints, served by uvicorn in a thread on a free
loopback port. Two checkpoints:

- `random`: a random `preset("tiny")` model. Its text is noise, but greedy and seeded decoding are
  deterministic, which is all the API tests need.
- `thinker`: the same architecture with weights edited so that greedy decoding after the chat
  prompt writes exactly "<think>let me think</think>The answer is 42." and stops (see
  `_make_thinker`), so reasoning can be checked end to end through the real engine.
"""

import json
import os
import random
import re
import socket
import threading
import time

import httpx
import pytest
import torch
import openai
from openai import NotFoundError, OpenAI

import nanoseek
from nanoseek.config import preset
from nanoseek.model.transformer import Transformer
from nanoseek.serve.api import add_arguments, create_app
from nanoseek.serve.reasoning import Delta, ReasoningSplitter, prompt_opens_reasoning, split_reasoning
from nanoseek.tokenizer import train_tokenizer
from decoding_checks import lookup_model
from server_thread import ServerThread

os.environ.setdefault("HF_HUB_OFFLINE", "1")

API_KEY = "test-key"
TEXTS = ["hello world, the answer is 42. let me think about it. <think>x</think> The sky is blue."] * 20
THOUGHT, ANSWER = "let me think", "The answer is 42."
USER = [{"role": "user", "content": "why?"}]


def wait_until(condition, timeout=10.0):
    """Poll `condition` until it holds (bounded: fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class StepGate:
    """Let the engine run `budget` more steps, then hold its next step until the gate opens.

    Tests that need a request to be still running when the client leaves would otherwise race
    the engine (a tiny model writes 400 tokens in well under a second); with the gate they are
    deterministic on any machine. Use as a context manager; leaving it opens the gate.
    """

    def __init__(self, engine, budget: int):
        self.engine, self.budget, self.gate = engine, budget, threading.Event()
        self.original = engine.step
        self.steps = 0

    def step(self):
        if self.steps >= self.budget:
            self.gate.wait(30)
        self.steps += 1
        return self.original()

    def __enter__(self):
        self.engine.step = self.step  # the engine thread looks `step` up on every call
        return self

    def __exit__(self, *exc):
        del self.engine.step
        self.gate.set()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def _make_thinker(tok) -> Transformer:
    """A tiny model that greedily answers the chat prompt with <think>THOUGHT</think>ANSWER<eos>
    (decoding_checks.lookup_model)."""
    prompt_last = tok.encode(tok.apply_chat_template(USER))[-1]
    return lookup_model(tok.vocab_size, [prompt_last] + tok.encode(f"<think>{THOUGHT}</think>{ANSWER}") + [tok.eos_id])


@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    nanoseek.save_model(Transformer(preset("tiny", vocab_size=tok.vocab_size)), root / "random", tokenizer=tok)
    nanoseek.save_model(_make_thinker(tok), root / "thinker", tokenizer=tok)
    return root


@pytest.fixture(scope="module")
def server(checkpoints):
    """The random model, with an API key; block_size 16 so short prompts can hit the prefix cache."""
    engine = nanoseek.LLM(checkpoints / "random", max_num_seqs=8, block_size=16)
    app = create_app(engine, model_name="tiny", api_key=API_KEY)
    with ServerThread(app) as s:
        s.engine = engine
        s.state = app.state.server
        yield s


@pytest.fixture(scope="module")
def thinker(checkpoints):
    """The scripted reasoning model, with no API key and room for one sequence and no queue."""
    engine = nanoseek.LLM(checkpoints / "thinker", max_num_seqs=1)
    app = create_app(engine, model_name="thinker", max_waiting=0)
    with ServerThread(app) as s:
        s.engine = engine
        s.state = app.state.server
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def thinker_client(thinker):
    return OpenAI(base_url=thinker.url + "/v1", api_key="unused", max_retries=0, timeout=30)


LONG = {"ignore_eos": True}  # extra_body: run to max_tokens whatever the random model samples


# ------------------------------------------------------------------ chat completions (openai client)


def test_chat_completion_usage_and_determinism(client, tok):
    kwargs = dict(model="tiny", messages=USER, max_tokens=8, temperature=0, extra_body=LONG)
    r1 = client.chat.completions.create(**kwargs)
    r2 = client.chat.completions.create(**kwargs)
    assert r1.object == "chat.completion" and r1.id.startswith("chatcmpl-") and r1.model == "tiny"
    choice = r1.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == r2.choices[0].message.content  # greedy is deterministic
    prompt_tokens = len(tok.encode(tok.apply_chat_template(USER)))
    u = r1.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (prompt_tokens, 8, prompt_tokens + 8)
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == prompt_tokens


def test_seed_reproducible_and_n(client):
    kwargs = dict(model="tiny", messages=USER, max_tokens=12, temperature=1.0, n=3, extra_body=LONG)
    a = client.chat.completions.create(seed=1234, **kwargs)
    b = client.chat.completions.create(seed=1234, **kwargs)
    c = client.chat.completions.create(seed=4321, **kwargs)
    texts = lambda r: [ch.message.content for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts(a) == texts(b) and texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # the n samples differ from one another
    assert a.usage.completion_tokens == 3 * 12


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model="tiny", messages=USER, max_tokens=10, temperature=0, n=2, extra_body=LONG)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    by_index = {0: "", 1: ""}
    finish = {}
    for ch in chunks[:-1]:
        assert ch.object == "chat.completion.chunk" and ch.usage is None
        for c in ch.choices:
            by_index[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    first = {c.index: c.delta for ch in chunks[:2] for c in ch.choices}
    assert all(d.role == "assistant" for d in first.values())
    assert by_index == {c.index: c.message.content for c in full.choices}
    assert finish == {0: "length", 1: "length"}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_framing(server):
    body = {"model": "tiny", "messages": USER, "max_tokens": 3, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[0]  # only with stream_options.include_usage


def test_stop_strings(client):
    base = dict(model="tiny", messages=USER, max_tokens=16, temperature=0, extra_body=LONG)
    text = client.chat.completions.create(**base).choices[0].message.content
    # a two-character stop string from the middle of the greedy output (ASCII, so it is never half a character)
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    expected = text[: text.find(stop)]
    r = client.chat.completions.create(stop=[stop], **base)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       client.chat.completions.create(stop=stop, stream=True, **base) if ch.choices)
    assert streamed == expected


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body=LONG)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 4
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob  # greedy picks the most likely token
        assert all(0 <= b < 256 for b in e.bytes)


def test_penalties_and_sampling_fields_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=5, temperature=0.8,
                                       top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=7,
                                       extra_body={"top_k": 20, "ignore_eos": True})
    assert r.usage.completion_tokens == 5


def test_top_k_past_int64_is_no_limit_and_keeps_the_engine_alive(server, client):
    """top_k has no upper bound in the API; with top_p < 1 a huge one used to overflow a tensor in
    the sampler, which failed the engine step: every later request got 503 engine_dead."""
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, top_p=0.9,
                                       extra_body={"top_k": 10**20, "ignore_eos": True})
    assert r.usage.completion_tokens == 3
    assert httpx.get(server.url + "/health").status_code == 200


def test_prefix_cache_hits_reported(client):
    messages = [{"role": "system", "content": "The sky is blue. " * 12}, {"role": "user", "content": "hello"}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0)
    u = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0).usage
    hit, miss = u.model_extra["prompt_cache_hit_tokens"], u.model_extra["prompt_cache_miss_tokens"]
    assert hit >= 16 and hit + miss == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == hit


# ------------------------------------------------------------------ completions


def test_completions(client, tok):
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=6, temperature=0, extra_body=LONG)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("The sky is")) + 1  # + bos
    ids = [tok.bos_id] + tok.encode("The sky is")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, extra_body=LONG)
    assert by_ids.choices[0].text == r.choices[0].text
    echo = client.completions.create(model="tiny", prompt="The sky is", max_tokens=6, temperature=0, echo=True,
                                     extra_body=LONG)
    assert echo.choices[0].text == "The sky is" + r.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="The sky is", max_tokens=6, temperature=0, stream=True, extra_body=LONG) if ch.choices)
    assert streamed == r.choices[0].text


def test_completions_batch_n_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt=["hello", "The sky"], n=2, max_tokens=3, temperature=0,
                                  logprobs=2, extra_body=LONG)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples of a prompt agree
    lp = r.choices[2].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 12


def test_completions_batch_default_max_tokens_is_per_prompt(server, client):
    """OpenAI's default of 16 tokens, shrunk to fit each prompt's own context (a prompt 5 tokens
    short of the context shortened every prompt of the batch to 5)."""
    near_full = [1] * (server.engine.max_model_len - 5)
    r = client.completions.create(model="tiny", prompt=[[1, 2, 3], near_full], temperature=0, extra_body=LONG)
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.completion_tokens == 16 + 5


def test_streamed_text_offsets_equal_the_whole_responses(client):
    """A stop string that the text starts to match holds that text back for a chunk; the streamed
    logprobs' text_offset must still follow the tokens, as the whole response's does."""
    whole = client.completions.create(model="tiny", prompt="The sky", max_tokens=6, temperature=0, logprobs=0,
                                      extra_body=LONG).choices[0].logprobs
    stop = whole.tokens[2] + "\x00"  # never matched in full: held back at token 2, released at token 3
    offsets = []
    for chunk in client.completions.create(model="tiny", prompt="The sky", max_tokens=6, temperature=0, logprobs=0,
                                           stop=[stop], stream=True, extra_body=LONG):
        if chunk.choices and chunk.choices[0].logprobs:
            offsets += chunk.choices[0].logprobs.text_offset
    assert offsets == whole.text_offset


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model="tiny", prompt="hello", temperature=0, extra_body=LONG)
    assert r.usage.completion_tokens == 16


# ------------------------------------------------------------------ models, health, metrics, page


def test_models_health_metrics_page(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"  # GET /v1/models/{id}
    with pytest.raises(NotFoundError) as e:
        client.models.retrieve("other")
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/health").status_code == 200
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("nanoseek_requests_total", "nanoseek_prompt_tokens_total", "nanoseek_generation_tokens_total",
                 "nanoseek_time_to_first_token_seconds_bucket", "nanoseek_num_requests_waiting",
                 "nanoseek_kv_cache_usage_perc", "nanoseek_prefix_cache_hit_rate",
                 "nanoseek_spec_decode_num_draft_tokens_total", "nanoseek_spec_decode_num_accepted_tokens_total"):
        assert name in text, name
    ttft_count = next(line for line in text.splitlines() if line.startswith("nanoseek_time_to_first_token_seconds_count"))
    assert float(ttft_count.split()[-1]) >= 1
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<details" in page.text and "reasoning_content" in page.text and "getReader" in page.text


# ------------------------------------------------------------------ errors (raw HTTP)

CHAT = {"model": "tiny", "messages": USER, "max_tokens": 2}


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ({"model": "tiny"}, 400, "messages"),
    ({**CHAT, "messages": "hi"}, 400, "messages"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "tool"}]}, 400, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}, {"role": "system", "content": None}]}, 400,
     "messages[1].content"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "temperature": 5}, 400, "temperature"),
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    ({**CHAT, "n": 0}, 400, "n"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": 100_000}, 400, "max_tokens"),
    ({**CHAT, "stop": 3}, 400, "stop"),
    ({**CHAT, "stop": ["a", ""]}, 400, "stop"),  # the engine's check: its param used to be null
    ({**CHAT, "seed": "x"}, 400, "seed"),
    ({**CHAT, "top_logprobs": 2}, 400, None),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, None),
    ({**CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": "{}"}}}, 400, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}}, 400,
     "response_format"),
    ({**CHAT, "tools": []}, 400, "tools"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "no spaces"}}]}, 400, "tools"),
    ({**CHAT, "tool_choice": "required"}, 400, "tool_choice"),  # no tools: it was a 200 with plain text
    ({**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    ({**CHAT, "messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages"),
    ({**CHAT, "model": "gpt-5"}, 404, "model"),
])
def test_chat_errors(server, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert server.state.in_flight == 0  # a rejected request holds no capacity


@pytest.mark.parametrize("content, content_type, says", [
    (b"{bad", "application/json", "not valid JSON"),
    (b"[1, 2]", "application/json", "must be a JSON object."),
    (json.dumps(CHAT).encode(), "application/x-www-form-urlencoded", "Content-Type: application/json"),  # curl -d
    (json.dumps(CHAT).encode(), None, "this request's: none"),
])
def test_a_body_that_is_not_a_json_object_says_so(server, content, content_type, says):
    headers = {"Authorization": f"Bearer {API_KEY}", **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert says in r.json()["error"]["message"]


def test_tools_with_tool_choice_none_are_not_parsed(server):
    """Function calling itself is tested in test_serve_tools.py."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "none"},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text


def test_content_parts_text_served_image_refused_by_name(server):
    """Text parts are joined; an image part used to be refused as "content.str: Input should be a
    valid string", which says nothing about images."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text = [{"type": "text", "text": "why"}, {"type": "text", "text": "?"}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers=headers,
                   json={**CHAT, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    image = [*text, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers=headers,
                   json={**CHAT, "messages": [{"role": "user", "content": image}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "'image_url' are not supported" in r.json()["error"]["message"]


def test_missing_content_is_a_400_naming_the_message_but_an_assistant_may_omit_it(server):
    """A user message without content used to be answered 200, as if it were empty."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers=headers,
                   json={**CHAT, "messages": [*USER, {"role": "assistant", "content": "a"}, {"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Missing required parameter: 'messages[2].content'.", "type": "invalid_request_error",
        "param": "messages[2].content", "code": "missing_required_parameter"}
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers=headers,
                   json={**CHAT, "messages": [*USER, {"role": "assistant"}, *USER]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 99999]}, "prompt"),
    ({"model": "tiny", "prompt": {"text": "x"}}, "prompt"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "tiny", "prompt": "hello " * 600}, "prompt"),
])
def test_completion_errors(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_prompt_too_long_code(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {API_KEY}"},
                   json={**CHAT, "messages": [{"role": "user", "content": "hello " * 600}]})
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_key_required(server, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/tiny")):
        r = httpx.request(method, server.url + path, json=CHAT, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    # the key is checked before the body is read: a 401, not a 400 about the JSON
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{bad", headers=headers, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=USER, temperature=-1)


# ------------------------------------------------------------------ disconnects and overload


def _assert_aborted(server, tokens_before):
    """The engine went idle long before the 400 tokens the request asked for: it was aborted."""
    wait_until(lambda: not server.engine.has_unfinished_requests())
    assert server.engine.stats()["generation_tokens"] - tokens_before < 20


def test_streaming_disconnect_frees_the_slot(server):
    body = {"model": "tiny", "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    tokens_before = server.engine.stats()["generation_tokens"]
    with StepGate(server.engine, budget=2):
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
            assert "assistant" in next(lines)  # the role chunk: the request is in the engine
            assert server.engine.has_unfinished_requests()
        wait_until(lambda: server.state.in_flight == 0)  # the server saw the disconnect
    _assert_aborted(server, tokens_before)


def test_non_streaming_disconnect_frees_the_slot(server):
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": 400, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    tokens_before = server.engine.stats()["generation_tokens"]
    with StepGate(server.engine, budget=2):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(server.engine.has_unfinished_requests)
        wait_until(lambda: server.state.in_flight == 0)
    _assert_aborted(server, tokens_before)


def test_overload_returns_503_and_recovers(thinker, thinker_client):
    body = {"model": "thinker", "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with StepGate(thinker.engine, budget=0):
        with httpx.stream("POST", thinker.url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
            assert "assistant" in next(lines)  # admitted: the only slot is taken
            busy = httpx.post(thinker.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
            assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_overloaded"
        wait_until(lambda: thinker.state.in_flight == 0)
    wait_until(lambda: not thinker.engine.has_unfinished_requests())
    r = thinker_client.chat.completions.create(model="thinker", messages=USER, max_tokens=20, temperature=0)
    assert r.choices[0].finish_reason == "stop"


def test_a_request_larger_than_the_server_is_a_400_not_a_503(thinker):
    """The thinker holds one sequence (max_num_seqs 1, no queue). More than that in one request
    used to be a 503 "retry later", which the official client retries and no retry can pass."""
    r = httpx.post(thinker.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "n": 2}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n"
    r = httpx.post(thinker.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert thinker.state.in_flight == 0


def test_admission_capacity_is_the_engines(checkpoints):
    engine = nanoseek.LLM(checkpoints / "thinker", max_num_seqs=3)
    assert create_app(engine).state.server.max_running == 3  # it was 64, whatever the engine ran


def test_engine_failure_is_reported_not_hung(checkpoints):
    """A bug in the engine fails the requests in flight with a clear error and turns /health to 503."""
    engine = nanoseek.LLM(checkpoints / "thinker", max_num_seqs=1)

    def broken_step():
        raise RuntimeError("simulated engine bug")

    engine.step = broken_step
    polls = []
    unfinished = engine.has_unfinished_requests
    engine.has_unfinished_requests = lambda: polls.append(1) or unfinished()
    with ServerThread(create_app(engine, model_name="thinker")) as s:
        body = {"model": "thinker", "messages": USER, "max_tokens": 5}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line for line in r.iter_lines() if line]
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "engine_dead"
        assert events[-1] == "data: [DONE]"
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        before = len(polls)
        assert httpx.get(s.url + "/health").status_code == 503
        assert httpx.get(s.url + "/health").status_code == 503
        # the dead engine's thread waits for commands; it used to spin on the failed request, a core at 100%
        assert len(polls) - before < 10, len(polls) - before


# ------------------------------------------------------------------ response_format: structured output


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
AS_PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def is_person(text: str) -> bool:
    """PERSON checked by hand (no jsonschema dependency)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and list(obj) == ["name", "age"] and isinstance(obj["name"], str)
            and len(obj["name"]) <= 12 and isinstance(obj["age"], int) and not isinstance(obj["age"], bool))


def test_response_format_json_schema_is_enforced(client):
    kwargs = dict(model="tiny", messages=USER, max_tokens=60)
    for seed in (None, 0, 1, 2):
        sampling = dict(temperature=0) if seed is None else dict(temperature=1.0, seed=seed)
        r = client.chat.completions.create(**kwargs, **sampling, response_format=AS_PERSON)
        assert is_person(r.choices[0].message.content), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        free = client.chat.completions.create(**kwargs, **sampling)
        assert not is_person(free.choices[0].message.content or "")  # the same request unconstrained
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        **kwargs, temperature=0, response_format=AS_PERSON, stream=True) if ch.choices)
    assert streamed == client.chat.completions.create(**kwargs, temperature=0,
                                                      response_format=AS_PERSON).choices[0].message.content


def test_response_format_json_object(client):
    for stream in (False, True):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=60, temperature=0,
                                           response_format={"type": "json_object"}, stream=stream)
        content = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) if stream \
            else r.choices[0].message.content
        assert isinstance(json.loads(content), dict), content


def test_completions_take_response_format(client):
    r = client.completions.create(model="tiny", prompt=["the sky", "hello"], max_tokens=60, temperature=1.0, seed=3,
                                  n=2, extra_body={"response_format": AS_PERSON})
    assert len(r.choices) == 4 and all(is_person(c.text) for c in r.choices), [c.text for c in r.choices]


@pytest.mark.parametrize("response_format, says", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "cannot be enforced: .*frobnicate"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(("}}}, "cannot be enforced"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_saying_why(client, server, response_format, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, response_format=response_format)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == "response_format" and re.search(says, error["message"])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=5, extra_body={"response_format": response_format})
    assert server.state.in_flight == 0


def test_json_after_the_reasoning_a_prompt_opens(thinker_client, tok):
    """A prompt that opens the think block (R1's template does): the reasoning is left free and the
    JSON starts after </think>."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    prompt = tok.apply_chat_template(USER) + "<think>"
    r = thinker_client.completions.create(model="thinker", prompt=prompt, max_tokens=40, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    reasoning, content = r.choices[0].text.split("</think>")
    assert reasoning == THOUGHT and json.loads(content)["answer"] in ("yes", "no")
    free = thinker_client.completions.create(model="thinker", prompt=prompt, max_tokens=40, temperature=0)
    assert free.choices[0].text == f"{THOUGHT}</think>{ANSWER}"


# ------------------------------------------------------------------ reasoning, end to end


def test_reasoning_content_non_streaming(thinker_client):
    r = thinker_client.chat.completions.create(model="thinker", messages=USER, max_tokens=30, temperature=0)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == THOUGHT and message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    # <think> let me think </think>: the reasoning tokens are billed as completion tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == 5


def test_reasoning_content_streaming(thinker_client):
    reasoning = content = ""
    for ch in thinker_client.chat.completions.create(model="thinker", messages=USER, max_tokens=30, temperature=0,
                                                     stream=True):
        for c in ch.choices:
            r, t = c.delta.model_extra.get("reasoning_content"), c.delta.content
            assert not (r and t), "reasoning and content travel in separate chunks"
            reasoning += r or ""
            content += t or ""
    assert (reasoning, content) == (THOUGHT, ANSWER)


def test_reasoning_split_can_be_turned_off(thinker_client):
    r = thinker_client.chat.completions.create(model="thinker", messages=USER, max_tokens=30, temperature=0,
                                               extra_body={"separate_reasoning": False})
    assert r.choices[0].message.content == f"<think>{THOUGHT}</think>{ANSWER}"
    assert r.choices[0].message.model_extra.get("reasoning_content") is None


def test_reasoning_cut_short_stays_reasoning(thinker_client):
    r = thinker_client.chat.completions.create(model="thinker", messages=USER, max_tokens=3, temperature=0)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "let me" and message.content is None
    assert r.choices[0].finish_reason == "length"


def test_cli_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "d", "--api-key", "k", "--served-model-name", "m", "--no-reasoning-split"])
    assert (args.host, args.port, args.api_key, args.served_model_name, args.no_reasoning_split) == (
        "127.0.0.1", 8000, "k", "m", True)


def test_cli_rejects_a_bad_port_and_a_taken_address(checkpoints, capsys):
    from nanoseek import cli

    with pytest.raises(SystemExit) as exit_info:  # argparse: usage error, exit 2, no traceback
        cli.main(["serve", "--model", str(checkpoints / "random"), "--port", "99999"])
    assert exit_info.value.code == 2 and "0 to 65535" in capsys.readouterr().err
    with socket.socket() as holder:  # the address is held: a clear error before the model loads
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert cli.main(["serve", "--model", str(checkpoints / "random"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_port_0_is_resolved_to_the_port_the_server_will_name():
    from nanoseek.serve.api import check_bindable

    assert 0 < check_bindable("127.0.0.1", 0) <= 65535  # `serve --port 0` prints it, not ":0"


# ------------------------------------------------------------------ the splitter, unit tests

SPLIT_CASES = [
    # (text, prompt opened <think>, expected (reasoning_content, content))
    ("<think>\nabc</think>\n\nhello", False, ("abc", "hello")),
    ("  <think>x</think>y", False, ("x", "y")),
    ("plain answer", False, (None, "plain answer")),
    ("hello <think>x</think>", False, (None, "hello <think>x</think>")),  # reasoning only at the start
    ("<think>never closed", False, ("never closed", None)),
    ("<thi", False, (None, "<thi")),
    ("<think>a</think>", False, ("a", None)),
    ("", False, (None, "")),
    # R1's template ends the prompt with "<think>\n": only the closing tag appears
    ("step 1, step 2\n</think>\n\nfinal", True, ("step 1, step 2\n", "final")),
    ("<think>dup</think>ok", True, ("dup", "ok")),
    ("no closing tag", True, ("no closing tag", None)),
    ("a</think>b</think>c", True, ("a", "b</think>c")),
    ("a </thin k>", True, ("a </thin k>", None)),
]


def _split_in_chunks(text, in_reasoning, cuts):
    splitter, out = ReasoningSplitter(in_reasoning), Delta()
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        out += splitter.feed(text[a:b])
    out += splitter.finish()
    if not splitter.saw_reasoning:
        return None, out.content
    return out.reasoning, out.content or None


@pytest.mark.parametrize("text, in_reasoning, expected", SPLIT_CASES)
def test_splitter_is_independent_of_chunking(text, in_reasoning, expected):
    assert split_reasoning(text, in_reasoning) == expected
    for size in range(1, len(text) + 1):  # every fixed chunk size, so every tag gets cut everywhere
        assert _split_in_chunks(text, in_reasoning, list(range(size, len(text), size))) == expected
    rng = random.Random(0)
    for _ in range(50):  # and random ragged chunkings, empty chunks included
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))
        assert _split_in_chunks(text, in_reasoning, cuts) == expected


def test_splitter_releases_text_early_and_holds_partial_tags():
    s = ReasoningSplitter()
    assert s.feed("<think>abc</th") == Delta(reasoning="abc")  # "</th" might be the closing tag
    assert s.feed("inking") == Delta(reasoning="</thinking")   # it was not
    assert s.feed("</think>\n\nAns") == Delta(content="Ans")
    assert s.feed("wer") == Delta(content="wer")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<｜User｜>q<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<｜User｜>q<｜Assistant｜>")
