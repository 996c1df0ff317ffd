"""Kernels, chosen by device: fla's chunked kernel and tnl's Triton decode kernel on CUDA (when
installed), the plain PyTorch path (torch_ops) everywhere else. Both attention entry points read
each sequence's state from the pool and write it back in place.

`linear` runs decode-sized matmuls (a few rows against a large weight) with tnl's Triton skinny
GEMM where a tuned table measured it faster than cuBLAS: on Hopper (sm_90) the table shipped in
gemm_tuned_sm90.json (H100); elsewhere only with TNL_GEMM_TUNED=<json from
benchmarks/gemm_bench.py>. TNL_SKINNY_GEMM=0 keeps cuBLAS everywhere.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from tnl.kernels import torch_ops

log = logging.getLogger(__name__)

_fla_chunk = None
_triton_decode = None
_triton_norm = None
_skinny = None          # tnl.kernels.triton_gemm once a tuned table is loaded
_checked = False
SKINNY_MAX_M = 64       # rows up to which `linear` may use the skinny GEMM (the tuned range)
SKINNY_GATED_MAX_M = 32  # ... and `gated_linear` (gemm_bench, H100: 1.13x at 1-16 rows, 1.01x at 32, 0.73x at 64)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else max(0, int(value))
    except ValueError:
        log.warning("%s=%r is not a whole number; using %d", name, value, default)
        return default


# rows up to which the fused decode layers run (TNL_FUSED_MAX_M to change). Measured on an H100,
# 7B decode, tok/s fused vs unfused: batch 1 199.8 vs 194.4, 2: 362 vs 370, 4: 700 vs 742,
# 8: 1446 vs 1443, 16: 2660 vs 2650, 32: 3948 vs 4445, 64: 6258 vs 7230 -- a win at one row only
FUSED_MAX_M = _env_int("TNL_FUSED_MAX_M", 1)
# TNL_FUSED_DECODE: "auto" (fused decode layers where the skinny GEMM is tuned), "0" (never),
# "1" (always, with the PyTorch fallback where there is no kernel: for tests on the CPU)
FUSED_DECODE = os.environ.get("TNL_FUSED_DECODE", "auto")
TUNED_SM90 = os.path.join(os.path.dirname(__file__), "gemm_tuned_sm90.json")


def _load_skinny_gemm() -> None:
    global _skinny
    if os.environ.get("TNL_SKINNY_GEMM") == "0":
        log.info("skinny GEMM disabled by TNL_SKINNY_GEMM=0: decode matmuls use cuBLAS")
        return
    path = os.environ.get("TNL_GEMM_TUNED")
    if path is None and torch.cuda.get_device_capability() == (9, 0):
        path = TUNED_SM90
    if path is None:
        return
    try:
        from tnl.kernels import triton_gemm
        n = triton_gemm.load_tuned(path)
    except Exception as e:
        log.warning("skinny GEMM unavailable (%s); decode matmuls use cuBLAS", e)
        return
    _skinny = triton_gemm
    log.info("skinny GEMM: %d tuned shapes from %s", n, path)


def _pdl_wanted() -> bool:
    """Programmatic dependent launch for tnl's Triton kernels: on sm_90+ unless TNL_PDL=0. Each
    kernel then lets the next one be scheduled while it runs, and waits (griddepcontrol.wait)
    before its first memory access until the previous kernel has finished: launch latency hidden
    between the ~150 small kernels of a decode step."""
    return os.environ.get("TNL_PDL") != "0" and torch.cuda.is_available() \
        and torch.cuda.get_device_capability() >= (9, 0)


def _load_cuda_kernels() -> None:
    global _fla_chunk, _triton_decode, _triton_norm, _checked
    if _checked:
        return
    _checked = True
    if os.environ.get("TNL_DISABLE_FAST_KERNELS") == "1":
        log.info("fast kernels disabled by TNL_DISABLE_FAST_KERNELS=1")
        return
    pdl = _pdl_wanted()
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        _fla_chunk = chunk_simple_gla
    except Exception as e:  # fla-core is optional: the [cuda] extra
        log.warning("fla-core not importable (%s); CUDA prefill uses the PyTorch path", e)
    try:
        from tnl.kernels import triton_decode
        triton_decode.PDL = pdl
        _triton_decode = triton_decode.recurrent_step_triton
        _triton_norm = triton_decode.rms_norm
    except Exception as e:
        log.warning("Triton decode kernel unavailable (%s); CUDA decode uses the PyTorch path", e)
    _load_skinny_gemm()
    if _skinny is not None:
        _skinny.PDL = pdl
        _skinny.PDL_PREFETCH = _env_int("TNL_PDL_PREFETCH", _skinny.PDL_PREFETCH)


def backend_names(device: torch.device) -> dict[str, str]:
    """Which implementation runs prefill and decode on `device` (for logs and bench output)."""
    if device.type != "cuda":
        return {"prefill": "torch", "decode": "torch", "decode_matmul": "torch"}
    _load_cuda_kernels()
    return {"prefill": "fla.chunk_simple_gla" if _fla_chunk else "torch",
            "decode": "triton" if _triton_decode else "torch",
            "decode_matmul": "triton skinny GEMM where tuned, else cuBLAS" if _skinny else "cuBLAS"}


_HALF = (torch.bfloat16, torch.float16)   # float32 stays with cuBLAS (tl.dot would round to tf32)


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether x [T, .] @ weight may take the skinny GEMM at all: CUDA, few rows, half precision,
    no autograd (the Triton kernel has no backward). Loads the kernels and table on first use."""
    if not x.is_cuda or x.dim() != 2 or x.shape[0] > max_rows or x.dtype != weight.dtype or x.dtype not in _HALF:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    _load_cuda_kernels()
    return _skinny is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, K]. Decode-sized T on CUDA goes to the skinny GEMM
    where the tuned table says it beats cuBLAS."""
    if _skinny_ok(x, weight, SKINNY_MAX_M) and _skinny.prefer_triton(x.shape[0], *weight.shape):
        return _skinny.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def gated_linear(ab: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(a * b, weight, bias) for ab = [a | b] [T, 2K]: the GLU's gate product and its
    down projection. Decode-sized T on CUDA multiplies a * b inside the skinny GEMM's loads."""
    # any tuned shape: the fused gate saves a kernel of its own, worth more than cuBLAS's edge
    # where the table has one; but every CTA re-reads both halves of x, which at many rows costs
    # more than that kernel (measured at 64 rows: 59 us vs 43 us), hence SKINNY_GATED_MAX_M
    if _skinny_ok(ab, weight, SKINNY_GATED_MAX_M) and _skinny.has_tuned(ab.shape[0], *weight.shape):
        return _skinny.skinny_linear(ab, weight, bias, gated=True)
    a, b = ab.chunk(2, dim=-1)
    return F.linear(a * b, weight, bias)


def fused_decode_ok(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether a forward over x [T, d] runs the fused decode layers (every matmul of the layer
    through fused_linear): up to FUSED_MAX_M rows where the skinny GEMM has a tuned config for
    each of `weights` (one layer's qkvu, out_proj, l12, l3); TNL_FUSED_DECODE=0 / 1 turns it
    off / forces it."""
    if FUSED_DECODE in ("0", "1"):
        return FUSED_DECODE == "1"
    return _skinny_ok(x, weights[0], FUSED_MAX_M) and all(_skinny.has_tuned(x.shape[0], *w.shape) for w in weights)


def _fused_skinny(M: int, N: int, K: int, gated: bool) -> bool:
    """Whether fused_linear takes the skinny GEMM for this shape (given _skinny_ok): where it is
    tuned; a gated one only up to SKINNY_GATED_MAX_M rows (beyond, re-reading both halves of x
    in every CTA costs more than cuBLAS plus a product kernel)."""
    return _skinny.has_tuned(M, N, K) and (not gated or M <= SKINNY_GATED_MAX_M)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm: bool = False, gate: torch.Tensor | None = None, gated: bool = False,
                 residual: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """F.linear(y, weight, bias) with y = srms(x) when `norm`, times `gate` when given (gated:
    x = [a | b], y = a * b); with `residual`, residual += that, in place, and returned.
    On CUDA one skinny-GEMM launch does all of it where it is tuned (the norm is a per-row scale,
    summed over K while x streams through); otherwise the norm and gate kernels, then one
    cuBLAS matmul that also adds the residual (addmm with beta = 1)."""
    if _skinny_ok(x, weight, FUSED_MAX_M) and _fused_skinny(x.shape[0], *weight.shape, gated):
        return _skinny.skinny_linear(x, weight, bias, norm=norm, gate=gate, gated=gated, residual=residual,
                                     eps=eps)
    if gated:
        x, gate = x.chunk(2, dim=-1)
    if norm:
        y = rms_norm(x, gate=gate, eps=eps)
    else:
        y = x if gate is None else x * gate
    if residual is None:
        return F.linear(y, weight, bias)
    residual.addmm_(y, weight.t())
    if bias is not None:
        residual += bias
    return residual


def _skinny_used(M: int, N: int, K: int, fused) -> bool:
    """Whether a decode step of M rows launches the skinny GEMM for this matmul (see
    precompile_linears for `fused`)."""
    if isinstance(fused, dict):
        return M <= FUSED_MAX_M and FUSED_DECODE != "0" and _fused_skinny(M, N, K, fused.get("gated", False))
    if M <= FUSED_MAX_M and FUSED_DECODE != "0" and fused is not None:
        return False            # the fused decode layer runs this one
    if fused:                   # the GLU's gated l3
        return M <= SKINNY_GATED_MAX_M and _skinny.has_tuned(M, N, K)
    return M <= SKINNY_MAX_M and _skinny.prefer_triton(M, N, K)


def precompile_linears(shapes: list[tuple], rows: list[int]) -> int:
    """Compile, in parallel, the skinny-GEMM kernels that a decode step of each row count in
    `rows` will launch, so that capturing CUDA graphs does not wait on one compile after another.
    shapes: (N, K, dtype, has_bias, fused) with fused None for a matmul outside the layers (the
    head), False / True for a layer's plain / gated (l3) matmul on the unfused path, and a dict
    of skinny_linear's fusions (triton_gemm.precompile) for its call in the fused decode layer.
    Returns how many were queued."""
    _load_cuda_kernels()
    if _skinny is None:
        return 0
    jobs = []
    for M in rows:
        for N, K, dtype, has_bias, fused in shapes:
            if _skinny_used(M, N, K, fused):
                jobs.append((M, N, K, _skinny.choose_config(M, N, K), dtype, dtype, has_bias,
                             fused if isinstance(fused, dict) else bool(fused)))
    if jobs:
        _skinny.precompile(jobs)
    return len(jobs)


def rms_norm(x: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """SimpleRMSNorm over the last dim of x [T, N]: x / (||x|| / sqrt(N) + eps), normalised in
    float32 and cast back; times `gate` when given (the token mixer's u * srms(o))."""
    if x.is_cuda:
        _load_cuda_kernels()
        if _triton_norm is not None:
            return _triton_norm(x, gate, eps)
    xf = x.float()
    y = (xf / (xf.norm(2, dim=-1, keepdim=True) * xf.shape[-1] ** -0.5 + eps)).to(x.dtype)
    return y if gate is None else gate * y


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """residual += x (in place), then return srms(residual): one pass on CUDA."""
    if x.is_cuda:
        _load_cuda_kernels()
        if _triton_norm is not None:
            return _triton_norm(x, None, eps, residual=residual)
    residual += x
    return rms_norm(residual, eps=eps)


def decode_attention(q, k, v, decay, pool, slots, theta=None, positions=None):
    """One token per sequence from RAW projections: the feature map (silu, LRPE when theta is
    given) is applied here, fused into the kernel on CUDA.
    q, k, v [B, H, dh]; decay [H]; pool [S, H, dk, dv] f32; slots [B]; theta [H, 1, dh] or None;
    positions [B]. Returns o [B, H, dv]."""
    if q.is_cuda:
        _load_cuda_kernels()
        if _triton_decode is not None:
            return _triton_decode(q, k, v, decay, pool, slots, features=True, theta=theta, positions=positions)
    q = torch_ops.feature_map(q, theta, positions)
    k = torch_ops.feature_map(k, theta, positions)
    return torch_ops.recurrent_step(q, k, v, decay, pool, slots)


def prefill_attention(q, k, v, slope, pool, slots, cu_seqlens, cu_seqlens_list, chunk_size: int = 256):
    """Packed prompt chunks. q, k [T, H, dk]; v [T, H, dv]; slope [H]; pool [S, H, dk, dv] f32;
    slots [N]; cu_seqlens [N+1]. Returns o [T, H, dv]."""
    init = pool.index_select(0, slots)
    if q.is_cuda:
        _load_cuda_kernels()
    if q.is_cuda and _fla_chunk is not None:
        o, final = _fla_chunk(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g_gamma=-slope, scale=1.0,
                              initial_state=init, output_final_state=True, cu_seqlens=cu_seqlens)
        o = o.squeeze(0)
    else:
        o, final = torch_ops.varlen_chunk_attention(q, k, v, slope, init, cu_seqlens_list, chunk_size)
    pool.index_copy_(0, slots, final.float())
    return o
