"""Where and in what precision a model runs: the one place that resolves `device` and `dtype`.

    device "auto": the first CUDA GPU when there is one, else the CPU.
    dtype  "auto": bfloat16 on a GPU (tensor cores), float32 on the CPU, where bf16 matmuls are
                   tens of times slower than fp32 (a bf16 checkpoint is upcast when it loads).

Training keeps fp32 weights and optimizer state and computes under bf16 autocast on a GPU
(`autocast_dtype`); inference stores the weights and the latent cache in the resolved dtype.

    quantize "int8": on the CPU, every linear layer becomes a weight-only int8 one (`Int8Linear`):
                     int8 weights with one float scale per output channel, activations kept in
                     float and rounded to bfloat16 for torch's own int8-weight kernel
                     (`torch._weight_int8pack_mm`, AVX-512 / AVX2). A quarter of the fp32 weight
                     bytes to read per decoded token, which is what bounds CPU decode, and an error
                     of about 1% per layer from the weights alone (the released models compute
                     in bf16, so the activation rounding is their native precision).
    quantize "int8-dynamic": torch.ao's dynamic int8 linear layers (fbgemm): the activations too
                     are quantized, per tensor, on the fly, and the matmul runs in int8. Faster
                     still, but its error is several times larger (see the README's table).
    quantize "fp16": float16-weight linear layers (`Fp16Linear`: fbgemm's float16 GEMM, torch's own
                     kernel): weights stored in float16, activations and sums in float32. Half
                     the fp32 weight bytes, and for a bf16 checkpoint no rounding at all: float16
                     holds every bf16 value of magnitude 6.1e-5 to 65504 exactly, so it computes
                     what fp32 does (the released 1.5B's shapes: greedy text identical to fp32's,
                     decode 1.4-1.9x faster). A layer with a weight beyond float16's range stays
                     in float.
    All three convert an untied output head too, store an untied embedding in float16
    (`Fp16Embedding`: rows widened to float32 as they are looked up; exact for a bf16 checkpoint),
    and keep MLA's `kv_b_proj` in float (the absorbed decode path folds its weight into the query
    and the output, so it is read as a matrix, not called) and a head tied to the embedding, with
    the embedding (`FLOAT_LAYERS`, `quantizable`).

Float32 inference on the CPU (`pack_linears`, which `LLM` applies to the checkpoints it loads): each
float linear layer keeps its weight in oneDNN's blocked layout, packed once, and runs through
oneDNN's linear (what torch.compile's CPU "freezing" does). torch's default fp32 path (MKL sgemm
on the plain weight) is markedly slower at the few rows a decode step has: per 1536x8960 matrix,
measured single-threaded with weights beyond the cache, 1.8x slower at 1 row and 2.7x at 8 (whole
model: README, "Run a released DeepSeek model"). The math is the same fp32; only the order of the
sums differs. The torch ops used here (`torch.ops.mkldnn._reorder_linear_weight` /
`_linear_pointwise`, `torch._weight_int8pack_mm`) are torch's own CPU kernels, underscore-named:
tests/test_quantize.py checks them against F.linear.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.errors import NanoseekError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", *DTYPES)
QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic", "fp16")


def resolve_device(device: "str | torch.device" = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" | a torch.device -> a torch.device that exists here."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        # one message for every caller: the inference commands' flag, the trainers' key=value, Python
        raise NanoseekError(f"device {device!r} asked for, but no CUDA device is available; run on the CPU: "
                            "--device cpu (device=cpu for the training commands, device='cpu' in Python), or auto")
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


def at_least(minimum: int, what: str):
    """An argparse type: an integer of at least `minimum`; anything else is a usage error that
    names the flag and says what it takes (`what`, e.g. "a thread count: 0 (torch's default) or more")."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return n

    return parse


THREADS = at_least(0, "a thread count: 0 (torch's default) or more")


def add_device_arguments(parser) -> None:
    """--device / --dtype / --enforce-eager for the inference commands (generate, chat, eval, serve)."""
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where the model runs (auto: a CUDA GPU if there is one)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and cache precision (auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="GPU: run every forward eagerly instead of replaying CUDA graphs for decode steps")


def add_quantize_argument(parser) -> None:
    """--quantize for the inference commands (generate, chat, eval, serve)."""
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="CPU, from float32: fp16: linear layers' weights in float16, math in float32 "
                             "(half the weight memory, faster decode, exact for bf16 checkpoints); int8: "
                             "weight-only int8 (a quarter of the memory, about 1%% error per layer); "
                             "int8-dynamic: activations quantized too (fastest, least accurate)")


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
    if method == "fp16" and torch.backends.quantized.engine not in ("x86", "fbgemm"):
        # fbgemm's float16 GEMM is x86-only; ARM CPUs (Apple silicon, Graviton) run qnnpack
        raise NanoseekError(f"--quantize fp16 needs fbgemm (x86 CPUs), and torch's quantized engine here is "
                            f"{torch.backends.quantized.engine!r}; use --quantize int8 or int8-dynamic")


# The linear layers every method leaves in float, by name suffix: MLA's kv_b_proj, whose weight the
# absorbed decode path reads as a matrix (it is never called), and DeepSeek-V4's o_a_proj, whose
# weight its grouped output projection reads per group. An untied output head is converted:
# R1-Distill-Qwen-1.5B's 151936x1536 head is 0.9 GB in float32; in int8 the model decodes 1.08x
# faster at batch 1 (1.01x at 8; timed in turn against the oneDNN-packed float head) in 1.1 GiB
# less, and int8-dynamic 1.3-1.4x faster, greedy picks unchanged in both (README, "Run a released
# DeepSeek model"). (V3's MTP modules have no head of their own here: they call the main model's lm_head.)
FLOAT_LAYERS = ("kv_b_proj", "o_a_proj")


def quantizable(name: str, module: nn.Module, tied_head: bool) -> bool:
    """Whether `quantize_model` converts this module (`quantize_layer`): a plain nn.Linear not in
    FLOAT_LAYERS, or the embedding, unless the output head is tied to it
    (`tied_head`: config.tie_word_embeddings).

    A tied head and its embedding stay in float: they are one matrix, which the embedding lookup
    reads as float rows. Quantizing it in place would round every input embedding as well, and an
    int8 copy beside the float embedding would add memory (a quarter of the matrix) instead of
    saving it."""
    if type(module) is nn.Embedding:
        return not tied_head
    if type(module) is not nn.Linear or name.endswith(FLOAT_LAYERS):
        return False
    return not (tied_head and name == "lm_head")


class Int8Linear(nn.Module):
    """Weight-only int8 nn.Linear for CPU inference: W ~= scale[:, None] * int8 weight, one scale per
    output channel (absmax / 127); y = x W^T + b with x rounded to bfloat16 for the kernel and y
    returned in x's dtype (the kernel sums in float32 and returns bfloat16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        low, high = torch.aminmax(w, dim=1)
        # The kernel multiplies by a bfloat16 scale, so quantize against that rounded value: against
        # the float32 one, each channel would carry the rounding (up to 0.39%) as a gain error.
        scale = (torch.maximum(-low, high).float().clamp(min=1e-12) / 127).to(torch.bfloat16)  # (out,)
        # in slices of rows: float temporaries the size of w would outlive it in the heap (RSS)
        q = torch.cat([(rows.float() / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
                       for rows, s in zip(w.split(256), scale.split(256))])
        self.register_buffer("weight", q)  # (out, in)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.in_features % 32 == 0:  # the kernel's tested shapes (it reads past the end for some others)
            y = torch._weight_int8pack_mm(rows, self.weight, self.scale)
        else:  # tiny models: dequantize
            y = rows @ (self.weight.to(torch.bfloat16) * self.scale[:, None]).T
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def fits_float16(weight: torch.Tensor) -> bool:
    return bool(weight.detach().abs().max() <= torch.finfo(torch.float16).max)


class Fp16Linear(nn.Module):
    """nn.Linear for CPU inference with its weight stored in float16 and the math in float32: fbgemm's
    float16 GEMM (`quantized::linear_dynamic_fp16`, the kernel behind torch.ao's dynamic float16
    Linear) widens the packed weight block by block as it multiplies. (torch.ao's module packs a
    zero weight of the full size in its constructor before the real one: twice the load time.)"""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class Fp16Embedding(nn.Module):
    """nn.Embedding for CPU inference with its table stored in float16: the looked-up rows are
    widened to float32 (the model's dtype). A lookup reads a few rows, so it costs nothing in
    speed; it halves the largest float matrix a quantized model keeps (0.9 -> 0.47 GB for
    R1-Distill-Qwen-1.5B)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.register_buffer("weight", embedding.weight.detach().to(torch.float16))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight).float()


def quantize_layer(module: nn.Module, method: str) -> nn.Module:
    """A layer `quantizable` chose, converted: an nn.Embedding -> Fp16Embedding (under every method;
    as it is where a weight is beyond float16's range), an nn.Linear -> `quantize_linear`."""
    if type(module) is nn.Embedding:
        return Fp16Embedding(module) if fits_float16(module.weight) else module
    return quantize_linear(module, method)


def quantize_linear(module: nn.Linear, method: str = "int8") -> nn.Module:
    """A float32 nn.Linear -> an Int8Linear ("int8"), torch's dynamic int8 Linear ("int8-dynamic") or
    an Fp16Linear ("fp16"); under "fp16" a layer with a weight beyond float16's range is returned as
    it is (the packing would clip it)."""
    if method == "int8":
        return Int8Linear(module)
    if method == "fp16":
        return Fp16Linear(module) if fits_float16(module.weight) else module
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with warnings.catch_warnings():  # torch.ao warns it will move to torchao; its kernels are torch's own
        warnings.simplefilter("ignore")
        module.qconfig = per_channel_dynamic_qconfig
        return DynamicLinear.from_float(module)


def quantize_model(model: nn.Module, method: str | None = "int8") -> nn.Module:
    """Quantize an in-memory model's linear layers (and embedding) in place (`load_model(quantize=...)`
    does it while loading, for a lower peak); returns the model, in eval mode: quantized layers are
    for inference only."""
    param = next(model.parameters())
    check_quantize(method, param.device, param.dtype)
    if method in (None, "none"):
        return model
    if any(isinstance(m, inference_only_layers()) for m in model.modules()):
        raise NanoseekError("this model's layers are already packed or quantized for CPU inference: "
                            "quantize the model as loaded (load_model(path, quantize=...))")
    tied_head = model.config.tie_word_embeddings
    replace_linears(model, [name for name, module in model.named_modules()
                            if quantizable(name, module, tied_head)],
                    lambda module: quantize_layer(module, method))
    return model.eval()


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):  # glibc only (and CDLL(None) is an error on Windows)
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # None on musl


def return_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Converting a model layer by layer frees a float temporary per weight. glibc keeps freed blocks
    below its adaptive mmap threshold (which grows to the size of the largest block freed) in the
    heap, where the weights kept between them stop the heap from shrinking: without this, loading
    int8 ends tens of MB above the model's size, by an amount that varies from run to run."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def replace_linears(model: nn.Module, names: list[str], convert) -> None:
    """Swap each named layer for convert(layer), one at a time: each float weight is freed as soon
    as its replacement exists (holding the old layers until the end would double the peak)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, convert(model.get_submodule(name)))


# oneDNN packs a weight for a typical number of rows; any number runs. Decode batches are small.
PACK_ROWS_HINT = 64


class PackedLinear(nn.Module):
    """A float nn.Linear for CPU inference whose weight is kept in oneDNN's blocked layout (packed
    once) and run by oneDNN's linear: the same fp32 math as F.linear, faster at few rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def packable(name: str, module: nn.Module, model: nn.Module) -> bool:
    """A float32 nn.Linear on the CPU that is only ever called (not in FLOAT_LAYERS, not a MoE expert,
    whose weights the grouped path stacks) and owns its weight (not a head tied to the embedding)."""
    if type(module) is not nn.Linear or name.endswith(FLOAT_LAYERS) or ".experts." in name:
        return False
    if module.weight.device.type != "cpu" or module.weight.dtype != torch.float32:
        return False
    return all(module.weight is not p for n, p in model.named_parameters() if not n.startswith(name + "."))


def pack_linears(model: nn.Module) -> nn.Module:
    """CPU float32 inference: every packable linear layer becomes a PackedLinear, one at a time (the
    peak is the model plus one weight). Inference only: the packed weights are no parameters, and
    training or updating them in place (RL) needs the plain model. A no-op without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return model
    replace_linears(model, [name for name, module in model.named_modules() if packable(name, module, model)],
                    PackedLinear)
    return model.eval()


def inference_only_layers() -> tuple[type, ...]:
    """The layer types CPU inference converts to: their weights are no parameters (packed, int8,
    float16), so a model holding one can neither be trained nor saved."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return (PackedLinear, Int8Linear, Fp16Linear, Fp16Embedding, DynamicLinear)


def check_trainable(model: nn.Module, what: str) -> None:
    """Raise where `model` was packed or quantized for CPU inference (`what`: "saved", "trained")."""
    if any(isinstance(m, inference_only_layers()) for m in model.modules()):
        raise NanoseekError(f"this model was packed or quantized for CPU inference and cannot be {what}: "
                            "load the checkpoint again without --quantize (nanoseek.load_model(path))")
