"""DeepSeek-V4's release format (checkpoint.py's module docstring): FP8 (e4m3) linears with ue8m0
scales per 128 x 128 block, routed experts in FP4 (e2m1, two values a byte, low nibble first) with a
ue8m0 scale per 32 inputs, each scale in `X.scale` beside `X.weight`, under DeepSeek's prefix-less
names, sharded. A v4-tiny model is written in that format by this file's own quantizers (the
format as the release stores it; the rounding is whatever a quantizer picks, the loader does not
care) and then: the dequantization equals transformers' (`Fp8Dequantize._dequantize_one`, its FP4
unpacking, run on CPU), the loaded weights equal the quantize -> dequantize round trip, the logits
equal those of the same weights loaded from fp32, transformers' DeepseekV4ForCausalLM loads the
directory (dequantizing on CPU) with equal logits, and bad scales are errors naming the tensor.

The FP8 block is 16 x 16 here (config.json's weight_block_size, which nanoseek honours) so that
v4-tiny's small matrices hold several blocks each way; the release's is 128 x 128.
"""

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from test_v4 import PARITY

from nanoseek.checkpoint import (convert_checkpoint_tensors, dequantize, dequantize_fp4, load_model, read_tensors,
                                 save_model, v4_released_key)
from nanoseek.cli import main as cli_main
from nanoseek.config import preset
from nanoseek.errors import CheckpointError
from nanoseek.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.deepseek_v4")
from transformers.integrations.finegrained_fp8 import Fp8Dequantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = (16, 16)
# which release tensors are quantized (DeepSeek's inference/model.py: Linear's default dtype is FP8,
# the routed experts' FP4; the compressors, weights_proj, the router, embedding and head are not)
FP8_KEY = re.compile(r"layers\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123])\.weight")
FP4_KEY = re.compile(r"layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight")
FP32_KEY = re.compile(r".*(hc_|attn_sink|\.ape$|gate\.bias$).*")  # kept in fp32 by the release


# ---------------------------------------------------------------- the release format, written here


def ue8m0(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The power-of-two scale that brings `amax` within `top` (a ue8m0 value)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / top)))


def quantize_fp8(w: torch.Tensor, block=BLOCK):
    """(out, in) -> float8_e4m3fn weight and its ue8m0 scale per block (out/b0, in/b1)."""
    rows, cols = w.shape
    scale = ue8m0(w.abs().reshape(rows // block[0], block[0], cols // block[1], block[1]).amax(dim=(1, 3)), 448.0)
    q = (w / scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitudes of codes 0-7; 8-15 negative


def quantize_fp4(w: torch.Tensor):
    """(out, in) -> int8 (out, in/2), two e2m1 codes a byte (column 2j in the low nibble), and a
    ue8m0 scale per 32 inputs (out, in/32)."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 32, 32)
    scale = ue8m0(groups.abs().amax(-1), 6.0)
    x = (groups / scale[..., None]).reshape(rows, cols)
    codes = (x.abs()[..., None] - E2M1).abs().argmin(-1) + 8 * (x < 0)  # nearest magnitude, sign bit 3
    return (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).view(torch.int8), scale.to(torch.float8_e8m0fnu)


def release_tensors(model: Transformer):
    """The model's tensors as DeepSeek releases V4: (weights, scales) by release name, and the
    state dict the round trip gives (what the loader must produce), by nanoseek's names."""
    weights, scales, expected = {}, {}, {}
    for key, t in model.state_dict().items():
        name = v4_released_key(key)
        if FP4_KEY.fullmatch(name) or FP8_KEY.fullmatch(name):
            q, s = quantize_fp4(t) if FP4_KEY.fullmatch(name) else quantize_fp8(t)
            weights[name], scales[name.removesuffix("weight") + "scale"] = q, s
            expected[key] = dequantize(name, q, s, BLOCK)
        elif name.endswith("tid2eid"):
            weights[name] = expected[key] = t.to(torch.int32)  # the release's int32 table
        else:
            weights[name] = t if FP32_KEY.fullmatch(name) else t.to(torch.bfloat16)
            expected[key] = weights[name].float()
    return weights, scales, expected


def release_config(config) -> dict:
    d = config.to_dict()
    d.update(torch_dtype="bfloat16", expert_dtype="fp4",
             quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "scale_fmt": "ue8m0", "weight_block_size": list(BLOCK)})
    return d


def write_release(path, config: dict, *shards: dict):
    """config.json and the shards (with an index when there are several), as the release ships them."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A v4-tiny model with random weights written in the release format, its scales in a second
    shard (a weight and its scale in different files, as in the release's shards). test_v4's parity
    settings: with v4-tiny's 4 index heads an index score can tie, which transformers breaks otherwise."""
    config = preset("v4-tiny", **PARITY)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
            if p.dim() == 2:  # magnitudes that vary by row and by 16 x 16 block, so the scales differ
                rows, cols = p.shape
                blocks = torch.randint(-2, 2, (-(-rows // 16), -(-cols // 16)), generator=g).float()
                p.mul_(torch.exp2(blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:rows, :cols]))
                p.mul_(torch.exp2(torch.randint(-2, 2, (rows, 1), generator=g).float()))
    weights, scales, expected = release_tensors(model)
    path = write_release(tmp_path_factory.mktemp("release") / "v4", release_config(config), weights, scales)
    return path, model, weights, scales, expected


def ids(seed=1):
    return torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- dequantization against transformers


def test_fp4_nibble_order_and_values():
    """Byte 0x21 holds codes 1 (low nibble: the first column) and 2; 0x9f holds -6 then -0.5."""
    packed = torch.tensor([[0x21, 0x9F] * 16], dtype=torch.uint8).view(torch.int8)  # (1, 32): 64 values
    scale = torch.tensor([[1.0, 0.25]])
    w = dequantize_fp4(packed, scale)
    assert w.shape == (1, 64)
    assert w[0, :4].tolist() == [0.5, 1.0, -6.0, -0.5] and w[0, 32:36].tolist() == [0.125, 0.25, -1.5, -0.125]
    torch.testing.assert_close(w, transformers_dequantize(packed, scale), atol=0, rtol=0)


def transformers_dequantize(weight, scale):
    """transformers' dequantization (the block size taken from the scale grid, FP4 unpacked from int8)."""
    return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32).reshape(weight.shape[0], -1)


def test_dequantization_equals_transformers(release):
    """Every quantized tensor of the checkpoint, FP8 and FP4, dequantizes to exactly what
    transformers' Fp8Dequantize computes from the same bytes; ue8m0 scales stored as raw exponent
    bytes (uint8) read the same; and the quantization was not trivial (several blocks per matrix,
    the FP4 weights off the originals by more than the FP8 ones)."""
    _, model, weights, scales, _ = release
    n_fp8 = n_fp4 = 0
    for name, s in scales.items():
        key = name.removesuffix("scale") + "weight"
        w = weights[key]
        ours = dequantize(key, w, s, BLOCK)
        torch.testing.assert_close(ours, transformers_dequantize(w, s), atol=0, rtol=0)
        assert torch.equal(dequantize(key, w, s.view(torch.uint8), BLOCK), ours)
        n_fp4 += w.dtype == torch.int8
        n_fp8 += w.dtype == torch.float8_e4m3fn
        assert len(set(s.float().flatten().tolist())) > 1  # blocks of different scales
    # every layer's 8 experts x 3; every layer's 5 attention and 3 shared-expert linears, and the
    # indexer's wq_b in the 2 CSA layers
    assert (n_fp4, n_fp8) == (4 * 8 * 3, 4 * 8 + 2)
    sd = model.state_dict()
    fp4_err = (dequantize("x.weight", *quantize_fp4(sd["model.layers.2.mlp.experts.0.gate_proj.weight"]), BLOCK)
               - sd["model.layers.2.mlp.experts.0.gate_proj.weight"]).abs().max()
    fp8_err = (dequantize("x.weight", *quantize_fp8(sd["model.layers.2.self_attn.q_b_proj.weight"]), BLOCK)
               - sd["model.layers.2.self_attn.q_b_proj.weight"]).abs().max()
    assert fp4_err > fp8_err > 0


# ---------------------------------------------------------------- loading


def test_release_checkpoint_loads_as_its_round_trip(release, tmp_path):
    """load_model dequantizes every FP8 / FP4 tensor while reading: the weights equal the quantize ->
    dequantize round trip (the bf16 ones their bf16 values), exactly; the logits equal those of the
    same weights saved in fp32 and loaded; a bf16 load holds the same values rounded to bf16; and
    training's init= path (convert_checkpoint_tensors) dequantizes the same."""
    path, model, _, _, expected = release
    ours = load_model(path)
    state = ours.state_dict()
    assert set(state) == set(expected)
    for key, t in expected.items():
        assert torch.equal(state[key], t.to(state[key].dtype)), key
    reference = Transformer(model.config).eval()
    reference.load_state_dict(expected)
    save_model(reference, tmp_path / "fp32")
    fp32 = load_model(tmp_path / "fp32")
    x = ids()
    with torch.no_grad():
        logits = ours(x).logits
        torch.testing.assert_close(logits, fp32(x).logits, atol=0, rtol=0)
        assert (logits - model(x).logits).abs().max() > 1e-3  # the quantization moved them
    half = load_model(path, dtype="bfloat16").state_dict()
    for key, t in expected.items():
        assert torch.equal(half[key], t.to(half[key].dtype)), key
    raw = json.loads((path / "config.json").read_text())
    converted = convert_checkpoint_tensors(read_tensors(path), model.config, raw["quantization_config"])
    for key, t in expected.items():
        assert torch.equal(converted[key].to(t.dtype), t), key


def test_transformers_loads_the_release_checkpoint_with_equal_logits(release):
    """transformers reads the same directory (it renames `.scale` to `.weight_scale_inv` and, with no
    GPU, dequantizes while loading): its logits equal nanoseek's."""
    path, model, _, _, _ = release
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = ids(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, load_model(path)(x).logits, atol=0, rtol=0)


def test_info_reports_the_stored_formats(release, capsys):
    path, _, _, _, _ = release
    assert cli_main(["info", "--model", str(path), "--json"]) == 0
    formats = json.loads(capsys.readouterr().out)["stored_formats"]
    assert formats["FP4 e2m1, ue8m0 scales"]["tensors"] == 96
    assert formats["FP8 e4m3, ue8m0 scales"]["tensors"] == 34
    assert {"bf16", "fp32", "int32"} <= set(formats)
    assert cli_main(["info", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weights as stored:" in out and "FP4 e2m1, ue8m0 scales: 96 tensors" in out


# ---------------------------------------------------------------- bad scales


EXPERT = "layers.2.ffn.experts.5.w2.weight"  # FP4 (64, 32) packed as (64, 16), one scale per row
LINEAR = "layers.1.attn.wq_b.weight"  # FP8 (128, 32): an 8 x 2 grid of 16 x 16 blocks


def scale_of(name):
    return name.removesuffix("weight") + "scale"


@pytest.mark.parametrize("change, message", [
    (lambda w, s: s.pop(scale_of(LINEAR)), f"{LINEAR} is FP8 but has no {LINEAR}_scale_inv or {scale_of(LINEAR)} beside it"),
    (lambda w, s: s.pop(scale_of(EXPERT)), rf"{EXPERT} is int8 \(FP4, two values a byte\) but has no"),
    (lambda w, s: s.update({scale_of(LINEAR): s[scale_of(LINEAR)][:4]}),
     rf"{LINEAR}: FP8 scale grid \(4, 2\) does not fit weight \(128, 32\) with 16x16 blocks"),
    (lambda w, s: s.update({scale_of(EXPERT): s[scale_of(EXPERT)].repeat(1, 2)}),
     rf"{EXPERT}: FP4 scales \(64, 2\) do not fit weight \(64, 32\) \(packed \(64, 16\)\): expected \(64, 1\)"),
    (lambda w, s: s.update({scale_of(EXPERT): torch.full((64, 1), 255, dtype=torch.uint8).view(torch.float8_e8m0fnu)}),
     f"the scale of {EXPERT} holds scales that are not finite"),
    (lambda w, s: s.update({scale_of(LINEAR): s[scale_of(LINEAR)].float().to(torch.int32)}),
     f"the scale of {LINEAR} is stored as int32, which is no scale format"),
    (lambda w, s: w.update({LINEAR: w[LINEAR].float()}), f"{LINEAR} has a scale beside it but is stored as float32"),
])
def test_bad_scales_are_errors_naming_the_tensor(release, tmp_path, change, message):
    path, model, weights, scales, _ = release
    weights, scales = dict(weights), dict(scales)
    change(weights, scales)
    bad = write_release(tmp_path / "bad", release_config(model.config), {**weights, **scales})
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_a_bad_block_size_is_an_error(release, tmp_path):
    path, model, weights, scales, _ = release
    config = release_config(model.config)
    config["quantization_config"]["weight_block_size"] = [16]
    bad = write_release(tmp_path / "bad", config, {**weights, **scales})
    with pytest.raises(CheckpointError, match=r"weight_block_size is \[16\]: expected two positive integers"):
        load_model(bad)
