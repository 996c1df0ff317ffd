"""Attention kernels, chosen by device: fla's chunked kernel and tnl's Triton decode kernel on CUDA
(when installed), the plain PyTorch path (torch_ops) everywhere else.

Both entry points read each sequence's state from the pool and write it back in place.
"""
from __future__ import annotations

import logging
import os

import torch

from tnl.kernels import torch_ops

log = logging.getLogger(__name__)

_fla_chunk = None
_triton_decode = None
_triton_norm = None
_checked = False


def _load_cuda_kernels() -> None:
    global _fla_chunk, _triton_decode, _triton_norm, _checked
    if _checked:
        return
    _checked = True
    if os.environ.get("TNL_DISABLE_FAST_KERNELS") == "1":
        log.info("fast kernels disabled by TNL_DISABLE_FAST_KERNELS=1")
        return
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        _fla_chunk = chunk_simple_gla
    except Exception as e:  # fla-core is optional: the [cuda] extra
        log.warning("fla-core not importable (%s); CUDA prefill uses the PyTorch path", e)
    try:
        from tnl.kernels.triton_decode import recurrent_step_triton, rms_norm as triton_rms_norm
        _triton_decode = recurrent_step_triton
        _triton_norm = triton_rms_norm
    except Exception as e:
        log.warning("Triton decode kernel unavailable (%s); CUDA decode uses the PyTorch path", e)


def backend_names(device: torch.device) -> dict[str, str]:
    """Which implementation runs prefill and decode on `device` (for logs and bench output)."""
    if device.type != "cuda":
        return {"prefill": "torch", "decode": "torch"}
    _load_cuda_kernels()
    return {"prefill": "fla.chunk_simple_gla" if _fla_chunk else "torch",
            "decode": "triton" if _triton_decode else "torch"}


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
