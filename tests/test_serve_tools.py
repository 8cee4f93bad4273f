"""Function calling and chat-prefix completion in `nanoseek serve`, through the official openai client.

The model side is scripted (`ScriptedServingEngine`: a request's output is a fixed text released a
few characters per step, so streaming sees it in pieces) where the tests need a model that calls
tools; `tool_choice` "required" / a named function run on a real tiny random model, whose output
the constraint alone makes a valid call. The tokenizer is a nanoseek BPE with nanoseek's chat
template (DeepSeek-V3's tool-call format), or a V3.1-style template for that format.
"""

import json
import os

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

import nanoseek
from nanoseek.config import preset
from nanoseek.model.transformer import Transformer
from nanoseek.serve.api import create_app
from nanoseek.serve.tools import (
    DEEPSEEK_V3, DEEPSEEK_V31, ToolCallParser, detect_format, parse_tool_calls, render_calls,
)
from nanoseek.tokenizer import TOOL_CALLS_BEGIN, TOOL_OUTPUTS_END, train_tokenizer
from decoding_checks import fed_in_chunks
from scripted_engine import ScriptedServingEngine
from server_thread import ServerThread, collect_stream

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["hello world, the answer is 42. <think>x</think> The sky is blue. weather in Paris: sunny"] * 20
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
PARIS, ROME = '{"city": "Paris"}', '{"city": "Rome"}'

# DeepSeek-V3.1's way of writing calls (name, separator, raw JSON), in a minimal template
V31_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] }}{% if m.get('tool_calls') %}"
    "{{ '<｜tool▁calls▁begin｜>' }}{% for c in m['tool_calls'] %}{{ '<｜tool▁call▁begin｜>' + c['function']['name']"
    " + '<｜tool▁sep｜>' + c['function']['arguments'] + '<｜tool▁call▁end｜>' }}{% endfor %}"
    "{{ '<｜tool▁calls▁end｜>' }}{% endif %}{{ '<｜end▁of▁sentence｜>' }}"
    "{% elif m['role'] == 'tool' %}{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
# a template that ignores tool calls altogether (Llama-style checkpoints)
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


class Served:
    """A scripted server and an openai client on it; `script` can be swapped per test."""

    def __init__(self, tok, template=None, **app_kwargs):
        tokenizer = tok if template is None else _with_template(tok, template)
        self.script = lambda prompt: "Hello."
        self.engine = ScriptedServingEngine(tokenizer, lambda prompt: self.script(prompt))
        self.app = create_app(self.engine, model_name="scripted", **app_kwargs)
        self.thread = ServerThread(self.app)

    def __enter__(self):
        self.thread.__enter__()
        self.client = OpenAI(base_url=self.thread.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        return self

    def __exit__(self, *exc):
        self.thread.__exit__(*exc)


def _with_template(tok, template):
    import copy

    other = copy.copy(tok)
    other.chat_template = template
    return other


@pytest.fixture(scope="module")
def v3(tok):
    with Served(tok) as s:
        yield s


def _chat(served, stream=False, **kwargs):
    kwargs = {"model": "scripted", "messages": ASK, "tools": [WEATHER, TIME], **kwargs}
    if not stream:
        return served.client.chat.completions.create(**kwargs)
    return list(served.client.chat.completions.create(stream=True, **kwargs))


# ------------------------------------------------------------------ the parser


CALL_TEXTS = [
    # (format, model output, content before the calls, [(name, arguments)])
    (DEEPSEEK_V3, render_calls(DEEPSEEK_V3, [("get_weather", PARIS)]), "", [("get_weather", PARIS)]),
    (DEEPSEEK_V3, "Let me check." + render_calls(DEEPSEEK_V3, [("get_weather", PARIS), ("get_time", '{"tz": "CET"}')]),
     "Let me check.", [("get_weather", PARIS), ("get_time", '{"tz": "CET"}')]),
    (DEEPSEEK_V31, render_calls(DEEPSEEK_V31, [("get_weather", PARIS), ("get_weather", ROME)]), "",
     [("get_weather", PARIS), ("get_weather", ROME)]),
    # <｜tool▁calls▁end｜> left out (eos came first): the calls stand
    (DEEPSEEK_V3, render_calls(DEEPSEEK_V3, [("f", "{}")]).removesuffix("<｜tool▁calls▁end｜>"), "", [("f", "{}")]),
]


@pytest.mark.parametrize("fmt, text, content, calls", CALL_TEXTS)
def test_parser_is_independent_of_chunking(fmt, text, content, calls):
    assert parse_tool_calls(text, fmt) == (content, [{"type": "function", "function": {"name": n, "arguments": a}}
                                                     for n, a in calls])
    for seed in range(20):
        parser = ToolCallParser(fmt)
        events = fed_in_chunks(parser, text, seed, longest=6)
        assert "".join(e[1] for e in events if e[0] == "content") == content
        assert [e[2] for e in events if e[0] == "call"] == [n for n, _ in calls]
        arguments = ["".join(e[2] for e in events if e[0] == "arguments" and e[1] == k) for k in range(len(calls))]
        assert arguments == [a for _, a in calls] and parser.succeeded
        # a call's header goes out before its arguments, and no marker ever reaches the content
        assert all("<｜" not in e[1] for e in events if e[0] == "content")


MALFORMED = [
    (DEEPSEEK_V3, "Hi" + TOOL_CALLS_BEGIN + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get weather\n```json\n{}\n```"
     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),                                          # a space in the name
    (DEEPSEEK_V3, render_calls(DEEPSEEK_V3, [("f", '{"x": 1')])),                       # arguments not JSON
    (DEEPSEEK_V3, render_calls(DEEPSEEK_V3, [("f", "[1, 2]")])),                        # arguments not an object
    (DEEPSEEK_V3, TOOL_CALLS_BEGIN + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{}<｜tool▁call▁end｜>"),  # no fence
    (DEEPSEEK_V3, render_calls(DEEPSEEK_V3, [("f", '{"x": 1}')])[:-40]),                # cut off mid-call
    (DEEPSEEK_V3, TOOL_CALLS_BEGIN + "<｜tool▁calls▁end｜>"),                             # an empty section
    (DEEPSEEK_V31, render_calls(DEEPSEEK_V3, [("f", "{}")])),                           # the other format
]


@pytest.mark.parametrize("fmt, text", MALFORMED)
def test_malformed_tool_calls_are_content(fmt, text):
    assert parse_tool_calls(text, fmt) == (text, [])
    parser = ToolCallParser(fmt)
    parser.feed(text)
    parser.finish()
    assert not parser.succeeded


def test_format_is_detected_from_the_chat_template(tok):
    assert detect_format(tok) is DEEPSEEK_V3  # nanoseek's own template writes V3's
    assert detect_format(_with_template(tok, V31_TEMPLATE)) is DEEPSEEK_V31
    assert detect_format(_with_template(tok, PLAIN_TEMPLATE)) is None


# ------------------------------------------------------------------ the server: auto tool choice


@pytest.mark.parametrize("calls", [[("get_weather", PARIS)], [("get_weather", PARIS), ("get_time", '{"tz": "CET"}')]])
def test_tool_calls_non_streaming_and_streaming(v3, calls):
    v3.script = lambda prompt: "Checking. " + render_calls(DEEPSEEK_V3, calls)
    finished_with_tool_calls = _tool_calls_outcomes(v3)
    r = _chat(v3)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking. "
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == calls
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)
    content, reasoning, streamed, finish = collect_stream(_chat(v3, stream=True))
    assert (content, finish) == ("Checking. ", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in streamed] == calls
    # /metrics counts both requests by the finish reason they were sent, not the engine's "stop"
    assert _tool_calls_outcomes(v3) == finished_with_tool_calls + 2


def _tool_calls_outcomes(served) -> int:
    """/metrics' count of chat requests that finished with "tool_calls"."""
    text = httpx.get(served.thread.url + "/metrics").text
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith("nanoseek_requests_total{") and 'outcome="tool_calls"' in line)


def test_parallel_tool_calls_false_keeps_the_first_call(v3):
    v3.script = lambda prompt: render_calls(DEEPSEEK_V3, [("get_weather", PARIS), ("get_weather", ROME)])
    r = _chat(v3, parallel_tool_calls=False)
    assert [c.function.arguments for c in r.choices[0].message.tool_calls] == [PARIS]
    assert [c["arguments"] for c in collect_stream(_chat(v3, stream=True, parallel_tool_calls=False))[2]] == [PARIS]


def test_deepseek_v31_format(tok):
    with Served(tok, V31_TEMPLATE) as s:
        assert s.app.state.server.tool_format is DEEPSEEK_V31
        s.script = lambda prompt: render_calls(DEEPSEEK_V31, [("get_weather", PARIS), ("get_weather", ROME)])
        r = _chat(s)
        assert [c.function.arguments for c in r.choices[0].message.tool_calls] == [PARIS, ROME]
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        content, _, calls, finish = collect_stream(_chat(s, stream=True))
        assert (content, finish, [c["arguments"] for c in calls]) == ("", "tool_calls", [PARIS, ROME])


def test_malformed_call_is_returned_as_content(v3):
    text = "Sure." + render_calls(DEEPSEEK_V3, [("get_weather", "{city: Paris}")])  # not JSON
    v3.script = lambda prompt: text
    r = _chat(v3)
    assert r.choices[0].message.content == text and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    bad_header = "Sure." + TOOL_CALLS_BEGIN + "<｜tool▁call▁begin｜>get weather?"
    v3.script = lambda prompt: bad_header
    content, _, calls, finish = collect_stream(_chat(v3, stream=True))
    assert (content, calls, finish) == (bad_header, [], "stop")


def test_reasoning_model_calls_tools_after_its_thinking(v3):
    """Calls are read only after </think>: a call the model drafts while thinking stays reasoning."""
    draft = render_calls(DEEPSEEK_V3, [("get_time", '{"tz": "UTC"}')])
    v3.script = lambda prompt: f"<think>Maybe {draft}? No: the weather.</think>" + render_calls(
        DEEPSEEK_V3, [("get_weather", PARIS)])
    r = _chat(v3)
    message = r.choices[0].message
    assert message.reasoning_content == f"Maybe {draft}? No: the weather."
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("get_weather", PARIS)]
    assert message.content is None and r.choices[0].finish_reason == "tool_calls"
    content, reasoning, calls, finish = collect_stream(_chat(v3, stream=True))
    assert (content, reasoning, finish) == ("", message.reasoning_content, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", PARIS)]


def test_round_trip_call_result_answer(v3, tok):
    """call -> the client runs it and sends the result -> the model answers; the second prompt is
    the conversation rendered through the template, tool call and result included."""
    v3.script = lambda prompt: ("It is sunny in Paris." if prompt.endswith(TOOL_OUTPUTS_END)
                                else render_calls(DEEPSEEK_V3, [("get_weather", PARIS)]))
    first = _chat(v3).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [first,  # the client's message object, as OpenAI's docs append it (content None)
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21°C"}]
    final = _chat(v3, messages=messages)
    assert final.choices[0].message.content == "It is sunny in Paris." and final.choices[0].finish_reason == "stop"
    expected = tok.apply_chat_template(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": PARIS}}]},
         {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21°C"}], tools=[WEATHER, TIME])
    assert v3.engine.prompts[-1] == expected
    assert expected.endswith("<｜tool▁output▁begin｜>sunny, 21°C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    assert '"name": "get_weather"' in expected  # the tools are listed for the model


def test_tool_choice_none_shows_tools_but_parses_nothing(v3):
    text = render_calls(DEEPSEEK_V3, [("get_weather", PARIS)])
    v3.script = lambda prompt: text
    r = _chat(v3, tool_choice="none")
    assert r.choices[0].message.content == text and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop" and "## Tools" in v3.engine.prompts[-1]
    no_tools = v3.client.chat.completions.create(model="scripted", messages=ASK)
    assert no_tools.choices[0].message.content == text  # no tools offered: nothing is parsed either


def test_a_template_without_tool_calls_needs_a_parser_option(tok):
    with Served(tok, PLAIN_TEMPLATE) as s:
        assert s.app.state.server.tool_format is None
        with pytest.raises(BadRequestError, match="--tool-call-parser"):
            _chat(s)
        assert _chat(s, tool_choice="none").choices[0].finish_reason == "stop"
    with Served(tok, PLAIN_TEMPLATE, tool_call_parser="deepseek_v3") as s:
        s.script = lambda prompt: render_calls(DEEPSEEK_V3, [("get_weather", PARIS)])
        assert _chat(s).choices[0].finish_reason == "tool_calls"


def test_named_and_required_tool_choice_constrain_the_output(v3):
    """The constraint is a regex of a call section in the checkpoint's format: a named function
    admits only that function, "required" any offered one (several, unless parallel_tool_calls is
    false). Here the scripted engine records it; the real engine enforces it (next test)."""
    v3.script = lambda prompt: render_calls(DEEPSEEK_V3, [("get_time", '{"tz": "CET"}')])
    r = _chat(v3, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert r.choices[0].finish_reason == "tool_calls"
    another_call = "(\\n(<｜tool▁call▁begin｜>"  # the regex's repetition of calls
    named = v3.engine.params[-1].regex
    assert "get_time" in named and "get_weather" not in named and another_call not in named
    _chat(v3, tool_choice="required")
    required = v3.engine.params[-1].regex
    assert "get_time" in required and "get_weather" in required and another_call in required
    _chat(v3, tool_choice="required", parallel_tool_calls=False)
    assert another_call not in v3.engine.params[-1].regex
    assert _chat(v3).choices and v3.engine.params[-1].regex is None  # auto: free


@pytest.fixture(scope="module")
def real(tok, tmp_path_factory):
    """A real tiny random model: only the constraint makes its output a call."""
    pytest.importorskip("outlines_core")
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tools") / "random"
    config = preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=2048)  # room for the tool specs
    nanoseek.save_model(Transformer(config), directory, tokenizer=tok)
    engine = nanoseek.LLM(directory, max_num_seqs=4)
    with ServerThread(create_app(engine, model_name="tiny")) as server:
        yield OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("tool_choice, names", [
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ("required", {"get_time", "get_weather"}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_choice_on_a_real_model(real, tool_choice, names, stream):
    # bounded strings, and one call: a random model would otherwise write a string, or call after
    # call, until max_tokens
    weather = json.loads(json.dumps(WEATHER))
    weather["function"]["parameters"]["properties"]["city"]["maxLength"] = 12
    time = json.loads(json.dumps(TIME))
    time["function"]["parameters"]["properties"]["tz"]["enum"] = ["UTC", "CET"]
    kwargs = dict(model="tiny", messages=ASK, tools=[weather, time], tool_choice=tool_choice, max_tokens=300,
                  temperature=0, parallel_tool_calls=False)
    if stream:
        _, _, calls, finish = collect_stream(real.chat.completions.create(stream=True, **kwargs))
    else:
        choice = real.chat.completions.create(**kwargs).choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
        finish = choice.finish_reason
        assert choice.message.content is None
    assert finish == "tool_calls" and calls
    for call in calls:
        assert call["name"] in names
        arguments = json.loads(call["arguments"])
        key = "tz" if call["name"] == "get_time" else "city"
        assert list(arguments) == [key] and isinstance(arguments[key], str)  # the function's schema


# ------------------------------------------------------------------ chat-prefix completion


@pytest.mark.parametrize("prefix_style", [{"prefix": True}, "continue_final_message"])
def test_prefix_completion_continues_the_last_assistant_message(v3, tok, prefix_style):
    v3.script = lambda prompt: "print('hi')\n```"
    last = {"role": "assistant", "content": "```python\n", **(prefix_style if isinstance(prefix_style, dict) else {})}
    extra = {"continue_final_message": True} if prefix_style == "continue_final_message" else {}
    r = v3.client.chat.completions.create(model="scripted", messages=[*ASK, last], extra_body=extra)
    assert r.choices[0].message.content == "print('hi')\n```"  # the continuation only, as DeepSeek returns it
    assert v3.engine.prompts[-1] == tok.apply_chat_template(ASK, add_generation_prompt=True) + "```python\n"


def test_prefix_completion_inside_reasoning(v3):
    """A prefix that leaves a <think> block open is continued as reasoning."""
    v3.script = lambda prompt: " carefully.</think>Sunny."
    last = {"role": "assistant", "content": "<think>Let me think", "prefix": True}
    message = v3.client.chat.completions.create(model="scripted", messages=[*ASK, last]).choices[0].message
    assert (message.reasoning_content, message.content) == ("carefully.", "Sunny.")


@pytest.mark.parametrize("body, param", [
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),  # without tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
      "tool_choice": "required"}, "tool_choice"),  # a schema the constraint cannot be built from
    ({"messages": [{"role": "assistant", "content": "x", "prefix": True}, *ASK]}, "messages[0].prefix"),
    ({"messages": [*ASK, {"role": "assistant", "content": "x"}], "continue_final_message": True,
      "add_generation_prompt": True}, "continue_final_message"),
    ({"messages": [*ASK, {"role": "tool"}]}, "messages[1].content"),
])
def test_tool_and_prefix_errors_are_400s_naming_the_field(v3, body, param):
    import httpx

    r = httpx.post(v3.thread.url + "/v1/chat/completions", json={"model": "scripted", "messages": ASK, **body},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
