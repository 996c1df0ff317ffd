"""8-bit weights: per-output-channel quantization at load time, and the matmul that reads them.

A layer matrix W [N, K] is stored as q [N, K] (int8, or float8 e4m3 on GPUs of compute
capability 8.9+) and a float32 scale per output channel s [N], with W ~ s[:, None] * q:
    int8: s = max|W[n]| / 127, q = round(W / s) in [-127, 127]   (symmetric, no zero point)
    fp8:  s = max|W[n]| / 448, q = e4m3(W / s)                     (448: e4m3's largest value)
Then x @ W.T = (x @ q.T) * s: the scale multiplies each output column once, after the sum
over K, so a kernel reads 1 byte per weight, converts it to x's dtype in registers (exact: int8
and e4m3 values are all bfloat16 and float16 values) and scales at the end. That is what
tnl.kernels.triton_gemm's skinny GEMM does on CUDA (tnl.kernels.triton_quant chooses its
configs); `linear_torch` is the plain PyTorch form (the CPU path, and the reference).

Only the four matrices of each layer are quantized (qkvu, out_proj, l12, l3); the embedding and
the head keep the model's dtype (the head is 0.26 GB of the 7B's 13.7 GB, and its error lands
directly on the logits).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnl.config import check_quantization

log = logging.getLogger(__name__)

QMAX = {"int8": 127.0, "fp8": 448.0}
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FP8_MIN_CAPABILITY = (8, 9)     # e4m3 conversions in hardware: Ada (sm_89) and Hopper (sm_90) onward
TORCH_ROWS = 4096               # linear_torch dequantizes at most this many rows of W at a time


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """An 8-bit layer matrix where a weight tensor would be: qweight [N, K] int8 or float8_e4m3fn
    (row-major), scale [N] float32, and `dtype`, the activations' dtype it computes in (the model's
    dtype; the kernel backend checks it like a weight's dtype)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    requires_grad = False

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self) -> torch.Tensor:
        """The matrix it stands for, [N, K] in `dtype` (for tests and references only)."""
        return dequantize(self.qweight, self.scale, self.dtype)


def quantize(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (q [N, K] int8 / float8_e4m3fn, scale [N] float32), per output
    channel (row). An all-zero row gets scale 1 (q = 0), so it dequantizes to zeros exactly."""
    if kind not in QMAX:
        raise ValueError(f"quantize: kind {kind!r}; expected one of {', '.join(QMAX)}")
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX[kind], torch.ones_like(amax))
    y = (wf / scale[:, None]).clamp(-QMAX[kind], QMAX[kind])
    q = y.round().to(torch.int8) if kind == "int8" else y.to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def linear_torch(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None,
                 rows: int = TORCH_ROWS) -> torch.Tensor:
    """F.linear(x, dequantized W, bias) in plain PyTorch: x [..., K] -> [..., N] in x's dtype.
    The matmul runs in x's dtype over q converted to it (exact), in blocks of `rows` output
    channels (so at most that much of W exists in x's dtype at once), then each column is scaled
    in float32 and rounded once to x's dtype."""
    N = w.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        y = F.linear(x, w.qweight[n0:n1].to(x.dtype)).float() * w.scale[n0:n1]
        if bias is not None:
            y += bias[n0:n1].float()
        out[..., n0:n1] = y.to(x.dtype)
    return out


class QuantLinear(nn.Module):
    """nn.Linear's place for an 8-bit matrix: buffers qweight [N, K] and scale [N], the bias as
    it was; `.weight` is the QuantWeight view the model's forward hands to the kernel backend."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        w = linear.weight.detach()
        q, scale = quantize(w, kind)
        self.kind = kind
        self.compute_dtype = w.dtype
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(self.qweight, self.scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_torch(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def check_device(kind: str, device: torch.device | str) -> None:
    """Raise a ValueError for a quantization this device cannot run: an unknown kind, or fp8 on a
    CPU or a GPU older than compute capability 8.9."""
    check_quantization(kind)
    if kind != "fp8":
        return
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"quantization 'fp8' needs a CUDA GPU of compute capability "
                         f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper); the device "
                         f"is {dev.type}: use quantization 'int8' there")
    cap = torch.cuda.get_device_capability(dev)
    if cap < FP8_MIN_CAPABILITY:
        raise ValueError(f"quantization 'fp8' needs a CUDA GPU of compute capability "
                         f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(dev)} is {cap[0]}.{cap[1]}: use quantization 'int8'")


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    """Replace every layer's four matrices (qkvu_proj, out_proj, l12, l3) by QuantLinear, in
    place, one at a time (each float matrix is freed as its 8-bit copy is made, so memory peaks at
    the float model plus one matrix). kind "none" leaves the model as it is. Returns the model."""
    check_device(kind, model.head_weight.device)
    if kind == "none":
        return model
    before = after = 0
    with torch.no_grad():
        for layer in model.model.layers:
            for parent, name in ((layer.token_mixer, "qkvu_proj"), (layer.token_mixer, "out_proj"),
                                 (layer.channel_mixer, "l12"), (layer.channel_mixer, "l3")):
                lin = getattr(parent, name)
                before += lin.weight.numel() * lin.weight.element_size()
                q = QuantLinear(lin, kind)
                setattr(parent, name, q)
                after += q.qweight.numel() * q.qweight.element_size() + q.scale.numel() * 4
    model.quantization = kind
    log.info("quantized the layer matrices to %s (per output channel, float32 scales): %.2f GB -> %.2f GB; "
             "embedding and head kept in %s", kind, before / 1e9, after / 1e9,
             str(model.head_weight.dtype).removeprefix("torch."))
    return model
