"""Structured output: the generated text must match a JSON schema or a regex, enforced while decoding.

A request that sets `SamplingParams.json_schema` (or `regex`) gets a *guide*: a finite automaton
over token ids, built by outlines-core (the Rust core of outlines, one of vLLM's structured-output
backends) from the regex and the tokenizer's vocabulary. Before each token is sampled the guide's
allowed set masks the logits (everything else gets -inf), and the sampled token advances the guide.
When the guide reaches a state whose only allowed token is eos, the text is complete and the
sequence finishes. So the output matches the pattern unless max_tokens (or a stop string) cuts it
short first: then finish_reason is "length" and the text is a prefix of a match.

The pieces, from the most to the least shared:

- a `Vocabulary` per tokenizer: every token id mapped to the raw bytes it decodes to (special
  tokens, eos and the `<think>` markers left out, so they can never appear inside the JSON), since
  the regex is matched on bytes;
- an `Index` per (pattern, tokenizer): the compiled automaton. Compiling is the cost of the feature
  (a JSON schema with a few fields takes milliseconds; the generic JSON object that json_object
  asks for takes seconds at any vocabulary size: 4.2 s at 4k ids, 7.3 s at DeepSeek's 129k on one
  CPU core), so indexes are cached, and compiled once when requests ask at the same time (`GuideFactory`);
- a `Guide` per sequence: the current state in the index (cheap; n samples get one each).

JSON schemas become regexes through `outlines_core.json_schema.build_regex_from_schema`, whose
limits are the feature's: properties come in the schema's order, whitespace between tokens is at
most one space, and keywords it does not translate into the regex (minimum / maximum, for one)
are not enforced.

Reasoning models: when the prompt leaves the model inside a `<think>` block (R1's template ends
with "<think>\\n"; the rule is the reasoning splitter's, nanoseek.serve.reasoning), the constraint
starts only after the model writes `</think>`, so the reasoning stays free and the JSON is the
answer (`Sequence.guide_active`). Otherwise it starts at the first token, where `<think>` is not
allowed: letting the first token open a block instead would push any model whose likeliest
allowed tokens are unlikely into a block it may never close (tried: a random model then "reasoned"
in 4 of 6 requests). A model that writes its own `<think>` reasons under a constraint only with a
prompt that opens the block.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future

import torch

from nanoseek.errors import NanoseekError

JSON_OBJECT_SCHEMA = {"type": "object"}  # what response_format json_object enforces: any JSON object
MAX_CACHED_INDEXES = 64  # compiled patterns kept per tokenizer (least recently used go first)


class StructuredOutputError(NanoseekError):
    """A constraint that cannot be enforced; `param` names the SamplingParams field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _outlines():
    try:
        import outlines_core
    except ImportError:  # the serve extra installs it
        raise NanoseekError("structured output (json_schema, regex, response_format) needs outlines-core: "
                            "pip install 'nanoseek[serve]' (or pip install outlines-core)") from None
    return outlines_core


def schema_text(schema: "dict | str") -> str:
    """A JSON schema (a dict, or its JSON text) as compact JSON text, the cache key; raises
    ValueError for text that is not a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON object (a dict, or its JSON text)")
    return json.dumps(schema)  # key order kept: the JSON lists properties in the schema's order


def vocabulary_bytes(tokenizer) -> dict[bytes, list[int]]:
    """Raw bytes -> the token ids that decode to them, for every token a constrained text may use.

    The bytes come from `TokenText` (the byte-level alphabet inverted; SentencePiece's "▁" and
    <0xNN> byte tokens handled), which is what a token adds to the decoded text. Special tokens and
    the reasoning markers are left out: they are not text the pattern could mean. Several ids can
    share bytes (a byte-fallback token and a merged one), hence a list."""
    from nanoseek.tokenizer import TokenText

    token_text = TokenText(tokenizer)
    added = tokenizer.tk.get_added_tokens_decoder()
    excluded = {i for i, t in added.items() if t.special}
    excluded |= {i for i in (tokenizer.think_start_id, tokenizer.think_end_id) if i is not None}
    excluded |= set(tokenizer.eos_token_ids)
    table: dict[bytes, list[int]] = {}
    for i in range(tokenizer.vocab_size):
        if i not in excluded:
            raw = bytes(token_text(i)[1])
            if raw:
                table.setdefault(raw, []).append(i)
    return table


class GuideFactory:
    """One tokenizer's vocabulary and its cache of compiled indexes; hands out per-sequence guides.

    Thread-safe: the server compiles a request's pattern in a worker thread before admitting it
    (outlines-core releases the GIL while it compiles, so the engine thread keeps decoding), and
    the engine then finds it here."""

    def __init__(self, tokenizer):
        self.eos_id = tokenizer.eos_id
        self._tokenizer = weakref.ref(tokenizer)
        self._vocabulary = None
        self._indexes: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()
        self._vocabulary_lock = threading.Lock()
        self._compiling: dict[tuple[str, str], Future] = {}  # patterns being compiled now -> their result

    @property
    def vocabulary(self):
        with self._vocabulary_lock:  # built once (a second or so at 129k ids), whichever pattern comes first
            if self._vocabulary is None:
                self._vocabulary = _outlines().Vocabulary(self.eos_id, vocabulary_bytes(self._tokenizer()))
        return self._vocabulary

    def index(self, json_schema: "dict | str | None" = None, regex: str | None = None):
        """The compiled index of a JSON schema or a regex (cached); raises StructuredOutputError
        naming the field when it cannot be compiled.

        A pattern is compiled once even when several requests ask for it at the same time (the
        first json_object requests after a server starts, say): the first caller compiles, the
        others wait for its result (or its error) instead of spending the same seconds again."""
        param = "json_schema" if json_schema is not None else "regex"
        try:
            key = ("json_schema", schema_text(json_schema)) if json_schema is not None else ("regex", regex)
        except ValueError as e:
            raise StructuredOutputError(f"json_schema {e}", param) from None
        with self._lock:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
            compiling = self._compiling.get(key)
            first = compiling is None
            if first:
                compiling = self._compiling[key] = Future()
        if not first:
            return compiling.result()  # another thread is compiling it: its index, or its error
        try:
            index = self._compile(key, param)
        except Exception as e:  # the waiters get the same error
            with self._lock:
                del self._compiling[key]
            compiling.set_exception(e)
            raise
        with self._lock:  # in one step, so that no caller finds the pattern neither cached nor compiling
            del self._compiling[key]
            self._indexes[key] = index
            while len(self._indexes) > MAX_CACHED_INDEXES:
                self._indexes.popitem(last=False)
        compiling.set_result(index)
        return index

    def _compile(self, key: tuple[str, str], param: str):
        oc = _outlines()
        try:
            pattern = oc.json_schema.build_regex_from_schema(key[1]) if param == "json_schema" else key[1]
            return oc.Index(pattern, self.vocabulary)
        except (ValueError, TypeError, RuntimeError) as e:  # an unsupported schema, a regex that does not parse
            raise StructuredOutputError(f"{param} cannot be enforced: {e}", param) from None

    def guide(self, json_schema=None, regex=None):
        return _outlines().Guide(self.index(json_schema, regex))


_factories: "weakref.WeakKeyDictionary[object, GuideFactory]" = weakref.WeakKeyDictionary()
_factories_lock = threading.Lock()


def guide_factory(tokenizer) -> GuideFactory:
    """The GuideFactory of a tokenizer: one per tokenizer object, so engines that share a tokenizer
    share its compiled indexes."""
    with _factories_lock:
        if tokenizer not in _factories:
            _factories[tokenizer] = GuideFactory(tokenizer)
        return _factories[tokenizer]


def allowed_tokens(guides: list, vocab_size: int, device) -> torch.Tensor:
    """The tokens each guide allows now, as a bool mask (b, V) on `device`.

    Each guide writes its allowed set as a bitmask (token i is bit i % 32 of int32 word i // 32)
    on the host; it is unpacked on the device. Ids the tokenizer does not have (a model vocabulary
    padded past it) are never allowed."""
    words = torch.zeros(len(guides), (vocab_size + 31) // 32, dtype=torch.int32)  # (b, W)
    for row, guide in zip(words, guides):
        guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
    words = words.to(device)
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=device)) & 1  # (b, W, 32)
    return bits.view(len(guides), -1)[:, :vocab_size].bool()


def guide_complete(guide, eos_id: int) -> bool:
    """True when the text matches and nothing can follow it: the guide allows eos alone."""
    return guide.is_finished() and guide.get_tokens() == [eos_id]
