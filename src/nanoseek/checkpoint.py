"""Hugging Face-format checkpoints: nanoseek's native format.

A checkpoint directory is a valid `DeepseekV3ForCausalLM` checkpoint (`DeepseekV32ForCausalLM` for a
model with DeepSeek Sparse Attention; an mHC model's model_type is nanoseek's own "deepseek_v3_mhc",
which transformers refuses rather than load without its hyper-connections, see config.py):
config.json, model.safetensors (or shards plus model.safetensors.index.json),
generation_config.json, and the tokenizer files when a tokenizer is saved with it. transformers and
vLLM load it as is; released DeepSeek checkpoints (V2, V3, R1, V3.2), FP8 block-quantized ones
included, load into nanoseek. FP8 dequantization is by key, so it covers every `*.weight` with a
`*.weight_scale_inv` beside it (V3.2's indexer wq_b and wk too); the tensors released unquantized
(norms, V3.2's indexer k_norm and weights_proj) load in any float dtype. Dense students
(`nanoseek.model.dense`) are saved by the same code as `LlamaForCausalLM` / `Qwen2ForCausalLM`
directories, and `load_model` picks the model class from config.json's model_type.

A DeepSeek-V4 model (config.py's layer_types set) is saved as transformers' `DeepseekV4ForCausalLM`
saves one: its config.json (model_type "deepseek_v4") and its tensor names, DeepSeek's own
(`model.layers.{L}.attn.wq_a.weight`, `.ffn.experts.{e}.w1.weight`, `head.weight`, ...; `v4_checkpoint_key`
maps nanoseek's module names, which are transformers' in-memory ones, to them). Loading accepts
those names, the same without the `model.` prefix as DeepSeek's release spells them (`embed.weight`,
`hc_head_fn`; its `mtp.*` tensors are dropped, as transformers drops them), and transformers'
in-memory names with the experts stacked (`mlp.experts.gate_up_proj` (E, 2F, D), `down_proj`
(E, D, F), from `save_pretrained(save_original_format=False)`), split here into per-expert weights.

DeepSeek's V4 release format (DeepSeek-V4-Flash and its kin) is read too, dequantized to the
requested dtype tensor by tensor as the weights are read. What it holds (checked against DeepSeek's
V4 inference code, `inference/model.py` `Linear` and `inference/convert.py`
`cast_e2m1fn_to_e4m3fn`, in the public copies the search tools find, and against transformers 5.24:
`integrations/finegrained_fp8.py` `Fp8Dequantize` with `_unpack_fp4`, `FP8Experts`'
`expert_dtype == "fp4"` storage, `quantizers/quantizer_finegrained_fp8.py`'s `.scale` renaming,
`FineGrainedFP8Config`, and `DeepseekV4Config`, which folds a top-level `expert_dtype` into the
quantization config):
- config.json: `"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
  "weight_block_size": [128, 128], "activation_scheme": "dynamic"}` and `"expert_dtype": "fp4"`
  (top level, or inside quantization_config in transformers' newer files).
- FP8, every linear of attention and of the shared expert (`attn.wq_a`, `wq_b`, `wkv`, `wo_a`,
  `wo_b`, `attn.indexer.wq_b`, `ffn.shared_experts.w1/w2/w3`): float8_e4m3fn `X.weight` (out, in) with
  `X.scale` (ceil(out/128), ceil(in/128)) beside it, one scale per 128 x 128 block as in V3, stored
  as ue8m0 (safetensors F8_E8M0, torch float8_e8m0fnu: a bare power of two, 2^(byte - 127)). The
  scale multiplies (W = W_fp8 * scale), as V3's `weight_scale_inv` does; transformers renames
  `.scale` to `.weight_scale_inv` on load, and files it saves spell it so: both names are read.
- FP4, the routed experts (`ffn.experts.{e}.w1/w2/w3`): `X.weight` int8 (out, in/2), two e2m1 values
  per byte, the low nibble first (column 2j in bits 0-3, column 2j+1 in bits 4-7), each nibble a
  sign bit over the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; `X.scale` ue8m0 (out, in/32): one scale per
  32 consecutive inputs of a row (MXFP4's block; the block size is DeepSeek's `fp4_block_size`, in no
  config field).
- Unquantized: embedding, head, norms, the router's weight, the compressors' `wkv` / `wgate`, the
  indexer's `weights_proj` (bf16); mHC coefficients, sinks, `ape`, the router bias (fp32); `tid2eid`.
Quantized tensors are found by what is stored, not by the config: a `.weight` with a scale beside it
is dequantized, FP4 when it is int8, FP8 when float8; the config's weight_block_size sets the FP8
block. Scales may be ue8m0, float32 / bf16 (V3's), or ue8m0 exponents stored as uint8 (read as
transformers does, 2^(byte - 127)). Torch's float4_e2m1fn_x2 as safetensors writes it (F4) is not read.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so
a crash mid-save never leaves a half-written checkpoint where the last good one was.
Weights are read from safetensors only (never pickle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.device import check_trainable
from nanoseek.errors import CheckpointError
from nanoseek.model.dense import MODEL_TYPES as DENSE_MODEL_TYPES
from nanoseek.model.dense import DenseConfig, DenseTransformer
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import sampling_settings

# the last: a V3 with DeepSeek-V4's hyper-connections, a type of nanoseek's own (config.py)
DEEPSEEK_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32", "deepseek_v3_mhc", "deepseek_v4")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- writing


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: a reader (or a re-run after
    Ctrl-C) sees the old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")  # not the locale's: jsonl rows may hold any text
    os.replace(tmp, path)
    return path


def atomic_directory(path: str | Path):
    """Context manager yielding a temporary directory that replaces `path` on success."""
    return _AtomicDir(Path(path))


class _AtomicDir:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self.tmp.chmod(0o755)  # mkdtemp makes it private; a published checkpoint is an ordinary directory
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for f in self.tmp.rglob("*"):  # make the bytes durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def export_state_dict(model: Transformer | DenseTransformer) -> dict[str, torch.Tensor]:
    """The model's tensors under HF checkpoint keys, MTP layers carrying their copies of the shared
    embedding and head as the released V3 files do."""
    check_trainable(model, "saved")  # a packed / quantized layer's weight is not in its state_dict
    cfg = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if getattr(cfg, "is_v4", False):  # transformers' DeepseekV4 names (no MTP modules)
        return {v4_checkpoint_key(k): v for k, v in sd.items()}
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        sd[prefix + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return sd


def save_model(model: Transformer | DenseTransformer, path: str | Path, tokenizer=None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `model` (and optionally its tokenizer) as an HF-format checkpoint directory, atomically.

    Tensors are sharded into model-0000i-of-0000n.safetensors with an index above max_shard_bytes.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model(model, tmp, tokenizer, max_shard_bytes)
    return path


def write_model(model: Transformer | DenseTransformer, directory: str | Path, tokenizer=None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """save_model's files, written straight into the existing `directory` (not atomic): for a caller
    that adds files of its own inside one atomic_directory (a training checkpoint)."""
    directory = Path(directory)
    sd = export_state_dict(model)
    config = model.config.replace(torch_dtype=str(next(iter(sd.values())).dtype).removeprefix("torch."))
    config.to_json(directory / CONFIG_NAME)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer is not None:  # keep a released model's stop tokens and sampling settings
        if len(tokenizer.eos_token_ids) > 1:
            gen["eos_token_id"] = tokenizer.eos_token_ids
        gen.update(tokenizer.generation_settings)
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shards = _shard(sd, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)


def _shard(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, t in sd.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = t, size + n
    return shards + [current]


# ---------------------------------------------------------------- reading


def load_config(path: str | Path) -> ModelConfig | DenseConfig:
    """The config of a checkpoint directory: a DenseConfig for model_type llama / qwen2 (students),
    else a ModelConfig (DeepSeek-V3 / V2 / V3.2)."""
    path = Path(path)
    if path.is_file():  # a checkpoint's own file (config.json, model.safetensors) passed for the directory
        hint = f" (here {path.parent})" if (path.parent / CONFIG_NAME).is_file() else ""
        raise CheckpointError(f"{path} is a file, not a checkpoint directory: pass the directory that holds "
                              f"config.json and the weights{hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / CONFIG_NAME).exists():
        raise CheckpointError(f"{path} has no config.json: is it a Hugging Face-format checkpoint directory?")
    try:
        d = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from None
    model_type = d.get("model_type") if isinstance(d, dict) else None
    if model_type in DENSE_MODEL_TYPES:
        return DenseConfig.from_dict(d)
    if model_type not in DEEPSEEK_MODEL_TYPES:
        raise CheckpointError(f"{path / CONFIG_NAME}: model_type {model_type!r} is not supported; nanoseek "
                              f"loads {', '.join(DEEPSEEK_MODEL_TYPES + tuple(DENSE_MODEL_TYPES))} checkpoints")
    return ModelConfig.from_dict(d)


def generation_defaults(path: str | Path) -> dict:
    """The sampling settings a checkpoint ships in generation_config.json (R1-Distill's: temperature
    0.6, top_p 0.95), for a request or command that sets none, as vLLM and transformers use them;
    {} without the file. nanoseek's own checkpoints write none (they keep the callers' defaults), unless
    fine-tuned from one that does: save_model writes its tokenizer's back."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    return sampling_settings(d)


def model_class(config: ModelConfig | DenseConfig) -> type[Transformer] | type[DenseTransformer]:
    """The model a config builds: DenseTransformer for a DenseConfig, else Transformer."""
    return DenseTransformer if isinstance(config, DenseConfig) else Transformer


# safetensors dtype names -> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class SafetensorsIndex:
    """The tensors of a checkpoint directory (single file or shards), read one at a time.

    `safe_open` maps a whole file, and the pages a read touches stay resident until the file is
    closed: loading a 3.5 GB single-file 1.5B checkpoint through it adds 3.5 GB to the peak. Here
    the header gives each tensor's place, and `read(key)` copies just its bytes with a plain read,
    so loading holds the model plus one tensor, never two copies of the weights. Only the
    safetensors format is read (never pickle).
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if (path / INDEX_NAME).exists():
            files = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
        elif (path / WEIGHTS_NAME).exists():
            files = [WEIGHTS_NAME]
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path} holds no *.safetensors weights "
                                      "(only safetensors are loaded, never pickle)")
        # key -> (file, dtype, shape, first byte, end byte)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            file = path / name
            if not file.exists():
                raise CheckpointError(f"{file} is listed in {INDEX_NAME} but missing")
            size = file.stat().st_size
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n)) if n <= size - 8 else None
                except ValueError:  # not JSON, or not UTF-8
                    header = None
            if not isinstance(header, dict):
                raise CheckpointError(f"{file} is damaged: its safetensors header does not read ({size} bytes)")
            # a file cut short (a copy that stopped, a full disk) would otherwise load its missing bytes as garbage
            end = 8 + n + max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
                              default=0)
            if size < end:
                raise CheckpointError(f"{file} is truncated: {size} bytes, its header describes {end}")
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in ST_DTYPES:
                    raise CheckpointError(f"{file}: tensor {key} has dtype {info['dtype']}, "
                                          "which nanoseek does not load")
                start, end = info["data_offsets"]
                self.entries[key] = (file, ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start, 8 + n + end)
        self.scales = weight_scales(self.entries)  # quantized weight -> its scale tensor

    def keys(self) -> list[str]:
        """Every key, in file order (reading them in this order reads each file front to back)."""
        return list(self.entries)

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor of the key's dtype and shape (for checks, without reading anything); a
        quantized weight's as dequantized: float32, an FP4 one twice as wide as its packed bytes."""
        _, dtype, shape, _, _ = self.entries[key]
        if dtype == torch.int8 and key.endswith("weight"):  # packed FP4 (an error without its scale: `dequantize`)
            dtype, shape = torch.float32, shape[:-1] + (2 * shape[-1],)
        elif key in self.scales:
            dtype = torch.float32
        return torch.empty(shape, dtype=dtype, device="meta")

    def read_weight(self, key: str, block: tuple[int, int]) -> torch.Tensor:
        """The tensor as the model holds it: a quantized weight dequantized (see `dequantize`)."""
        return dequantize(key, self.read(key), self.read(self.scales[key]) if key in self.scales else None, block)

    def read(self, key: str) -> torch.Tensor:
        file, dtype, shape, start, end = self.entries[key]
        out = torch.empty(shape, dtype=dtype)
        if end > start:
            with open(file, "rb") as f:
                f.seek(start)
                f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded), by key."""
    index = SafetensorsIndex(path)
    return {key: index.read(key) for key in index.keys()}


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   key: str = "FP8 weight") -> torch.Tensor:
    """W = W_fp8 * scale_inv per (128 x 128) block; ragged edge blocks (V3's 576-row kv_a_proj)
    use the same scale grid, ceil-sized, cropped to the weight's shape."""
    rows, cols = weight.shape
    br, bc = block
    if scale_inv.shape != (-(-rows // br), -(-cols // bc)):
        raise CheckpointError(f"{key}: FP8 scale grid {tuple(scale_inv.shape)} does not fit weight "
                              f"{tuple(weight.shape)} with {br}x{bc} blocks")
    scale = scale_inv.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return weight.float() * scale


# e2m1 (FP4): a sign bit over 3 bits of magnitude, codes 0-7 positive, 8-15 their negatives
FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP4_BLOCK = 32  # inputs per FP4 scale (DeepSeek's fp4_block_size, MXFP4's)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, key: str = "FP4 weight") -> torch.Tensor:
    """V4's routed experts: W = e2m1 value * scale, two values per byte of `packed` (out, in/2), the
    low nibble first, and one scale per 32 inputs of a row, `scale` (out, in/32) (see the docstring)."""
    rows, width = packed.shape
    cols = 2 * width
    if cols % FP4_BLOCK or tuple(scale.shape) != (rows, cols // FP4_BLOCK):
        raise CheckpointError(f"{key}: FP4 scales {tuple(scale.shape)} do not fit weight ({rows}, {cols}) "
                              f"(packed {tuple(packed.shape)}): expected ({rows}, {cols // FP4_BLOCK}), one per "
                              f"{FP4_BLOCK} inputs of a row")
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).view(rows, cols)  # byte j: columns 2j (low), 2j+1 (high)
    # a table lookup; index_select on int32 codes is ~2.5x faster than indexing with int64 ones
    values = FP4_E2M1.index_select(0, codes.view(-1).int()).view(rows, cols // FP4_BLOCK, FP4_BLOCK)  # (out, in/32, 32)
    return (values * scale.float()[..., None]).view(rows, cols)


def scale_values(key: str, scale: torch.Tensor) -> torch.Tensor:
    """A stored scale tensor as float32: ue8m0 (float8_e8m0fnu, or its exponent bytes as uint8: 2^(b -
    127)), or float32 / bf16 / fp16. Anything else, or a scale that is not finite, is an error."""
    if scale.dtype == torch.uint8:
        values = torch.exp2(scale.float() - 127)
    elif scale.dtype in (torch.float8_e8m0fnu, torch.float32, torch.bfloat16, torch.float16):
        values = scale.float()
    else:
        raise CheckpointError(f"{key} is stored as {str(scale.dtype).removeprefix('torch.')}, which is no scale "
                              "format (ue8m0 / float8_e8m0fnu, float32, bfloat16)")
    if not torch.isfinite(values).all():
        raise CheckpointError(f"{key} holds scales that are not finite (a ue8m0 NaN byte 0xff?): the file is damaged")
    return values


def dequantize(key: str, weight: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, int]) -> torch.Tensor:
    """A checkpoint tensor as the model holds it: FP8 with block scales (V3, V4) and V4's packed FP4
    dequantized to float32, anything without a scale as it is (see the module docstring)."""
    packed = weight.dtype == torch.int8 and key.endswith("weight")  # V4's FP4 experts; tid2eid is an int too
    if scale is None:
        if weight.dtype in FP8_DTYPES or packed:
            kind = "FP8" if weight.dtype in FP8_DTYPES else "int8 (FP4, two values a byte)"
            raise CheckpointError(f"{key} is {kind} but has no {key}_scale_inv or "
                                  f"{key.removesuffix('weight')}scale beside it to dequantize it with")
        return weight
    values = scale_values(f"the scale of {key}", scale)
    if packed:
        return dequantize_fp4(weight, values, key)
    if weight.dtype in FP8_DTYPES:
        return dequantize_fp8(weight, values, block, key)
    raise CheckpointError(f"{key} has a scale beside it but is stored as {str(weight.dtype).removeprefix('torch.')}: "
                          "a quantized weight is float8_e4m3fn (FP8) or int8 (FP4, two values a byte)")


def weight_scales(keys) -> dict[str, str]:
    """Each quantized weight's scale tensor, by the weight's key: `X.weight_scale_inv` (V3, and
    transformers' files) or `X.scale` (DeepSeek's V4 release)."""
    have = set(keys)
    found = {}
    for key in have:
        if key.endswith("weight"):
            scale = next((s for s in (key + "_scale_inv", key.removesuffix("weight") + "scale") if s in have), None)
            if scale is not None:
                found[key] = scale
    return found


def quant_block(quantization_config: dict | None) -> tuple[int, int]:
    """The FP8 block (rows, columns) of a config.json's quantization_config: weight_block_size,
    128 x 128 without one."""
    block = (quantization_config or {}).get("weight_block_size", (128, 128))
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size is {block!r}: expected two positive "
                              "integers, e.g. [128, 128]")
    return tuple(block)


def weight_formats(index: SafetensorsIndex) -> dict[str, dict[str, int]]:
    """How a checkpoint's tensors are stored, for `nanoseek info`: per format ("FP8 e4m3, ue8m0
    scales", "FP4 e2m1, ue8m0 scales", "bf16", ...) its tensor count and bytes on disk, a quantized
    weight's scales counted with it. Reads nothing but the headers."""
    def name(dtype: torch.dtype) -> str:
        return {torch.float8_e8m0fnu: "ue8m0", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float8_e4m3fn: "FP8 e4m3", torch.float8_e5m2: "FP8 e5m2", torch.int8: "FP4 e2m1"
                }.get(dtype, str(dtype).removeprefix("torch."))

    def size(key: str) -> int:
        _, _, _, start, end = index.entries[key]
        return end - start

    out: dict[str, dict[str, int]] = {}
    scales = set(index.scales.values())
    for key, (_, dtype, _, _, _) in index.entries.items():
        if key in scales:
            continue
        kind, n = str(dtype).removeprefix("torch."), size(key)
        if dtype.is_floating_point and dtype not in FP8_DTYPES:
            kind = name(dtype)
        if key in index.scales:  # a quantized weight: int8 is packed FP4
            scale = index.scales[key]
            kind, n = f"{name(dtype)}, {name(index.entries[scale][1])} scales", n + size(scale)
        entry = out.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += n
    return out


def convert_checkpoint_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig,
                               quantization_config: dict | None) -> dict[str, torch.Tensor]:
    """Released-checkpoint tensors -> this model's state dict: dequantize FP8 and FP4 weights, drop
    the MTP layers' copies of the shared embedding and head, and rename a V4 checkpoint's tensors."""
    block = quant_block(quantization_config)
    scales = weight_scales(tensors)
    out = {}
    for key, t in tensors.items():
        if key in scales.values():
            continue
        out[key] = dequantize(key, t, tensors[scales[key]] if key in scales else None, block)
    for k in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + k}."
        out.pop(prefix + "embed_tokens.weight", None)
        out.pop(prefix + "shared_head.head.weight", None)
    if getattr(config, "is_v4", False):  # DeepSeek's names -> the model's (v4_sources)
        with torch.device("meta"):
            expected = list(Transformer(config).state_dict())
        plan = v4_sources(list(out), expected)
        out = {k: out[name] if cut is None else cut(out[name]).clone() for k, (name, cut) in plan.items()}
    if config.tie_word_embeddings:
        out.setdefault("lm_head.weight", out.get("model.embed_tokens.weight"))
    return out


# ---------------------------------------------------------------- DeepSeek-V4 names

# nanoseek's (= transformers' in-memory) names -> DeepSeek's, as transformers' save_pretrained writes them
_V4_ATTENTION = {"sinks": "attn_sink", "q_a_proj.weight": "wq_a.weight", "q_a_norm.weight": "q_norm.weight",
                 "q_b_proj.weight": "wq_b.weight", "kv_proj.weight": "wkv.weight", "kv_norm.weight": "norm.weight",
                 "o_a_proj.weight": "wo_a.weight", "o_b_proj.weight": "wo_b.weight"}
_V4_COMPRESSOR = {"kv_proj.weight": "wkv.weight", "gate_proj.weight": "wgate.weight", "position_bias": "ape",
                  "kv_norm.weight": "norm.weight"}
_V4_INDEXER = {"q_b_proj.weight": "wq_b.weight", "scorer.weights_proj.weight": "weights_proj.weight"}
_V4_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
_V4_SWIGLU = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def v4_checkpoint_key(key: str) -> str:
    """A V4 model's state-dict key -> its name in a transformers-saved DeepseekV4 checkpoint."""
    if key == "lm_head.weight":
        return "head.weight"
    m = re.fullmatch(r"(model\.layers\.\d+\.)(.*)", key)
    if m is None:  # model.embed_tokens, model.norm, model.hc_head keep their names
        return key
    prefix, rest = m.groups()
    if rest.startswith("self_attn.compressor.indexer."):
        leaf = rest.removeprefix("self_attn.compressor.indexer.")
        return prefix + ("attn.indexer." + _V4_INDEXER[leaf] if leaf in _V4_INDEXER
                         else "attn.indexer.compressor." + _V4_COMPRESSOR[leaf])
    if rest.startswith("self_attn.compressor."):
        return prefix + "attn.compressor." + _V4_COMPRESSOR[rest.removeprefix("self_attn.compressor.")]
    if rest.startswith("self_attn."):
        return prefix + "attn." + _V4_ATTENTION[rest.removeprefix("self_attn.")]
    if rest.startswith("mlp."):
        parts = rest.removeprefix("mlp.").replace("gate.e_score_correction_bias", "gate.bias").split(".")
        return prefix + "ffn." + ".".join(_V4_SWIGLU.get(p, p) for p in parts)
    hc = re.fullmatch(r"(attn|ffn)_hc\.(fn|base|scale)", rest)
    if hc:
        return prefix + f"hc_{hc[1]}_{hc[2]}"
    return prefix + _V4_BLOCK[rest]


def v4_released_key(key: str) -> str:
    """The same tensor's name in DeepSeek's release (no `model.` prefix, its own top-level names)."""
    name = v4_checkpoint_key(key).removeprefix("model.")
    return {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
            "hc_head.hc_scale": "hc_head_scale"}.get(name, name)


def v4_sources(available: list[str], expected: list[str]) -> dict[str, tuple[str, object]]:
    """For each state-dict key of a V4 model, (the checkpoint tensor it is read from, and None or
    a function that cuts it out of a stacked-experts tensor), from any of the three spellings (see
    the module docstring). A key found under none of them is left out (reported missing)."""
    have = set(available)
    plan = {}
    for key in expected:
        name = next((n for n in (v4_checkpoint_key(key), v4_released_key(key), key) if n in have), None)
        if name is not None:
            plan[key] = (name, None)
            continue
        m = re.fullmatch(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m is None:
            continue
        e, part = int(m[2]), m[3]
        stacked = m[1] + ("down_proj" if part == "down_proj" else "gate_up_proj")
        if stacked in have:  # transformers' in-memory layout: gate_up (E, 2F, D) is [gate; up] per expert
            plan[key] = (stacked, lambda t, e=e, part=part: t[e] if part == "down_proj" else
                         t[e].chunk(2, dim=0)[0 if part == "gate_proj" else 1])
    return plan


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None) -> Transformer | DenseTransformer:
    """Load an HF-format DeepSeek-V3/V2/V3.2 checkpoint directory into a nanoseek Transformer, or a
    Llama / Qwen2 one (config.json model_type "llama" / "qwen2") into a DenseTransformer.

    dtype defaults to float32 (CPU training and tests); the MoE correction bias stays fp32 always.
    The model is built on the meta device and each tensor is read, converted (FP8 / FP4 dequantized
    with its scale, cast to dtype) and put in place one at a time, its temporaries' pages handed back
    to the OS as it goes (`return_free_memory`), so the peak is the loaded model plus one tensor.
    `quantize="int8"` / `"int8-dynamic"` / `"fp16"` (CPU) converts each linear layer (and an untied
    embedding) as soon as its weights are in, so the fp32 copy of the whole model never exists either (see `nanoseek.device`).
    Missing or unexpected keys, and shape mismatches, raise CheckpointError naming them. A run
    directory (checkpoint-<step>/ inside) loads the checkpoint its `latest` names.
    """
    from nanoseek.device import check_quantize, quantizable, quantize_layer, return_free_memory
    from nanoseek.train.checkpointing import checkpoint_path

    path = checkpoint_path(path)
    config = load_config(path)
    raw = json.loads((path / CONFIG_NAME).read_text())
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    if dtype not in DTYPES.values():
        raise CheckpointError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}")
    check_quantize(quantize, torch.device(device), dtype)
    quantize = None if quantize == "none" else quantize
    index = SafetensorsIndex(path)
    block = quant_block(raw.get("quantization_config"))
    mtp_prefixes = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
    copies = {p + name for p in mtp_prefixes for name in ("embed_tokens.weight", "shared_head.head.weight")}
    scales = set(index.scales.values())
    keys = [k for k in index.keys() if k not in scales and k not in copies]
    if mtp_prefixes and not any(k.startswith(mtp_prefixes) for k in keys):
        # config.json names MTP modules but the file has none (e.g. saved by transformers, which
        # drops them): load the main model alone rather than fail.
        warnings.warn(f"{path}: config has {len(mtp_prefixes)} MTP module(s) but the checkpoint holds no MTP "
                      "weights; loading without MTP", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)

    with torch.device("meta"):
        model = model_class(config)(config)
    expected = model.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" not in keys and "head.weight" not in keys:
        expected.pop("lm_head.weight", None)
    # each state-dict key <- (the checkpoint tensor, None or the cut of a stacked tensor it is)
    sources = {k: (k, None) for k in keys}
    if getattr(config, "is_v4", False):
        keys = [k for k in keys if not k.startswith("mtp.")]  # V4's MTP: not modelled (config.py)
        sources = v4_sources(keys, list(expected))
        used = {name for name, _ in sources.values()}
        found = {k: index.meta(name) if cut is None else cut(index.meta(name)) for k, (name, cut) in sources.items()}
        check_state_dict({**found, **{k: index.meta(k) for k in keys if k not in used}}, expected,
                         f"checkpoint {path}", "config.json")
    else:
        check_state_dict({k: index.meta(k) for k in keys}, expected, f"checkpoint {path}", "config.json")
    modules = dict(model.named_modules())
    stacked: dict[str, torch.Tensor] = {}  # the one stacked-experts tensor being cut up, read once
    for key, (name, cut) in sources.items():
        if cut is not None:
            stacked = stacked if name in stacked else {name: index.read(name)}
            t = cut(stacked[name]).clone()
        else:  # FP8 / FP4 dequantized here, with the scale read beside it
            t = index.read_weight(name, block)
        # integer tensors (V4's tid2eid table) take the model's integer dtype (DeepSeek's release stores int32)
        t = t.to(device=device, dtype=torch.float32 if keeps_fp32(key) else dtype if t.is_floating_point()
                 else expected[key].dtype)
        module_name, _, name = key.rpartition(".")
        module = modules[module_name]
        if isinstance(getattr(module, name), nn.Parameter):
            setattr(module, name, nn.Parameter(t, requires_grad=getattr(module, name).requires_grad))
        else:
            setattr(module, name, t)
        if quantize and quantizable(module_name, module, config.tie_word_embeddings) and not any(
                p.is_meta for p in module.parameters(recurse=False)):
            parent, _, child = module_name.rpartition(".")
            # replaced everywhere it is held, so the float layer is freed now
            modules[module_name] = quantize_layer(module, quantize)
            setattr(model.get_submodule(parent), child, modules[module_name])
        del t, module  # the temporaries' (and a quantized float layer's) last references
        return_free_memory()
    if config.tie_word_embeddings:  # the head shares the embedding's parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model, device)
    return model.eval()


def keeps_fp32(key: str) -> bool:
    """The tensors that stay fp32 in a model of any dtype: the MoE correction bias (its updates are
    tiny) and, as in DeepSeek-V4, the hyper-connections' coefficients (model/hyper.py), V4's
    attention sinks and compressors' position biases."""
    return (key.endswith(("e_score_correction_bias", ".sinks", ".position_bias")) or "_hc." in key
            or ".hc_head." in key)


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, against: str) -> None:
    """Raise CheckpointError naming what differs between the tensors `sd` and a model's state dict
    `expected`: missing or unexpected keys, then shapes of the shared keys."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        msg = [f"{what} does not match {against}:"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {_abbrev(missing)}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
        raise CheckpointError("\n".join(msg))
    mismatched = [f"  {key}: checkpoint has {tuple(t.shape)}, {against} implies {tuple(expected[key].shape)}"
                  for key, t in sd.items() if key in expected and tuple(t.shape) != tuple(expected[key].shape)]
    if mismatched:
        raise CheckpointError(f"{what} has {len(mismatched)} shape mismatch(es) with {against}:\n"
                              + "\n".join(mismatched[:12]) + ("\n  ..." if len(mismatched) > 12 else ""))


def _materialize_buffers(model: Transformer, device) -> None:
    """Recreate the non-persistent buffers (RoPE frequencies, expert counters) left on meta."""
    from nanoseek.model.layers import RotaryEmbedding, rope_inv_freq
    from nanoseek.model.moe import MoE

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(model.config, module.kind)[0].to(device)
        elif isinstance(module, MoE):
            module.tokens_per_expert = torch.zeros(module.n_experts, device=device)


def _abbrev(keys: list[str], n: int = 12) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
