"""Tokenizers: any Hugging Face tokenizer directory, nanoseek's own BPE training, chat templates.

A tokenizer directory is what Hugging Face checkpoints carry: tokenizer.json, plus
tokenizer_config.json / special_tokens_map.json (bos, eos, pad and the `chat_template`) and, in a
checkpoint, generation_config.json (its `eos_token_id`, an int or a list, adds stop tokens).
`Tokenizer.from_dir` loads any such directory, DeepSeek's, Qwen's or Llama's, and takes the special
tokens from those files; DeepSeek's spellings are the default only where the files name none.

Chat templates are Jinja2, rendered in a sandbox (`ImmutableSandboxedEnvironment`, as transformers
does: a template is untrusted input) with the variables and helpers released templates use:
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`, `unk_token`,
`tools` (function specs, where a request offers them), `documents` (left empty), `raise_exception`,
`strftime_now`, `namespace`, a `tojson` that keeps non-ASCII text, `{% break %}` / `{% continue %}`,
and `{% generation %}` (TRL's assistant-mask marker, rendered as its body), plus a request's
`chat_template_kwargs` (V3.1's template reads `thinking`). The template is the checkpoint's own; a
nanoseek tokenizer saves DeepSeek-R1's format with DeepSeek-V3's function calling (`CHAT_TEMPLATE`)
in its tokenizer_config.json.

The released DeepSeek-V3.2 and V4 checkpoints ship no template but a Python encoder; for a directory
whose config.json says model_type "deepseek_v32" / "deepseek_v4" and whose tokenizer files carry no
template, `from_dir` picks nanoseek's rendering of that encoder (nanoseek.dsml), and
`Tokenizer.prompt_format` says which way prompts are built: "chat_template", "deepseek_v32",
"deepseek_v4", or None (no chat format). A template in the files always wins.

nanoseek's own BPE (`train_tokenizer`; no pretrained tokenizer can be downloaded at run time, and a
toy model wants a toy vocabulary) mirrors DeepSeek-V3's:

- byte-level BPE, so every UTF-8 string round-trips exactly and there is no unknown token;
- digits are split one per token before BPE (DeepSeek splits numbers into short runs too). A small
  model learns arithmetic far more easily when "1234" is four tokens than when it is an arbitrary
  merge like "12" + "34";
- the special tokens use DeepSeek-V3's exact spellings (full-width bars, U+2581 spaces), so prompts
  and chat templates written for DeepSeek models work unchanged. They take the first ids, so
  `bos=0, eos=1, pad=2` whatever the vocabulary size, which keeps model configs simple;
- `<think>` / `</think>` are single ids but *not* special: like DeepSeek-R1, decoding with
  `skip_special_tokens=True` keeps them, because the reasoning markers are part of the text.

The reasoning markers of any tokenizer are found in its vocabulary (`think_start` / `think_end`);
a tokenizer without them has no reasoning to split, and the server returns plain content. Where a
tokenizer registers them as special tokens (some ChatML ones do, through `additional_special_tokens`),
`decode(skip_special_tokens=True)` still keeps them and skips only the other special tokens.

CLI: `nanoseek tokenizer train --data PATH [PATH ...] --vocab-size N --out DIR`
(PATH: text files, jsonl/json/parquet with a text field, directories of those, or `default`). It also
writes DIR/training_data.json: what the BPE was trained on (the speedrun's report card names it).
"""

from __future__ import annotations

import functools
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek import dsml
from nanoseek.errors import ChatTemplateError, NanoseekError, check_out_dir

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # skipped by decode(skip_special_tokens=True)
RESERVED_TOKENS = SPECIAL_TOKENS + [THINK_START, THINK_END]  # ids 0..6, in this order
# DeepSeek-V3's function-calling markers (single tokens in its vocabulary, plain text in a nanoseek
# BPE): an assistant turn's calls are <｜tool▁calls▁begin｜>, one <｜tool▁call▁begin｜>...<｜tool▁call▁end｜>
# per call, <｜tool▁calls▁end｜>; the results come back in a <｜tool▁outputs▁begin｜> block.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_MARKERS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN,
                TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]

# DeepSeek-R1's chat format: bos, the system prompt(s) verbatim, then <｜User｜>content for each user
# turn and <｜Assistant｜>content<｜end▁of▁sentence｜> for each assistant turn; a generation prompt is a
# trailing <｜Assistant｜>. Unlike R1's released template we keep assistant content verbatim (R1 drops
# everything up to </think> from past turns), so SFT can render reasoning traces with the template.
#
# Function calling is DeepSeek-V3's (its released template, V3-0324's revision): an assistant turn's
# `tool_calls` follow its content as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
# \n```json\nARGUMENTS\n```<｜tool▁call▁end｜>, calls separated by "\n", then <｜tool▁calls▁end｜> and eos;
# `tool` messages after it form one <｜tool▁outputs▁begin｜> block of <｜tool▁output▁begin｜>result
# <｜tool▁output▁end｜> ("\n" between them), and the assistant's next message continues the same turn
# after <｜tool▁outputs▁end｜> (no new <｜Assistant｜>; a prompt that ends with tool results ends with
# that marker). For these messages the text is exactly V3's (tests render both). What V3's template
# does not do, this one does: `tools` (the request's function specs) are listed after the system
# prompt with the format to call them in, so a nanoseek model is told which functions exist.
# `Tokenizer.apply_chat_template` renders this template itself (sandboxed Jinja2, below); tests check
# the rendered format, and that transformers renders the same text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', first=true, in_outputs=false, first_output=true) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if not ns.first %}{% set ns.system = ns.system + '\\n\\n' %}{% endif -%}"
    "{%- set ns.system = ns.system + message['content'] -%}{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{{ ns.system }}"
    "{%- if tools -%}"
    "{%- if not ns.first %}{{ '\\n\\n' }}{% endif -%}"
    "{{ '## Tools\\nYou can call these functions (JSON schemas):\\n' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor -%}"
    "{{ '\\nTo call functions, write <｜tool▁calls▁begin｜>, then for each call <｜tool▁call▁begin｜>function"
    "<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜> (a newline between calls; ARGUMENTS is a "
    "JSON object that follows the parameters schema), then <｜tool▁calls▁end｜>.' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<｜User｜>' + message['content'] }}{%- set ns.in_outputs = false -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    # after tool results the model answers in the same turn: close the outputs, no new <｜Assistant｜>
    "{{ '<｜tool▁outputs▁end｜>' if ns.in_outputs else '<｜Assistant｜>' }}{{ message.get('content') or '' }}"
    "{%- set ns.in_outputs = false -%}"
    "{%- if message.get('tool_calls') -%}"
    "{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set arguments = call['function']['arguments'] -%}"
    "{{ '\\n' if not loop.first }}{{ '<｜tool▁call▁begin｜>' + call.get('type', 'function') + '<｜tool▁sep｜>' }}"
    "{{ call['function']['name'] + '\\n```json\\n' }}"
    "{{ arguments if arguments is string else arguments | tojson }}{{ '\\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor -%}"
    "{{ '<｜tool▁calls▁end｜>' }}{%- set ns.first_output = true -%}"
    "{%- endif -%}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<｜tool▁outputs▁begin｜>' if ns.first_output else '\\n' }}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- set ns.in_outputs = true -%}{%- set ns.first_output = false -%}"
    "{%- elif message['role'] != 'system' -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_outputs %}{{ '<｜tool▁outputs▁end｜>' }}"
    "{%- elif add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif -%}"
)


_DEFAULT = object()  # "not given": Tokenizer(tk) takes nanoseek's own (DeepSeek's) special tokens


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and chat format the stack needs.

    The inference engine, the trainers and the server all talk to this class; checkpoints carry it
    (`save(dir)` next to the weights, `Tokenizer.from_dir(dir)` to load). `Tokenizer(tk)` is a
    nanoseek BPE (DeepSeek's special tokens, `CHAT_TEMPLATE`); `from_dir` reads what a directory's
    files say. bos may be absent (Qwen2.5 has none); eos may not: generation needs a stop token.
    """

    def __init__(self, tk: HFTokenizer, *, bos_token=_DEFAULT, eos_token=_DEFAULT, pad_token=_DEFAULT,
                 unk_token: str | None = None, eos_token_ids: Iterable[int] = (), chat_template=_DEFAULT,
                 config: dict | None = None, generation_settings: dict | None = None, encoder: str | None = None):
        self.tk = tk
        self.unk_token = unk_token  # for chat templates only: a byte-level BPE has no unknown tokens
        own = bos_token is _DEFAULT and eos_token is _DEFAULT
        self.bos_token = BOS if bos_token is _DEFAULT else bos_token
        self.eos_token = EOS if eos_token is _DEFAULT else eos_token
        self.pad_token = (PAD if tk.token_to_id(PAD) is not None else None) if pad_token is _DEFAULT else pad_token
        for name in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, name)
            if token is not None and tk.token_to_id(token) is None:
                hint = " (train one with `nanoseek tokenizer train`)" if own else ""
                raise NanoseekError(f"the tokenizer's {name} {token!r} is not in its vocabulary{hint}")
        ids = [tk.token_to_id(self.eos_token)] if self.eos_token is not None else []
        self.eos_token_ids = list(dict.fromkeys(ids + [int(i) for i in eos_token_ids]))  # eos first, no repeats
        # A text prompt starts with bos where transformers' `tokenizer(text)` adds one: where
        # tokenizer.json's post-processor writes it (Llama-3's, R1-Distill's and nanoseek's do;
        # DeepSeek-V3's and Qwen2.5's don't). transformers 5 reads only that, never tokenizer_config.json's
        # add_bos_token. A nanoseek BPE saved before its tokenizer.json carried bos (no post-processor,
        # our reserved tokens at ids 0..6) was pretrained with bos all the same.
        legacy = tk.post_processor is None and all(tk.id_to_token(i) == t for i, t in enumerate(RESERVED_TOKENS))
        self.add_bos = self.bos_token is not None and (
            legacy or tk.encode("", add_special_tokens=True).ids[:1] == [tk.token_to_id(self.bos_token)])
        if not self.eos_token_ids:
            raise NanoseekError("the tokenizer names no eos token (tokenizer_config.json eos_token, or "
                                "generation_config.json eos_token_id): generation would never stop")
        if encoder is not None and encoder not in dsml.ENCODERS:
            raise NanoseekError(f"no prompt encoder {encoder!r}: nanoseek has {', '.join(dsml.ENCODERS)}")
        # The Python encoder of a released V3.2 / V4 checkpoint (nanoseek.dsml), used where there is no
        # chat template: from_dir names it for such a checkpoint (model_type in its config.json).
        self.encoder = encoder
        if chat_template is _DEFAULT:  # a DeepSeek vocabulary without a template of its own speaks R1's format
            deepseek = all(tk.token_to_id(t) is not None for t in (USER, ASSISTANT)) and self.bos_token == BOS
            chat_template = CHAT_TEMPLATE if deepseek and encoder is None else None
        self.chat_template: str | None = chat_template
        self.config = config  # tokenizer_config.json as loaded (None: a nanoseek BPE); save() writes it back
        # generation_config.json's sampling settings (R1-Distill: temperature 0.6, top_p 0.95, do_sample),
        # carried with the stop tokens so that a model fine-tuned from a released one keeps them when
        # saved, as transformers keeps model.generation_config
        self.generation_settings = dict(generation_settings or {})
        # The reasoning markers, where the vocabulary has them as single tokens (R1 and its distills do).
        has_think = all(tk.token_to_id(t) is not None for t in (THINK_START, THINK_END))
        self.think_start, self.think_end = (THINK_START, THINK_END) if has_think else (None, None)
        # Where the markers are registered as *special* added tokens (e.g. through
        # additional_special_tokens), skip_special_tokens would drop them and the reasoning split
        # would see no tags. decode keeps them: it drops the other special ids itself (None: the
        # markers are plain tokens, or absent, and tokenizers' own skipping is already right).
        special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        markers = [THINK_START, THINK_END, dsml.DSML] + TOOL_MARKERS  # the tool-call parser reads the text too
        kept = {tk.token_to_id(t) for t in markers} & special
        self._skipped_special_ids: frozenset[int] | None = frozenset(special - kept) if kept else None

    # ---- construction and persistence ----

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer or checkpoint directory: tokenizer.json, and the special tokens and chat
        template of tokenizer_config.json / special_tokens_map.json / chat_template.jinja and the
        stop tokens of generation_config.json, where present. A checkpoint of DeepSeek-V3.2 or V4
        (config.json's model_type) whose files carry no template gets that model's prompt encoder."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise NanoseekError(
                f"no tokenizer.json in {path}; point at a checkpoint or tokenizer directory, "
                "or train one with `nanoseek tokenizer train --data default --vocab-size 4096 --out DIR`"
            )
        config, special_map, generation = (_read_json(path / name) for name in (
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))
        kwargs = {}
        tk = HFTokenizer.from_file(str(file))
        if any(f"{name}_token" in src for name in ("bos", "eos") for src in (config, special_map)):
            # where the two files disagree, special_tokens_map.json wins, as in transformers
            for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
                kwargs[name] = next((_content(src[name]) for src in (special_map, config) if src.get(name)), None)
        elif tk.token_to_id(BOS) is None:
            raise NanoseekError(f"{path}: no tokenizer_config.json or special_tokens_map.json names the special "
                                "tokens (bos_token, eos_token), and the vocabulary has none of DeepSeek's; add the "
                                "files the tokenizer came with")
        eos = generation.get("eos_token_id")
        kwargs["eos_token_ids"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        kwargs["generation_settings"] = sampling_settings(generation)
        if isinstance(generation.get("do_sample"), bool):  # transformers samples only with it set
            kwargs["generation_settings"]["do_sample"] = generation["do_sample"]
        template = _config_template(config.get("chat_template"), path)
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 saves the template here
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None:
            kwargs["chat_template"] = template
        else:
            model_type = _read_json(path / "config.json").get("model_type")
            if model_type in dsml.ENCODERS:
                kwargs["encoder"] = model_type
        return cls(tk, config=config or None, **kwargs)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json.

        A nanoseek BPE's config uses the spellings both transformers 4 and 5 read
        (PreTrainedTokenizerFast, additional_special_tokens) rather than 5's own (TokenizersBackend,
        extra_special_tokens, which 4.x would reject), so vLLM and SGLang load the directory as well.
        A loaded tokenizer writes its own config back, its template inline.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(directory / "tokenizer.json"))
        special_map = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                          ("pad_token", self.tk.id_to_token(self.pad_id)),
                                          ("unk_token", self.unk_token)) if v is not None}
        if self.config is None:
            extra = [t for t in (USER, ASSISTANT) if self.tk.token_to_id(t) is not None]
            special_map["additional_special_tokens"] = extra
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **special_map,
                "unk_token": None,
                "add_bos_token": True,  # as tokenizer.json's post-processor does (transformers 4 reads this key)
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,  # decode must be exact
                "chat_template": self.chat_template,
            }
        else:
            config = {**self.config, **({"chat_template": self._config_template()} if self.chat_template else {})}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            (directory / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (directory / "chat_template.jinja").unlink(missing_ok=True)  # the inline template is the one

    def _config_template(self) -> str | list[dict]:
        """The template as tokenizer_config.json holds it: a list of named templates (default,
        tool_use, ...) stays a list, the default one ours."""
        named = self.config.get("chat_template") if self.config else None
        if not isinstance(named, list):
            return self.chat_template
        default = {"name": "default", "template": self.chat_template}
        if not any(t["name"] == "default" for t in named):
            return [default] + named
        return [default if t["name"] == "default" else t for t in named]

    # ---- encoding ----

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token spellings inside the text become their single ids."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text prompt as the models see one, as transformers' `tokenizer(text)` gives
        them: bos first where the tokenizer adds it (`add_bos`; a nanoseek BPE does, as pretraining
        stores its documents), unless the text already starts with it. The engine, the server and SFT
        all prompt through here."""
        ids = self.encode(text)
        return [self.bos_id] + ids if self.add_bos and ids[:1] != [self.bos_id] else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust; what data preparation uses)."""
        encodings = self.tk.encode_batch(texts, add_special_tokens=False)
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [bos + e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Skipping special tokens (bos, eos, pad, ...) always keeps <think>/</think>
        and DeepSeek's tool-call markers, even where the tokenizer registers them as special: they
        are part of the text, and the reasoning split and the tool-call parser (engine, server, chat
        CLI: all decode through here) need them."""
        ids = list(ids)
        if skip_special_tokens and self._skipped_special_ids is not None:
            ids = [i for i in ids if i not in self._skipped_special_ids]
            skip_special_tokens = False
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def prompt_format(self) -> str | None:
        """How `apply_chat_template` builds prompts: "chat_template" (the Jinja template), the name of
        a released model's encoder ("deepseek_v32", "deepseek_v4"; see nanoseek.dsml), or None."""
        return "chat_template" if self.chat_template is not None else self.encoder

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template_kwargs: dict | None = None) -> str:
        """Render a conversation with the tokenizer's chat template (sandboxed Jinja2), or with the
        encoder of a released DeepSeek-V3.2 / V4 checkpoint (`prompt_format`).

        messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}, ...]
        (assistant messages may carry OpenAI-style `tool_calls`, tool messages a `tool_call_id`);
        tools: function specs for the template's `tools`; continue_final_message: end the text
        inside the last message, so the model continues it (chat-prefix completion; no generation
        prompt then). The text is the prompt as transformers' `apply_chat_template` renders it;
        encode it with `encode(text)` (the template writes bos itself where the format has one).
        chat_template_kwargs: a request's extra template variables (vLLM's field; e.g. {"thinking": true}),
        or the encoder's options (nanoseek.dsml.prompt_options). The encoders write the generation
        prompt as part of a user turn (add_generation_prompt has no effect on them).
        Raises ChatTemplateError naming the problem when there is no template or it fails.
        """
        if self.chat_template is None and self.encoder is not None:
            return _encoded(self.encoder, messages, tools, continue_final_message, chat_template_kwargs)
        if self.chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat_template (tokenizer_config.json names none): "
                                    "use plain-text prompts (/v1/completions, `nanoseek generate`)")
        # pad and unk only where the tokenizer has them: transformers leaves the others undefined
        special = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   **{k: v for k, v in (("pad_token", self.pad_token), ("unk_token", self.unk_token)) if v is not None}}
        variables = dict(chat_template_kwargs or {})
        taken = sorted(set(variables) & {*special, "messages", "tools", "documents", "add_generation_prompt",
                                         "raise_exception", "namespace", "strftime_now"})
        if taken:
            raise ChatTemplateError(f"chat_template_kwargs cannot set {', '.join(taken)}: the request's own fields "
                                    "give those")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, tools=tools,
                                    continue_final_message=continue_final_message, **special, **variables)

    def check_chat_template(self) -> None:
        """Compile the chat template, if there is one: a syntax error is a ChatTemplateError now
        (the CLIs check before loading a model), not at the first request."""
        if self.chat_template is not None:
            _compile_chat_template(self.chat_template)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation, exactly as transformers' `apply_chat_template(tokenize=True)`:
        the template's text encoded as is (no bos added: the template writes it where it wants one)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    # ---- vocabulary ----

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a token string (e.g. "<think>"); a clear error if the vocabulary lacks it."""
        i = self.tk.token_to_id(token)
        if i is None:
            raise NanoseekError(f"token {token!r} is not in this tokenizer's vocabulary")
        return i

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        """The primary stop token; `eos_token_ids` has all of them (generation_config's list too)."""
        return self.eos_token_ids[0]

    @property
    def pad_id(self) -> int:
        """The pad token if the tokenizer has one, else eos (as in DeepSeek's own configs)."""
        return self.eos_id if self.pad_token is None else self.token_id(self.pad_token)

    @property
    def think_start_id(self) -> int | None:
        return None if self.think_start is None else self.token_id(self.think_start)

    @property
    def think_end_id(self) -> int | None:
        return None if self.think_end is None else self.token_id(self.think_end)


# generation_config.json fields that are sampling settings, with SamplingParams' names
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_settings(generation_config) -> dict:
    """The sampling settings among a generation_config.json's fields (numbers only)."""
    if not isinstance(generation_config, dict):
        return {}
    return {k: v for k, v in generation_config.items()
            if k in SAMPLING_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{path} is not valid JSON: {e}") from None


def _config_template(template, path: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"} entries
    (several named templates: the default one). Anything else is a ChatTemplateError now, not a
    Jinja crash at the first chat."""
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in template)
    if template is not None and not isinstance(template, str) and not named:
        raise ChatTemplateError(f"{path / 'tokenizer_config.json'}: chat_template is {template!r:.80}, which is not "
                                'a template: give a Jinja string or a list of {"name": ..., "template": ...} '
                                "entries, or remove the key")
    if named:
        return next((t["template"] for t in template if t["name"] == "default"), None)
    return template


def _encoded(encoder: str, messages: list[dict], tools: list[dict] | None, continue_final_message: bool,
             options: dict | None) -> str:
    """A prompt built by a released model's encoder (nanoseek.dsml), continued inside the last
    message as render_chat_template does it."""
    plain = [{k: v for k, v in m.items() if v is not None} for m in json.loads(json.dumps(messages))]
    if continue_final_message:
        if not plain or not isinstance(plain[-1].get("content"), str):
            raise ChatTemplateError("continuing the final message needs a last message with text content")
        plain[-1]["content"] += _CONTINUE_TAG
    text = dsml.encode(encoder, plain, tools, options)
    if continue_final_message:
        text = text[:text.rindex(_CONTINUE_TAG)]
    return text


def _content(token) -> str | None:
    """A special token as the config files write it: a string, or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


# ---- chat templates: sandboxed Jinja2, as transformers renders them ----


# Appended to the message a prefix completion continues; the rendered text is cut where it appears
# (transformers does the same), which works whatever the template writes after a message.
_CONTINUE_TAG = "\x00CONTINUE_FINAL_MESSAGE\x00"


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, *,
                         tools: list[dict] | None = None, continue_final_message: bool = False,
                         **variables) -> str:
    """Render a Hugging Face chat template. Templates are untrusted input (they come with a
    checkpoint), so they run in Jinja2's immutable sandbox and see plain JSON data only. Every
    failure, a syntax error, `raise_exception(...)` or a runtime error, is a ChatTemplateError
    that says what went wrong.

    `tools` is the template's `tools` (None: none offered). With `continue_final_message` the text
    stops at the end of the last message's content, without a generation prompt, as transformers'
    `continue_final_message=True` renders it; a template that drops part of that message (R1's
    drops past reasoning) cannot be continued, which is a ChatTemplateError."""
    import jinja2

    compiled = _compile_chat_template(template)
    plain = json.loads(json.dumps(messages))  # plain dicts, lists and strings: nothing with methods to abuse
    # a None field is left out, as transformers does ({"content": None} renders as no content, not "None")
    plain = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in plain]
    if continue_final_message:
        if not plain or not isinstance(plain[-1].get("content"), str):
            raise ChatTemplateError("continuing the final message needs a last message with text content")
        plain[-1]["content"] += _CONTINUE_TAG
        add_generation_prompt = False
    try:
        text = compiled.render(messages=plain, add_generation_prompt=add_generation_prompt,
                               tools=json.loads(json.dumps(tools)) if tools is not None else None,
                               documents=None, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - a template's runtime error (e.g. None + str) is the template's
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
    if continue_final_message:
        if _CONTINUE_TAG not in text:
            raise ChatTemplateError("the chat template does not write the final message as it is (it drops or "
                                    "changes part of it), so it cannot be continued")
        text = text[:text.rindex(_CONTINUE_TAG)]
    return text


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        # namespace(...) attributes that start with "_" could reach Python internals: refuse them
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    class Generation(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks the assistant's text for transformers' assistant
        # masks (TRL's templates have it). Rendered as its body in a call block, as transformers does
        # (so variables set inside stay inside); sft computes the masks itself.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs, cached.

    With a byte-level BPE one token may be half of a multi-byte character, so decoding a single
    token gives U+FFFD; OpenAI's `bytes` field exists for exactly that, and we recover the exact bytes
    by inverting the byte-level alphabet (the GPT-2 bytes_to_unicode table). SentencePiece-style
    vocabularies (Llama-2, Mistral, Gemma) write a space as "▁" and, with byte fallback, a byte as
    "<0xC3>": a token's text keeps its leading space (decoding it alone would strip it), and a byte
    token's bytes are that byte, so a completion's tokens join into its text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        chars, extra = dict(), 0
        for b in range(256):
            if b in printable:
                chars[chr(b)] = b
            else:
                chars[chr(256 + extra)] = b
                extra += 1
        self.byte_of_char = chars
        # the decoder says which style the pieces are in (Metaspace or Replace("▁", " "); ByteFallback)
        decoder = tokenizer.tk.decoder if hasattr(tokenizer, "tk") else None
        self.metaspace = decoder is not None and decoder.decode(["a", "▁b"]) == "a b"
        self.byte_fallback = decoder is not None and decoder.decode(["<0x41>"]) == "A"
        self.added = set(tokenizer.tk.get_added_tokens_decoder()) if self.metaspace else set()

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tokenizer.tk.id_to_token(token_id) if hasattr(self.tokenizer, "tk") else None
            byte = self.byte_fallback and piece is not None and re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if piece is None or token_id in self.added:  # special and added tokens are stored as plain text
                raw = self.tokenizer.decode([token_id]).encode()
            elif byte:
                raw = bytes([int(byte[1], 16)])
            elif self.metaspace:
                raw = piece.replace("▁", " ").encode()
            elif all(c in self.byte_of_char for c in piece):
                raw = bytes(self.byte_of_char[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token_id]).encode()
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids (special tokens included) on an iterable of texts.

    Deterministic for a given input. The result can be smaller than asked for when the corpus has
    too few distinct merges; `Tokenizer.vocab_size` is the truth.
    """
    min_size = 256 + len(RESERVED_TOKENS)  # the byte alphabet plus our reserved tokens
    if vocab_size < min_size:
        raise NanoseekError(f"vocab size {vocab_size} is too small; a byte-level BPE needs at least {min_size}")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=RESERVED_TOKENS,  # reserves ids 0..6 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    # The trainer registers every reserved token as special; re-register the think markers as
    # plain added tokens (same ids) so skip_special_tokens keeps them. The live object keeps its
    # old set of special ids until it is rebuilt from its serialized form, hence the round trip.
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    # bos before every text, as pretraining stores documents: transformers' `tokenizer(text)` (and
    # vLLM's completions) add it from here, as our `encode_prompt` does
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                                      special_tokens=[(BOS, 0)])
    return Tokenizer(HFTokenizer.from_str(tk.to_str()))


# ---- CLI: nanoseek tokenizer train ----


TRAINING_DATA = "training_data.json"  # beside tokenizer.json: the --data, and the documents of each source


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>")
    sub.required = True
    p = sub.add_parser("train", help="train a byte-level BPE on text/jsonl/json/parquet files or the default corpus")
    p.add_argument("--data", nargs="+", required=True,
                   help="text, jsonl or parquet files, directories of them, "
                        "'default' (Shakespeare + synthetic reasoning), or a 'synthetic:NAME?key=value' spec")
    p.add_argument("--vocab-size", type=int, default=4096, help="total ids, special tokens included")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/json/parquet rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the default corpus's synthetic documents")


def run(args) -> int:
    from nanoseek.data.corpus import load_sources

    check_out_dir(args.out, "--out")  # before the corpus is read and the BPE trained
    sources = load_sources(args.data, text_field=args.text_field, seed=args.seed)
    texts = [doc for _, docs in sources for doc in docs]
    if not any(texts):
        raise NanoseekError(f"no text to train on in {' '.join(args.data)}: every document is empty")
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, args.vocab_size)
    seconds = time.perf_counter() - t0
    tok.save(args.out)
    n_chars = sum(len(t) for t in texts)
    record = {"data": args.data, "vocab_size": tok.vocab_size, "sources": {
        name: {"documents": len(docs), "chars": sum(map(len, docs))} for name, docs in sources}}
    (Path(args.out) / TRAINING_DATA).write_text(json.dumps(record, indent=2) + "\n")
    print(f"trained a {tok.vocab_size}-id BPE on {len(texts)} documents ({n_chars:,} chars) "
          f"in {seconds:.1f}s -> {args.out}")
    return 0
