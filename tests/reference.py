"""A naive float64 O(n^2) TransNormerLLM written straight from the formulas in
shared/design/transnormer.md, independent of tnl's model code: the ground truth for tests."""
from __future__ import annotations

import math

import torch


def ref_slopes(n_heads: int) -> list[float]:
    def p2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return p2(n_heads)
    c = 2 ** math.floor(math.log2(n_heads))
    return p2(c) + ref_slopes(2 * c)[0::2][: n_heads - c]


def _srms(x):
    return x / (x.norm(dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + 1e-8)


def _lin(sd, name, x):
    y = x @ sd[name + ".weight"].double().T
    if name + ".bias" in sd:
        y = y + sd[name + ".bias"].double()
    return y


def reference_logits(sd: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """Official config dict + official state dict -> [n, V] float64 logits, positions from 0."""
    d, L, H = cfg["decoder_embed_dim"], cfg["decoder_layers"], cfg["decoder_attention_heads"]
    hid = cfg.get("hidden_dim", d)
    dh = hid // H
    lrpe = cfg.get("linear_use_lrpe_list") or [0] * L
    n = len(ids)
    x = sd["model.embed_tokens.weight"].double()[torch.tensor(ids)]
    if not cfg.get("no_scale_embedding", False):
        x = x * math.sqrt(d)
    t = torch.arange(n, dtype=torch.float64)
    lag = t.view(-1, 1) - t.view(1, -1)
    base = ref_slopes(H)
    for l in range(L):
        p = f"model.layers.{l}."
        q, k, v, u = _lin(sd, p + "token_mixer.qkvu_proj", _srms(x)).chunk(4, dim=-1)
        q, k, v = (z.reshape(n, H, dh).transpose(0, 1) for z in (q, k, v))   # [H, n, dh]
        q, k = torch.nn.functional.silu(q), torch.nn.functional.silu(k)
        if lrpe[l]:
            theta = sd[p + "token_mixer.lrpe.theta"].double()                # [H, 1, dh]
            ang = theta * t.view(1, -1, 1)
            q = torch.cat([q * torch.cos(ang), q * torch.sin(ang)], dim=-1)
            k = torch.cat([k * torch.cos(ang), k * torch.sin(ang)], dim=-1)
        o = torch.empty(H, n, dh, dtype=torch.float64)
        for h in range(H):
            s = base[h] * (1 - l / (L - 1) + 1e-5)
            decay = torch.where(lag >= 0, torch.exp(-s * lag.clamp(min=0)), torch.zeros((), dtype=torch.float64))
            o[h] = ((q[h] @ k[h].T) * decay) @ v[h]
        o = o.transpose(0, 1).reshape(n, hid)
        x = x + _lin(sd, p + "token_mixer.out_proj", u * _srms(o))
        hh = _srms(x)
        x = x + _lin(sd, p + "channel_mixer.l3", _lin(sd, p + "channel_mixer.l1", hh) * _lin(sd, p + "channel_mixer.l2", hh))
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).double()
    return _srms(x) @ head.T


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
