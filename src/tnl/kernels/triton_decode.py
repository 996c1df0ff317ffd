"""Triton kernels for the CUDA decode path.

recurrent_step_triton: one token for each of B sequences, reading each state once from the
pool and writing it once (update + output in one pass, no gather/scatter copies).
rms_norm / norm_gate: SimpleRMSNorm in one pass over each row (the torch form is ~5 kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel be scheduled, then wait for the
    previous one to finish (its writes visible). Call before the first memory access."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def _recurrent_step_kernel(q_ptr, k_ptr, v_ptr, o_ptr, decay_ptr, pool_ptr, slots_ptr, theta_ptr, pos_ptr,
                           stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                           stride_ob, stride_oh, stride_ps, stride_ph, stride_pk,
                           DH: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                           BV: tl.constexpr, FEATURES: tl.constexpr, LRPE: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = vb * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    if FEATURES:
        # raw projections in: silu, then LRPE [x cos(theta t), x sin(theta t)] when on
        src = rk % DH
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + src, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + src, mask=mk, other=0.0).to(tl.float32)
        q = (q * tl.sigmoid(q)).to(q_ptr.dtype.element_ty).to(tl.float32)
        k = (k * tl.sigmoid(k)).to(k_ptr.dtype.element_ty).to(tl.float32)
        if LRPE:
            t = tl.load(pos_ptr + b).to(tl.float32)
            ang = tl.load(theta_ptr + h * DH + src, mask=mk, other=0.0).to(tl.float32) * t
            f = tl.where(rk < DH, tl.cos(ang), tl.sin(ang))
            q = (q * f).to(q_ptr.dtype.element_ty).to(tl.float32)
            k = (k * f).to(k_ptr.dtype.element_ty).to(tl.float32)
    else:
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + rk, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + rv, mask=mv, other=0.0).to(tl.float32)
    lam = tl.load(decay_ptr + h)
    s_ptrs = pool_ptr + slot * stride_ps + h * stride_ph + rk[:, None] * stride_pk + rv[None, :]
    m2 = mk[:, None] & mv[None, :]
    # a 16-bit pool (the engine's state_dtype) is read into float32, updated there and written back
    # rounded once; the output uses the float32 update (as torch_ops.recurrent_step does)
    S = tl.load(s_ptrs, mask=m2, other=0.0).to(tl.float32)
    S = lam * S + k[:, None] * v[None, :]
    tl.store(s_ptrs, S.to(pool_ptr.dtype.element_ty), mask=m2)
    o = tl.sum(q[:, None] * S, axis=0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rv, o.to(o_ptr.dtype.element_ty), mask=mv)


def recurrent_step_triton(q, k, v, decay, pool, slots, features: bool = False, theta=None, positions=None,
                          block_v: int | None = None, num_warps: int = 4, pdl: bool = False):
    """Same contract as torch_ops.recurrent_step: q, k [B, H, dk]; v [B, H, dv]; decay [H] f32;
    pool [S, H, dk, dv] contiguous, float32 or 16-bit (state_dtype); slots [B] long. Returns o [B, H, dv] in v's dtype.

    With features=True, q and k are the raw projections [B, H, dh]: the kernel applies silu and,
    when theta [H, 1, dh] is given, LRPE at `positions` [B] (then dk = 2 dh), rounding to the
    input dtype after each step as the unfused torch path does. block_v / num_warps override the
    launch shape (benchmarks/decode_kernel_bench.py sweeps them). pdl: launch with programmatic
    dependent launch (sm_90+; see tnl.kernels.config.KernelConfig.pdl)."""
    B, H, DH = q.shape
    DK = 2 * DH if (features and theta is not None) else DH
    DV = v.shape[-1]
    assert pool.is_contiguous() and pool.dtype in (torch.float32, torch.bfloat16, torch.float16), pool.dtype
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    o = torch.empty(B, H, DV, dtype=v.dtype, device=v.device)
    BK = triton.next_power_of_2(DK)
    BV = block_v or max(16, min(triton.next_power_of_2(DV), 8192 // BK))
    grid = (B, H, triton.cdiv(DV, BV))
    assert pool.shape[2] == DK, (pool.shape, DK)
    th = theta.reshape(-1) if theta is not None else decay
    ps = positions if positions is not None else slots
    _recurrent_step_kernel[grid](q, k, v, o, decay, pool, slots, th, ps,
                                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                 o.stride(0), o.stride(1), pool.stride(0), pool.stride(1), pool.stride(2),
                                 DH=DH, DK=DK, DV=DV, BK=BK, BV=BV, FEATURES=features, LRPE=theta is not None,
                                 PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return o


@triton.jit
def _rms_norm_kernel(x_ptr, g_ptr, y_ptr, r_ptr, stride_x, stride_g, stride_y, stride_r, N, eps,
                     HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RESIDUAL:
        # r <- r + x (rounded to r's dtype, as a torch add would), then normalise the sum
        x = (tl.load(r_ptr + row * stride_r + cols, mask=m, other=0.0).to(tl.float32) + x.to(tl.float32))
        x = x.to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * stride_r + cols, x, mask=m)
    x = x.to(tl.float32)
    rms = tl.sqrt(tl.sum(x * x, axis=0)) / tl.sqrt(N.to(tl.float32))
    y = x / (rms + eps)
    y = y.to(y_ptr.dtype.element_ty)
    if HAS_GATE:
        g = tl.load(g_ptr + row * stride_g + cols, mask=m, other=0.0)
        y = (g * y).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + cols, y, mask=m)


def rms_norm(x: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-8,
             residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """srms over the last dim of a 2-D tensor, optionally times `gate` (same shape): one pass.
    With `residual`, first residual += x in place and normalise the sum.
    Rounds like the torch path (torch_ops.rms_norm): normalise in float32, cast, then gate in the
    input dtype. pdl: as for recurrent_step_triton."""
    assert x.dim() == 2 and x.stride(-1) == 1
    n_rows, N = x.shape
    y = torch.empty(n_rows, N, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y
    g = gate if gate is not None else x
    r = residual if residual is not None else x
    assert g.stride(-1) == 1 and r.stride(-1) == 1
    BLOCK = triton.next_power_of_2(N)
    _rms_norm_kernel[(n_rows,)](x, g, y, r, x.stride(0), g.stride(0), y.stride(0), r.stride(0), N, eps,
                                HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
                                PDL=pdl, num_warps=8 if BLOCK >= 4096 else 4, launch_pdl=pdl)
    return y
