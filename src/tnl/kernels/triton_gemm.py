"""Skinny GEMM for decode: out = x @ W.T (+ bias) for a few rows of x and a large weight.

At decode batch sizes (M <= 64) a linear layer reads its whole bf16 weight W [N, K] once and does
almost no math, so the only thing that matters is streaming W from HBM at full bandwidth:
  * each CTA owns a [BLOCK_N, K / SPLIT_K] slab of W and all M rows of x (one M tile when
    BLOCK_M >= M), so W is read exactly once; x is tiny and stays in L2;
  * the loop over K is software-pipelined (num_stages) so several [BLOCK_N, BLOCK_K] tiles are
    in flight per CTA, with 16-byte vector loads along K (W rows are contiguous);
  * SPLIT_K > 1 gives shapes with few N tiles (out_proj, l3: N = 4096) enough CTAs to cover all
    SMs. Each split writes an fp32 partial [M, BLOCK_N] to a workspace and bumps a per-tile
    counter; the last split to arrive sums the partials in split order (deterministic, no float
    atomics), adds the bias, casts and stores, and resets the counter to 0. The counters live in
    a per-device buffer that is all zeros between calls, so there is no memset launch and the
    call is CUDA-graph capturable (one kernel; only torch.empty allocations).
Two ways to do the math, chosen per config (the benchmark decides which is faster):
  * USE_DOT: tl.dot(W tile, x tile^T) -> acc [BLOCK_N, BLOCK_M]. N is the MMA's M dimension, so a
    BLOCK_N >= 64 tile runs on Hopper wgmma even for one token (x padded to BLOCK_M >= 16 rows).
  * FMA (BLOCK_M <= 8): broadcast multiply and tl.sum on CUDA cores, no padding of x; for
    BLOCK_M == 1 the K reduction is deferred to after the loop (one FMA per weight element).

Configs: Config / candidate_configs (what benchmarks/gemm_bench.py sweeps) / TunedTable (the
benchmark's best config per shape, loaded from its JSON; tnl.kernels.backend.Backend holds one and
passes its choice as `config`) / heuristic_config (the untuned default). precompile() compiles many
configs' kernels in parallel threads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Config:
    """One launch configuration. BLOCK_M: rows of x per CTA (M tiles beyond it re-read W, so the
    tuner keeps BLOCK_M >= M up to 64). SPLIT_K: CTAs sharing one [BLOCK_N] output tile along K.
    USE_DOT=False (FMA) needs BLOCK_M <= 8."""
    BLOCK_M: int = 16
    BLOCK_N: int = 64
    BLOCK_K: int = 128
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 4
    USE_DOT: bool = True

    @property
    def name(self) -> str:
        kind = "dot" if self.USE_DOT else "fma"
        return (f"{kind} m{self.BLOCK_M} n{self.BLOCK_N} k{self.BLOCK_K} s{self.SPLIT_K} "
                f"w{self.num_warps} p{self.num_stages}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def smem_bytes(self, elem_size: int = 2) -> int:
        """Shared memory of the pipeline buffers (an estimate: Triton may need a little more)."""
        return self.num_stages * (self.BLOCK_N + self.BLOCK_M) * self.BLOCK_K * elem_size


_NUM_SMS: dict[int, int] = {}
_COUNTERS: dict[str, list[torch.Tensor]] = {}    # device -> split-K arrival counter buffers
_SMEM_LIMIT = 220 * 1024          # H100: 227 KB per CTA; leave room for Triton's own scratch


def m_bucket(M: int) -> int:
    """The tuning bucket of M: the next power of two (1, 2, 4, ..., 64, 128, ...)."""
    return 1 if M <= 1 else 1 << (M - 1).bit_length()


def _num_sms(device: torch.device | None = None) -> int:
    if not torch.cuda.is_available():
        return 132
    idx = torch.cuda.current_device() if device is None or device.index is None else device.index
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


@triton.jit
def _load_w(w_ptrs, n_ok, k_ok, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """W tile [BLOCK_N, BLOCK_K], masked only along the ragged dimensions."""
    if EVEN_K:
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    return w


@triton.jit
def _load_x(x_ptrs, m_ok, k_ok, EVEN_K: tl.constexpr):
    """x tile [BLOCK_M, BLOCK_K]; rows past M read as 0 (masked: no memory traffic)."""
    if EVEN_K:
        x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
    else:
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    return x


@triton.jit
def _load_xg(x_ptrs, g_ptrs, m_ok, k_ok, EVEN_K: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr):
    """x tile, or for a gated call the tile of x * g, rounded to x's dtype as the unfused
    product would be; and, for a normed call, the float32 squares of x (before the gate)."""
    x = _load_x(x_ptrs, m_ok, k_ok, EVEN_K)
    sq = x
    if NORM:
        sq = x.to(tl.float32) * x.to(tl.float32)
    if GATED:
        x = (x.to(tl.float32) * _load_x(g_ptrs, m_ok, k_ok, EVEN_K).to(tl.float32)).to(x.dtype)
    return x, sq


@triton.jit
def _epilogue(acc, ss, K, eps, b_ptr, r_ptr, o_ptr, rm, rn, M, N, stride_rm, stride_om,
              HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 -> (* srms scale of each row) (+ bias) -> out's dtype
    (+ residual, rounded again, as `residual + out` would be) -> out[rm, rn].
    ss [BLOCK_M]: each row's sum of squares of x over all of K (NORM)."""
    n_ok = rn < N
    if NORM:
        # srms(x) = x / (||x|| / sqrt(K) + eps), a per-row scalar: applied to x @ W.T
        acc = acc * (1.0 / (tl.sqrt(ss) / tl.sqrt(K.to(tl.float32)) + eps))[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    ok = n_ok[:, None] & (rm < M)[None, :]
    if RESIDUAL:
        r = tl.load(r_ptr + rm[None, :].to(tl.int64) * stride_rm + rn[:, None], mask=ok, other=0.0)
        acc = acc.to(o_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32)
    o_ptrs = o_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, g_ptr, w_ptr, b_ptr, r_ptr, o_ptr, ws_ptr, ss_ptr, cnt_ptr, M, N, K,
                   stride_xm, stride_gm, stride_wn, stride_rm, stride_om, SPLIT_K, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_DOT: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                   GATED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                   PREFETCH: tl.constexpr, s_ptr=None, HAS_SCALE: tl.constexpr = False):
    # HAS_SCALE: W is 8-bit (int8 or float8 e4m3, tnl.kernels.quant) with a float32 scale per output
    # channel at s_ptr [N]: each tile is converted to x's dtype in registers and the scale applied
    # once to the sum over K (for a 16-bit W both are no-ops and s_ptr is None)
    # 1-D grid, M tile fastest (CTAs sharing a W slab run together when M > BLOCK_M), then the
    # K split, then the N tile
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_k = (pid // num_m) % SPLIT_K
    pid_n = pid // (num_m * SPLIT_K)
    # this split's K tiles [kt0, kt1): balanced, whole tiles, only the very last one may be ragged
    k_tiles = tl.cdiv(K, BLOCK_K)
    kt0 = pid_k * k_tiles // SPLIT_K
    kt1 = (pid_k + 1) * k_tiles // SPLIT_K

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    k_off = kt0 * BLOCK_K
    if PDL:
        # programmatic dependent launch: let the next kernel's CTAs be scheduled now (they wait
        # in their own gdc_wait); start pulling the first PREFETCH bytes of this CTA's W slab
        # into L2 (W is never written, so this may overlap the previous kernel's tail); then
        # wait until the previous kernel is complete and its writes visible
        tl.extra.cuda.gdc_launch_dependents()
        if PREFETCH > 0:
            ELEM: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
            row_bytes = (tl.minimum(kt1 * BLOCK_K, K) - k_off) * ELEM
            row_bytes = tl.minimum(row_bytes, PREFETCH // BLOCK_N) // 16 * 16
            rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64) * stride_wn + k_off
            tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                      [rows, tl.full([BLOCK_N], 0, tl.int32) + row_bytes],
                                      dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_off + rk)[None, :]
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k_off + rk)[None, :]
    g_ptrs = g_ptr + rm[:, None].to(tl.int64) * stride_gm + (k_off + rk)[None, :]
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)       # NORM: sum of x^2 over this split's K

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kt in range(kt0, kt1):      # pipelined by the launch's num_stages (loads feed a dot)
            k_ok = (kt * BLOCK_K + rk) < K
            w = _load_w(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
            x, sq = _load_xg(x_ptrs, g_ptrs, m_ok, k_ok, EVEN_K, GATED, NORM)
            if NORM:
                ss += tl.sum(sq, axis=1)
            # W tile is the MMA's A operand (BLOCK_N rows), x^T the narrow B operand
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
    elif BLOCK_M == 1:
        # GEMV: keep per-lane partial sums over K and reduce once after the loop.
        # Loads that feed no dot are only pipelined when the loop asks for it (tl.range).
        acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss_k = tl.zeros((1, BLOCK_K), dtype=tl.float32)
        for kt in tl.range(kt0, kt1, num_stages=NUM_STAGES):
            k_ok = (kt * BLOCK_K + rk) < K
            w = _load_w(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K)
            x, sq = _load_xg(x_ptrs, g_ptrs, m_ok, k_ok, EVEN_K, GATED, NORM)
            if NORM:
                ss_k += sq
            acc_k += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
        acc = tl.sum(acc_k, axis=1)[:, None]
        ss = tl.sum(ss_k, axis=1)
    else:
        # a few rows of x: one K reduction per row per tile, added into column m of acc
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        cols = tl.arange(0, BLOCK_M)
        x_row = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm + k_off + rk
        g_row = g_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_gm + k_off + rk
        for kt in tl.range(kt0, kt1, num_stages=NUM_STAGES):
            k_ok = (kt * BLOCK_K + rk) < K
            w = _load_w(w_ptrs, n_ok, k_ok, EVEN_N, EVEN_K).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                row_ok = k_ok & (pid_m * BLOCK_M + m < M)
                xm = tl.load(x_row + m * stride_xm, mask=row_ok, other=0.0)
                if NORM:
                    ss = tl.where(cols == m, ss + tl.sum(xm.to(tl.float32) * xm.to(tl.float32)), ss)
                if GATED:
                    xg = tl.load(g_row + m * stride_gm, mask=row_ok, other=0.0)
                    xm = (xm.to(tl.float32) * xg.to(tl.float32)).to(xm.dtype)
                s = tl.sum(w * xm.to(tl.float32)[None, :], axis=1)
                acc = tl.where(cols[None, :] == m, acc + s[:, None], acc)
            w_ptrs += BLOCK_K
            x_row += BLOCK_K
            g_row += BLOCK_K

    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[:, None]
    if SPLIT:
        # partial -> workspace [SPLIT_K, M, N] fp32 (and, NORM, the partial sums of squares ->
        # [SPLIT_K, N tiles, M]); the last of the SPLIT_K CTAs of this tile (the counter's old
        # value says who) reduces them in split order and writes out
        o_ok = n_ok[:, None] & m_ok[None, :]
        ws_off = rm[None, :].to(tl.int64) * N + rn[:, None]
        MN = M.to(tl.int64) * N
        tl.store(ws_ptr + pid_k * MN + ws_off, acc, mask=o_ok)
        num_n = tl.cdiv(N, BLOCK_N)
        if NORM:
            tl.store(ss_ptr + (pid_k * num_n + pid_n).to(tl.int64) * M + rm, ss, mask=m_ok)
        # every thread's partial is issued before one thread's release-atomic publishes the tile
        tl.debug_barrier()
        tile = pid_n * num_m + pid_m
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            ss_total = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for s in range(0, SPLIT_K):
                # .cg: read at L2, where the other SMs' partials are (L1 is not coherent)
                total += tl.load(ws_ptr + s * MN + ws_off, mask=o_ok, other=0.0, cache_modifier=".cg")
                if NORM:
                    ss_total += tl.load(ss_ptr + (s * num_n + pid_n).to(tl.int64) * M + rm, mask=m_ok,
                                        other=0.0, cache_modifier=".cg")
            _epilogue(total, ss_total, K, eps, b_ptr, r_ptr, o_ptr, rm, rn, M, N, stride_rm, stride_om,
                      HAS_BIAS, NORM, RESIDUAL)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")   # ready for the next call
    else:
        _epilogue(acc, ss, K, eps, b_ptr, r_ptr, o_ptr, rm, rn, M, N, stride_rm, stride_om,
                  HAS_BIAS, NORM, RESIDUAL)


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 split-K arrival counters, all zero (each call leaves them zero again).

    Buffers are never freed: a captured CUDA graph keeps using the one it was captured with. A
    buffer first needed during a capture is allocated (and zeroed) inside it, so the graph zeroes
    its own private copy on every replay and the shared one is untouched."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bufs = _COUNTERS.setdefault(str(device), [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    bufs.append(buf)
    return buf


def split_k_counters() -> list[torch.Tensor]:
    """Every split-K arrival-counter buffer allocated so far (outside CUDA-graph captures). Each
    call leaves the counters it used at zero: a non-zero one would skip a later call's reduction."""
    return [buf for bufs in _COUNTERS.values() for buf in bufs]


def _split_k(cfg: Config, K: int) -> int:
    return max(1, min(cfg.SPLIT_K, triton.cdiv(K, cfg.BLOCK_K)))


def _meta(cfg: Config, N: int, K: int, split: int, has_bias: bool, gated: bool = False,
          norm: bool = False, residual: bool = False, w_aligned: bool | None = None,
          pdl: bool = False, prefetch: int = 0) -> dict:
    """The kernel's compile-time arguments and launch options for this config and shape.
    w_aligned: W's start and row stride are multiples of 16 bytes (default: a contiguous
    half-precision W, i.e. K % 8 == 0), which the L2 bulk prefetch needs."""
    if w_aligned is None:
        w_aligned = K % 8 == 0
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, USE_DOT=cfg.USE_DOT,
                SPLIT=split > 1, HAS_BIAS=has_bias, EVEN_N=N % cfg.BLOCK_N == 0, EVEN_K=K % cfg.BLOCK_K == 0,
                NUM_STAGES=cfg.num_stages, GATED=gated, NORM=norm, RESIDUAL=residual, PDL=pdl,
                PREFETCH=prefetch if pdl and w_aligned else 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl)


def _row_major(t: torch.Tensor, K: int, what: str) -> torch.Tensor:
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])    # not -1: K may be 0
    assert t2.shape[-1] == K, (what, t.shape, K)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: Config | None = None, out_dtype: torch.dtype | None = None,
                  gated: bool = False, gate: torch.Tensor | None = None, norm: bool = False,
                  residual: torch.Tensor | None = None, eps: float = 1e-8, pdl: bool = False,
                  prefetch: int = 0, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for few-row x: x [..., K], weight [N, K] (row-major, like
    nn.Linear.weight), bias [N] or None. fp32 accumulation; the result is in out_dtype (default
    x.dtype; float32 e.g. for lm_head logits). config: a Config (a TunedTable's choose_config),
    else heuristic_config(M, N, K).

    Fused on the way (each saves a kernel of its own at decode time):
      gate: [..., K]: F.linear(x * gate, ...), multiplied while x is loaded; gated=True: x is
        [..., 2K] = [a | b] and the gate is b (a GLU's a * b).
      norm: SimpleRMSNorm of x first (x / (||x|| / sqrt(K) + eps), before the gate): a per-row
        scalar, so each CTA sums x^2 over the K it reads and the output is scaled at the end.
      residual: [..., N] in out's dtype: returns residual + out, written into `residual` in place.

    pdl: launch with programmatic dependent launch (sm_90+), and then have each block prefetch
    `prefetch` bytes of its W slab into L2 before waiting on the previous kernel (see
    tnl.kernels.config.KernelConfig).

    scale: [N] float32 for an 8-bit weight (int8 or float8_e4m3fn, tnl.kernels.quant): out = x @
    (scale[:, None] * weight).T, each W tile converted to x's dtype in registers.

    One kernel launch, no host sync: safe to capture in a CUDA graph. Concurrent split-K calls on
    different streams of one device would share the arrival counters: use one stream at a time."""
    N, K = weight.shape
    if scale is None:
        assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    else:
        assert weight.dtype in (torch.int8, torch.float8_e4m3fn), weight.dtype
        assert scale.shape == (weight.shape[0],) and scale.dtype == torch.float32 and scale.stride(0) == 1, \
            (scale.shape, scale.dtype)
    assert weight.stride(-1) == 1, "weight must be row-major (contiguous along K)"
    assert not (gated and gate is not None), "gated=True takes the gate from x's second half"
    lead = x.shape[:-1]
    x2 = _row_major(x, 2 * K if gated else K, "x")
    M = x2.shape[0]
    if gated:
        x2, g2 = x2[:, :K], x2[:, K:]
    elif gate is not None:
        g2 = _row_major(gate, K, "gate")
        assert g2.shape[0] == M and g2.dtype == x.dtype, (gate.shape, gate.dtype, x.shape)
    else:
        g2 = x2
    if residual is not None:
        out = residual.view(-1, N)          # updated in place (a view, so it must be one already)
        assert out.shape[0] == M and out.stride(-1) == 1, (residual.shape, M, N)
        assert out_dtype is None or out_dtype == out.dtype
    else:
        out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    if K == 0:                              # x @ W.T is zero: out = (residual or 0) + bias
        if residual is None:
            out.zero_()
        if bias is not None:
            out += bias
        return out.reshape(*lead, N)
    if bias is not None:
        assert bias.shape == (N,) and bias.stride(0) == 1, bias.shape
    cfg = config or heuristic_config(M, N, K)
    assert cfg.USE_DOT or cfg.BLOCK_M <= 8, "FMA configs take at most 8 rows per CTA"
    num_m = triton.cdiv(M, cfg.BLOCK_M)
    num_n = triton.cdiv(N, cfg.BLOCK_N)
    split = _split_k(cfg, K)
    if split > 1:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        ss = torch.empty((split, num_n, M), dtype=torch.float32, device=x.device) if norm else ws
        cnt = _counters(x.device, num_m * num_n)
    else:
        ws = ss = cnt = out                     # unused (SPLIT=False)
    grid = (num_m * num_n * split,)
    _skinny_kernel[grid](x2, g2, weight, bias if bias is not None else out, out, out, ws, ss, cnt, M, N, K,
                         x2.stride(0), g2.stride(0), weight.stride(0), out.stride(0), out.stride(0), split, eps,
                         **({} if scale is None else dict(s_ptr=scale, HAS_SCALE=True)),
                         **_meta(cfg, N, K, split, bias is not None, gated or gate is not None, norm,
                                 residual is not None, w_aligned=weight.data_ptr() % 16 == 0
                                 and weight.stride(0) * weight.element_size() % 16 == 0, pdl=pdl,
                                 prefetch=prefetch))
    return out.reshape(*lead, N)


def precompile(jobs, max_workers: int | None = None, *, pdl: bool = False, prefetch: int = 0) -> tuple[int, int]:
    """Compile the kernels that skinny_linear will launch for `jobs`, in parallel threads (Triton
    drops the GIL while compiling), so that first calls do not stall one compile at a time: for
    a config sweep, or before capturing CUDA graphs. jobs: iterable of
    (M, N, K, config, dtype, out_dtype, has_bias[, fused]) for contiguous x [M, K] and weight
    [N, K] of `dtype`; fused: True for gated=True, or a dict of skinny_linear's fusions: gated
    (bool), gate_stride (row stride of a separate gate, 0 for none), norm (bool), residual
    (bool). pdl, prefetch: as the calls will pass them to skinny_linear (they are compile-time
    arguments). Returns (distinct kernels, how many failed to compile); a failed one fails again,
    with its error, at its first real call. Needs the CUDA driver; a no-op under
    TRITON_INTERPRET=1. Without triton.AsyncCompileMode (triton < 3.4) it compiles serially and
    counts jobs instead of distinct kernels."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 0, 0
    async_cls = getattr(triton, "AsyncCompileMode", None)
    n = failed = 0
    with ThreadPoolExecutor(max_workers or min(16, os.cpu_count() or 1)) as ex:
        mode = async_cls(ex, ignore_errors=True) if async_cls else None
        with mode or contextlib.nullcontext():
            for M, N, K, cfg, dtype, out_dtype, has_bias, *fused in jobs:
                f = fused[0] if fused else {}
                f = f if isinstance(f, dict) else {"gated": bool(f)}
                gated, gate_stride = f.get("gated", False), f.get("gate_stride", 0)
                norm, residual = f.get("norm", False), f.get("residual", False)
                x_stride = 2 * K if gated else K
                split = _split_k(cfg, K)
                n += 1
                try:
                    # dtypes stand in for tensors (triton wraps them as aligned mock tensors);
                    # pointers and ints as skinny_linear passes them, so the cache keys match
                    spare = torch.float32 if split > 1 else out_dtype
                    _skinny_kernel.warmup(dtype, dtype, dtype, dtype if has_bias else out_dtype, out_dtype,
                                          out_dtype, spare, spare,
                                          torch.int32 if split > 1 else out_dtype,
                                          M, N, K, x_stride, gate_stride or x_stride, K, N, N, split, 1e-8,
                                          grid=(1,), **_meta(cfg, N, K, split, has_bias, gated or gate_stride > 0,
                                                              norm, residual, pdl=pdl, prefetch=prefetch))
                except Exception:             # serial mode: the real call reports it
                    failed += 1
    if mode is not None:
        futures = getattr(mode, "future_kernels", {}).values()
        return len(futures), sum(f.future.exception() is not None for f in futures)
    return n, failed


# ---------------------------------------------------------------------------------------------
# configuration choice


def _split_choices(n_ctas: int, k_tiles: int, num_sms: int, quick: bool = False,
                   min_k_tiles: int = 4) -> list[int]:
    """SPLIT_K values that bring n_ctas * split to about 1, 2 and 4 CTAs per SM (quick: 2),
    keeping at least min_k_tiles K tiles per split (shorter loops barely fill the pipeline)."""
    out = []
    for per_sm in ((2,) if quick else (1, 2, 4)):
        s = max(1, -(-per_sm * num_sms // n_ctas))
        s = min(s, max(1, k_tiles // min_k_tiles))
        if s not in out:
            out.append(s)
    return sorted(out)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) tiles swept by candidate_configs. Dot tiles are for
# BLOCK_M = 16 and lose a stage per doubling of BLOCK_M beyond 32 (the x tile and accumulator grow).
# Most fit two CTAs per SM (<= ~110 KB of shared memory) at BLOCK_M = 16.
_DOT_TILES = [(16, 256, 4, 6), (32, 256, 4, 4), (64, 128, 4, 4), (64, 128, 4, 5), (64, 256, 4, 3),
              (128, 64, 4, 6), (128, 128, 4, 3), (128, 128, 8, 4)]
_DOT_TILES_QUICK = [(32, 256, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3)]
_FMA_TILES = [(8, 512, 4, 4), (16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 8, 3)]
_FMA_TILES_QUICK = [(16, 256, 4, 4), (32, 256, 4, 3)]


def candidate_configs(M: int, N: int, K: int, quick: bool = False,
                      num_sms: int | None = None) -> list[Config]:
    """Configs worth timing for this shape: a few dozen at most (`quick`: about a quarter).

    Dot configs with BLOCK_M = the M bucket clamped to [16, 64] over _DOT_TILES (64 and 128 over
    _DOT_TILES_QUICK for M > 64); FMA configs with BLOCK_M = the M bucket for M <= 4; each with the SPLIT_K values
    that give about 1, 2 and 4 CTAs per SM. Configs over the shared-memory budget are dropped."""
    num_sms = num_sms or _num_sms()
    mb = m_bucket(M)
    k_cap = max(64, triton.next_power_of_2(K))
    cands: list[Config] = []

    def add(bm, bn, bk, warps, stages, use_dot):
        bk = min(bk, k_cap)
        n_ctas = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        for s in _split_choices(n_ctas, triton.cdiv(K, bk), num_sms, quick):
            c = Config(bm, bn, bk, s, warps, stages, use_dot)
            if c.smem_bytes() <= _SMEM_LIMIT and c not in cands:
                cands.append(c)

    for bm in ([min(max(16, mb), 64)] if mb <= 64 else [64, 128]):
        # M > 64 is outside the skinny regime (reported for information): the short list only
        for bn, bk, warps, stages in (_DOT_TILES_QUICK if quick or mb > 64 else _DOT_TILES):
            if bn == 16 and mb > 4:      # x tile as large as the W tile: only for GEMV-like M
                continue
            stages = max(2, stages - max(0, bm.bit_length() - 6))     # 64: -1, 128: -2
            add(bm, bn, bk, warps, stages, True)
    if mb <= 4:
        for bn, bk, warps, stages in (_FMA_TILES_QUICK if quick else _FMA_TILES):
            add(mb, bn, bk, warps, stages, False)
    return cands


def heuristic_config(M: int, N: int, K: int, num_sms: int | None = None) -> Config:
    """A reasonable untuned choice: dot with BLOCK_M = the M bucket (16..64), 64 x 128 W tiles,
    4 stages (two CTAs fit an SM), and K splits (powers of two, >= 8 K tiles each) until there
    are about 2 CTAs per SM (1.75: 256 CTAs on 132 SMs is one full wave)."""
    num_sms = num_sms or _num_sms()
    bm = min(max(16, m_bucket(M)), 64)
    bn, bk = 64, 128
    stages = 4 if bm <= 32 else 3
    n_ctas = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_tiles = triton.cdiv(K, bk)
    split = 1
    while n_ctas * split < 1.75 * num_sms and k_tiles // (2 * split) >= 8:
        split *= 2
    return Config(bm, bn, bk, split, 4, stages, True)


@dataclass
class TunedTable:
    """What benchmarks/gemm_bench.py measured on one card: per (m_bucket(M), N, K) the best config
    and its speedup over cuBLAS (<= 1: cuBLAS is as fast). Loaded from the benchmark's JSON:
    either the whole output (its "tuned" key is used) or the "tuned" list itself:
        [{"m_bucket": 1, "N": 4096, "K": 4096, "config": {"BLOCK_M": 16, ...},
          "speedup_vs_cublas": 1.08}, ...]"""

    configs: dict[tuple[int, int, int], Config] = field(default_factory=dict)
    speedups: dict[tuple[int, int, int], float] = field(default_factory=dict)

    @classmethod
    def load(cls, path_or_obj) -> TunedTable:
        """From a path, or an already-parsed object, of the benchmark's JSON."""
        obj = path_or_obj
        if not isinstance(obj, (dict, list)):
            with open(obj) as f:
                obj = json.load(f)
        table = cls()
        for r in obj["tuned"] if isinstance(obj, dict) else obj:
            key = (int(r["m_bucket"]), int(r["N"]), int(r["K"]))
            table.configs[key] = Config.from_dict(r["config"])
            if "speedup_vs_cublas" in r:
                table.speedups[key] = float(r["speedup_vs_cublas"])
        return table

    def __len__(self) -> int:
        return len(self.configs)

    def choose_config(self, M: int, N: int, K: int) -> Config:
        """The measured best config for this shape, else heuristic_config."""
        cfg = self.configs.get((m_bucket(M), N, K))
        return cfg if cfg is not None else heuristic_config(M, N, K)

    def has_tuned(self, M: int, N: int, K: int) -> bool:
        """Whether the benchmark measured this shape (its best config is known)."""
        return (m_bucket(M), N, K) in self.configs

    def prefer_triton(self, M: int, N: int, K: int, margin: float = 1.0) -> bool:
        """Whether skinny_linear beat cuBLAS here by more than `margin` (False for shapes the
        benchmark has not measured)."""
        return self.speedups.get((m_bucket(M), N, K), 0.0) > margin


def tuned_entry(m_bucket_: int, N: int, K: int, cfg: Config, speedup: float | None = None) -> dict:
    """One row of the `tuned` list that benchmarks/gemm_bench.py writes and TunedTable.load reads."""
    d = {"m_bucket": m_bucket_, "N": N, "K": K, "config": cfg.to_dict()}
    if speedup is not None:
        d["speedup_vs_cublas"] = round(float(speedup), 4)
    return d
