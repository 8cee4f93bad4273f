"""Where and in what precision a model runs: the one place that resolves `device` and `dtype`.

    device "auto": the first CUDA GPU when there is one, else the CPU.
    dtype  "auto": bfloat16 on a GPU (tensor cores), float32 on the CPU, where bf16 matmuls are
                   tens of times slower than fp32 (a bf16 checkpoint is upcast when it loads).

Training keeps fp32 weights and optimizer state and computes under bf16 autocast on a GPU
(`autocast_dtype`); inference stores the weights and the latent cache in the resolved dtype.
"""

from __future__ import annotations

import torch

from nanoseek.errors import NanoseekError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", *DTYPES)


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
