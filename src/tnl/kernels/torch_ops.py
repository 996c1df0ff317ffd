"""Decayed linear attention in plain PyTorch: the CPU path and the reference for the CUDA kernels.

For one head with decay lam = exp(-slope):
    S_t = lam * S_{t-1} + k_t^T v_t        (state [dk, dv], float32)
    o_t = q_t S_t
Prefill computes the same thing chunk by chunk: inside a chunk the masked decayed
product q k^T, across chunks the carried state.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """SimpleRMSNorm (srms) over the last dim of x [..., N]: x / (||x|| / sqrt(N) + eps), no
    weight; normalised in float32 and cast back; times `gate` when given (the token mixer's
    u * srms(o)), in x's dtype."""
    xf = x.float()
    y = (xf / (xf.norm(2, dim=-1, keepdim=True) * xf.shape[-1] ** -0.5 + eps)).to(x.dtype)
    return y if gate is None else gate * y


def feature_map(x: torch.Tensor, theta: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """The query/key feature map: silu, then LRPE when theta is given.

    x: [T, H, dh] raw projection; theta: [H, 1, dh] (trained); positions: [T] absolute.
    LRPE: [x cos(theta t), x sin(theta t)] per head (key dim doubles); angles in float32.
    """
    x = torch.nn.functional.silu(x)
    if theta is None:
        return x
    angle = positions.float().view(-1, 1, 1) * theta.float().view(1, theta.shape[0], theta.shape[-1])
    xf = x.float()
    return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                    state: torch.Tensor, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, all heads, continuing from `state`.

    Args:
        q, k: [n, H, dk]; v: [n, H, dv] (any float dtype)
        slope: [H] float32, decay per step is exp(-slope)
        state: [H, dk, dv] float32, the state before the first token
    Returns:
        o [n, H, dv] in v's dtype, final state [H, dk, dv] float32
    """
    n = q.shape[0]
    q, k, v = (t.float().transpose(0, 1) for t in (q, k, v))  # [H, n, d]
    s = slope.float().view(-1, 1, 1)                           # [H, 1, 1]
    out = torch.empty_like(v)
    pos = torch.arange(chunk_size, device=q.device, dtype=torch.float32)
    lag = pos.view(-1, 1) - pos.view(1, -1)                    # [C, C] i - j
    intra = torch.exp(-s * lag.clamp(min=0)) * (lag >= 0)      # [H, C, C]
    S = state.float()
    for c0 in range(0, n, chunk_size):
        m = min(chunk_size, n - c0)
        qc, kc, vc = q[:, c0:c0 + m], k[:, c0:c0 + m], v[:, c0:c0 + m]
        q_decay = torch.exp(-s * (pos[:m] + 1).view(-1, 1))     # lam^(i+1): state seen from row i
        k_decay = torch.exp(-s * (m - 1 - pos[:m]).view(-1, 1))  # lam^(m-1-j): key j carried to chunk end
        out[:, c0:c0 + m] = (qc * q_decay) @ S + ((qc @ kc.transpose(1, 2)) * intra[:, :m, :m]) @ vc
        S = torch.exp(-s * m) * S + (kc * k_decay).transpose(1, 2) @ vc
    return out.transpose(0, 1), S


def varlen_chunk_attention(q, k, v, slope, states, cu_seqlens: list[int], chunk_size: int = 256):
    """Packed sequences. q, k, v: [T, H, d]; states: [N, H, dk, dv] (updated copy returned);
    cu_seqlens: N+1 offsets into T. Returns o [T, H, dv], final states [N, H, dk, dv]."""
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    finals = torch.empty_like(states, dtype=torch.float32)
    for i in range(len(cu_seqlens) - 1):
        a, b = cu_seqlens[i], cu_seqlens[i + 1]
        o, S = chunk_attention(q[a:b], k[a:b], v[a:b], slope, states[i], chunk_size)
        out[a:b] = o.to(out.dtype)
        finals[i] = S
    return out, finals


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                   pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One token for each of B sequences, reading and writing their states in the pool in place.

    Args:
        q, k: [B, H, dk]; v: [B, H, dv]
        decay: [H] float32 (lam = exp(-slope))
        pool: [num_slots, H, dk, dv] float32, or bfloat16 / float16 (the engine's state_dtype: read,
            updated in float32, written back rounded; the output uses the float32 update)
        slots: [B] long, distinct
    Returns:
        o: [B, H, dv] in v's dtype
    """
    S = pool.index_select(0, slots).float()                           # [B, H, dk, dv]
    S = decay.view(1, -1, 1, 1) * S + k.float().unsqueeze(-1) * v.float().unsqueeze(-2)
    pool.index_copy_(0, slots, S.to(pool.dtype))
    return (q.float().unsqueeze(-2) @ S).squeeze(-2).to(v.dtype)
