"""`nanoseek info` on dense (Llama / Qwen2) checkpoints: counts from the built model, GQA's cache."""

import json

import torch

from nanoseek.cli import main
from nanoseek.info import model_stats
from nanoseek.model.dense import DenseTransformer, dense_preset


def test_info_on_a_dense_checkpoint_counts_params_and_the_gqa_cache(tmp_path, capsys):
    """It once died with `'DenseConfig' object has no attribute 'is_moe_layer'`."""
    for overrides in ({}, {"model_type": "qwen2", "tie_word_embeddings": False}):
        config = dense_preset("student-tiny", **overrides)  # 4 query heads, 2 key/value heads of 8 dims
        with torch.device("meta"):
            assert model_stats(config).total_params == DenseTransformer(config).num_parameters()
    config.to_json(tmp_path / "config.json")

    assert main(["info", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "qwen2 (dense)" in out and "experts: none" in out and "MTP): none" in out
    assert "GQA keys+values      32 values/layer" in out and "2.0x smaller" in out

    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["total_params"] == figures["active_params"] == model_stats(config).total_params
    # 2 layers x (keys + values) x 2 heads x 8 dims x 2 bytes; multi-head attention would cache 4 heads
    assert figures["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 2 and figures["kv_vs_mha"] == 2.0
    assert figures["attention"] == "GQA" and "mla_cache_bytes_per_token" not in figures


def test_output_piped_into_a_reader_that_leaves_is_no_traceback(monkeypatch):
    """`nanoseek info --preset v3 | head -1`: the closed pipe ended in a BrokenPipeError traceback."""
    import io
    import os
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: every write raises BrokenPipeError
    stdout = io.TextIOWrapper(os.fdopen(write_end, "wb", buffering=0), write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["info", "--preset", "v3"]) == 141
    stdout.write("after the reader left: no error\n")  # stdout now points at /dev/null
