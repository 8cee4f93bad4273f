"""Where and in what precision a model runs: the one place that resolves `device` and `dtype`.

    device "auto": the first CUDA GPU when there is one, else the CPU.
    dtype  "auto": bfloat16 on a GPU (tensor cores), float32 on the CPU, where bf16 matmuls are
                   tens of times slower than fp32 (a bf16 checkpoint is upcast when it loads).

Training keeps fp32 weights and optimizer state and computes under bf16 autocast on a GPU
(`autocast_dtype`); inference stores the weights and the latent cache in the resolved dtype.

    quantize "int8": on the CPU, every linear layer becomes a dynamic int8 one (torch's own
                     `torch.ao` dynamic quantization: int8 weights, per output channel, activations
                     quantized per batch on the fly, fbgemm/oneDNN kernels). A quarter of the fp32
                     weight bytes to read per decoded token, which is what bounds CPU decode.
                     Two layers stay in float: MLA's `kv_b_proj` (the absorbed decode path folds
                     its weight into the query and the output, so it is read as a matrix, not
                     called) and the output head, whose error would go straight into the token
                     ranking (GPTQ and AWQ checkpoints keep it unquantized for the same reason).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from nanoseek.errors import NanoseekError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", *DTYPES)
QUANTIZE_CHOICES = ("none", "int8")


def resolve_device(device: "str | torch.device" = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" | a torch.device -> a torch.device that exists here."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NanoseekError(f"device={device!r} but no CUDA device is available; use device=cpu (or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise NanoseekError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}") from None


def resolve_dtype(dtype: "str | torch.dtype | None", device: torch.device) -> torch.dtype:
    """"auto" (or None) | "float32" | "bfloat16" | "float16" | a torch.dtype -> the dtype to compute in."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise NanoseekError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def add_device_arguments(parser) -> None:
    """--device / --dtype for the inference commands (generate, chat, eval, serve)."""
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where the model runs (auto: a CUDA GPU if there is one)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and cache precision (auto: bfloat16 on GPU, float32 on CPU)")


def add_quantize_argument(parser) -> None:
    """--quantize for the inference commands (generate, chat, eval, serve)."""
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="int8: dynamic int8 linear layers (CPU, float32): a quarter of the weight memory "
                             "and faster decode")


def check_quantize(method: str | None, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a clear error where `method` cannot run (unknown, not on the CPU, not from float32)."""
    if method in (None, "none"):
        return
    if method not in QUANTIZE_CHOICES:
        raise NanoseekError(f"unknown quantization {method!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    if device.type != "cpu":
        raise NanoseekError(f"--quantize {method} runs on the CPU; on a GPU use --dtype bfloat16 instead")
    if dtype != torch.float32:
        raise NanoseekError(f"--quantize {method} quantizes float32 layers; use --dtype float32 (auto on the CPU)")


def quantizable(name: str, module: nn.Module) -> bool:
    """Whether `quantize_model` turns this module into an int8 one: a plain nn.Linear, except MLA's
    kv_b_proj (its weight is read directly by the absorbed path) and the output head."""
    return type(module) is nn.Linear and not name.endswith(("kv_b_proj", "lm_head", "shared_head.head"))


def quantize_linear(module: nn.Linear) -> nn.Module:
    """A float32 nn.Linear -> torch's dynamic int8 Linear (per-channel int8 weights)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():  # torch.ao warns it will move to torchao; its kernels are torch's own
        warnings.simplefilter("ignore")
        module.qconfig = per_channel_dynamic_qconfig
        return DynamicLinear.from_float(module)


def quantize_model(model: nn.Module, method: str | None = "int8") -> nn.Module:
    """Quantize an in-memory model's linear layers in place (`load_model(quantize=...)` does it while
    loading, for a lower peak); returns the model, in eval mode: int8 layers are for inference only."""
    param = next(model.parameters())
    check_quantize(method, param.device, param.dtype)
    if method in (None, "none"):
        return model
    for name, module in list(model.named_modules()):
        if quantizable(name, module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module))
    return model.eval()
