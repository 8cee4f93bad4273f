"""Byte-level BPE tokenizer with DeepSeek's special tokens and DeepSeek-R1's chat template.

We train our own small BPE with HF `tokenizers` (no pretrained tokenizer can be downloaded at run
time, and a toy model wants a toy vocabulary). The design mirrors DeepSeek-V3's tokenizer:

- byte-level BPE, so every UTF-8 string round-trips exactly and there is no unknown token;
- digits are split one per token before BPE (DeepSeek splits numbers into short runs too). A small
  model learns arithmetic far more easily when "1234" is four tokens than when it is an arbitrary
  merge like "12" + "34";
- the special tokens use DeepSeek-V3's exact spellings (full-width bars, U+2581 spaces), so prompts
  and chat templates written for DeepSeek models work unchanged. They take the first ids, so
  `bos=0, eos=1, pad=2` whatever the vocabulary size, which keeps model configs simple;
- `<think>` / `</think>` are single ids but *not* special: like DeepSeek-R1, decoding with
  `skip_special_tokens=True` keeps them, because the reasoning markers are part of the text.

A saved tokenizer directory (tokenizer.json + tokenizer_config.json + special_tokens_map.json) is
what Hugging Face checkpoints carry: `transformers.AutoTokenizer.from_pretrained(dir)` loads it
offline and gives the same ids, and its `apply_chat_template` renders the same string as
`Tokenizer.apply_chat_template` here.

CLI: `nanoseek tokenizer train --data PATH [PATH ...] --vocab-size N --out DIR`
(PATH: text files, jsonl/parquet with a text field, directories of those, or `default`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.errors import NanoseekError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # skipped by decode(skip_special_tokens=True)
RESERVED_TOKENS = SPECIAL_TOKENS + [THINK_START, THINK_END]  # ids 0..6, in this order

# DeepSeek-R1's chat format: bos, the system prompt(s) verbatim, then <｜User｜>content for each user
# turn and <｜Assistant｜>content<｜end▁of▁sentence｜> for each assistant turn; a generation prompt is a
# trailing <｜Assistant｜>. Unlike R1's released template we keep assistant content verbatim (R1 drops
# everything up to </think> from past turns), so SFT can render reasoning traces with the template.
# `Tokenizer.apply_chat_template` is the same logic in Python; a test keeps the two in step.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if not ns.first %}{% set ns.system = ns.system + '\\n\\n' %}{% endif -%}"
    "{%- set ns.system = ns.system + message['content'] -%}{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{{ ns.system }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] != 'system' -%}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif -%}"
)


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and chat format the stack needs.

    The inference engine, the trainers and the server all talk to this class; checkpoints carry it
    (`save(dir)` next to the weights, `Tokenizer.from_dir(dir)` to load).
    """

    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        missing = [t for t in (BOS, EOS) if tk.token_to_id(t) is None]
        if missing:
            raise NanoseekError(
                f"tokenizer has no {' / '.join(missing)} token; nanoseek needs DeepSeek's special tokens "
                "(train one with `nanoseek tokenizer train`)"
            )

    # ---- construction and persistence ----

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from a tokenizer or checkpoint directory."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise NanoseekError(
                f"no tokenizer.json in {path}; point at a checkpoint or tokenizer directory, "
                "or train one with `nanoseek tokenizer train --data default --vocab-size 4096 --out DIR`"
            )
        return cls(HFTokenizer.from_file(str(file)))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

        The config uses the spellings both transformers 4 and 5 read (PreTrainedTokenizerFast,
        additional_special_tokens) rather than 5's own (TokenizersBackend, extra_special_tokens, which
        4.x would reject), so vLLM and SGLang load the directory as well.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(directory / "tokenizer.json"))
        extra = [t for t in (USER, ASSISTANT) if self.tk.token_to_id(t) is not None]
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": self.tk.id_to_token(self.pad_id),
                       "additional_special_tokens": extra}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "unk_token": None,
            "add_bos_token": False,  # the chat template writes bos itself; encode(add_bos=True) otherwise
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # decode must be exact
            "chat_template": CHAT_TEMPLATE,
        }
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            (directory / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- encoding ----

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token spellings inside the text become their single ids."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a text prompt as the models see one: bos first, as pretraining stores its
        documents, unless the text already starts with it (the chat template writes it itself).
        The engine, the server and SFT all prompt through here."""
        ids = self.encode(text)
        return ids if ids[:1] == [self.bos_id] else [self.bos_id] + ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust; what data preparation uses)."""
        encodings = self.tk.encode_batch(texts, add_special_tokens=False)
        return [([self.bos_id] if add_bos else []) + e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Skipping special tokens keeps <think>/</think> (they are not special)."""
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation in DeepSeek-R1's format (the same string as `CHAT_TEMPLATE`).

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. Encode the
        result with `encode(text)` (not add_bos: the template already starts with bos).
        """
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        parts = [BOS, system]
        for m in messages:
            if m["role"] == "user":
                parts.append(USER + m["content"])
            elif m["role"] == "assistant":
                parts.append(ASSISTANT + m["content"] + EOS)
            elif m["role"] != "system":
                raise NanoseekError(f"unknown chat role {m['role']!r}; use system, user or assistant")
        if add_generation_prompt:
            parts.append(ASSISTANT)
        return "".join(parts)

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
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        """The pad token if the vocabulary has one, else eos (as in DeepSeek's own configs)."""
        i = self.tk.token_to_id(PAD)
        return self.eos_id if i is None else i

    @property
    def think_start_id(self) -> int:
        return self.token_id(THINK_START)

    @property
    def think_end_id(self) -> int:
        return self.token_id(THINK_END)


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs, cached.

    With a byte-level BPE one token may be half of a multi-byte character, so decoding a single
    token gives U+FFFD; OpenAI's `bytes` field exists for exactly that, and we recover the exact bytes
    by inverting the byte-level alphabet (the GPT-2 bytes_to_unicode table).
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

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tokenizer.tk.id_to_token(token_id) if hasattr(self.tokenizer, "tk") else None
            if piece is not None and all(c in self.byte_of_char for c in piece):
                raw = bytes(self.byte_of_char[c] for c in piece)
            else:  # special and added tokens are stored as plain text
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
    return Tokenizer(HFTokenizer.from_str(tk.to_str()))


# ---- CLI: nanoseek tokenizer train ----


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>")
    sub.required = True
    p = sub.add_parser("train", help="train a byte-level BPE on text/jsonl/parquet files or the default corpus")
    p.add_argument("--data", nargs="+", required=True,
                   help="text, jsonl or parquet files, directories of them, "
                        "or 'default' (Shakespeare + synthetic reasoning)")
    p.add_argument("--vocab-size", type=int, default=4096, help="total ids, special tokens included")
    p.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the default corpus's synthetic documents")


def run(args) -> int:
    from nanoseek.data.corpus import load_sources

    sources = load_sources(args.data, text_field=args.text_field, seed=args.seed)
    texts = [doc for _, docs in sources for doc in docs]
    if not any(texts):
        raise NanoseekError(f"no text to train on in {' '.join(args.data)}: every document is empty")
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, args.vocab_size)
    seconds = time.perf_counter() - t0
    tok.save(args.out)
    n_chars = sum(len(t) for t in texts)
    print(f"trained a {tok.vocab_size}-id BPE on {len(texts)} documents ({n_chars:,} chars) "
          f"in {seconds:.1f}s -> {args.out}")
    return 0
