"""8-bit matmuls on CUDA: tnl's skinny GEMM (triton_gemm) over int8 / float8 e4m3 weights, for
every row count.

The kernel loads 1-byte W tiles, converts them to x's dtype in registers (exact) and multiplies
each output channel by its float32 scale after the sum over K (skinny_linear's `scale`); it never
makes a 16-bit copy of W, which would read and write 3 bytes per weight more than it saves (a
whole-weight upcast ran at 0.46x of bf16 in pytorch/ao #574).

  * decode-sized x (M <= DECODE_MAX_M rows): the config the tuned table has for the bf16 shape,
    else triton_gemm.heuristic_config (the weight traffic halves, the shape of the work does not);
  * prompt chunks: PREFILL_CONFIG, a plain tiled GEMM (128 x 128 output tiles, no K split), over
    row blocks of at most PREFILL_ROWS rows, so that each block's x stays in L2 while the W slabs
    stream past once per block (the kernel walks its M tiles fastest).
"""
from __future__ import annotations

import torch

from tnl.kernels import triton_gemm
from tnl.kernels.triton_gemm import Config, TunedTable

DECODE_MAX_M = 64
PREFILL_CONFIG = Config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3, USE_DOT=True)
PREFILL_ROWS = 1024


def choose_config(M: int, N: int, K: int, table: TunedTable | None) -> Config:
    if M > DECODE_MAX_M:
        return PREFILL_CONFIG
    return table.choose_config(M, N, K) if table is not None else triton_gemm.heuristic_config(M, N, K)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                 table: TunedTable | None = None, norm: bool = False, gate: torch.Tensor | None = None,
                 gated: bool = False, residual: torch.Tensor | None = None, eps: float = 1e-8, pdl: bool = False,
                 prefetch: int = 0) -> torch.Tensor:
    """Backend.fused_linear's contract with W = scale[:, None] * qweight: x [M, K] (or [M, 2K] =
    [a | b] when gated) in bfloat16 or float16 (the dot's operand dtype), qweight [N, K] int8 or
    float8_e4m3fn, scale [N] float32.
    Returns [M, N] in x's dtype (or `residual`, updated in place)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"8-bit weights on CUDA compute in bfloat16 or float16, got activations in {x.dtype}: "
                         f"load the model with dtype bfloat16")
    M = x.shape[0]
    N, K = qweight.shape
    kw = dict(norm=norm, gated=gated, eps=eps, pdl=pdl, prefetch=prefetch, scale=scale)
    if M <= PREFILL_ROWS:
        return triton_gemm.skinny_linear(x, qweight, bias, config=choose_config(M, N, K, table), gate=gate,
                                         residual=residual, **kw)
    out = residual if residual is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    for r0 in range(0, M, PREFILL_ROWS):
        r1 = min(M, r0 + PREFILL_ROWS)
        g = gate[r0:r1] if gate is not None else None
        if residual is not None:
            triton_gemm.skinny_linear(x[r0:r1], qweight, bias, config=PREFILL_CONFIG, gate=g,
                                      residual=out[r0:r1], **kw)
        else:
            out[r0:r1] = triton_gemm.skinny_linear(x[r0:r1], qweight, bias, config=PREFILL_CONFIG, gate=g, **kw)
    return out
