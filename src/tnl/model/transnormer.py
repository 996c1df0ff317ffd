"""TransNormerLLM, native PyTorch, weight-compatible with the official checkpoints.

One block (pre-norm, no learned norm weights):
    x = x + TokenMixer(srms(x))      gated norm-linear attention with per-head, per-layer decay
    x = x + SGLU(srms(x))            (x W1) * (x W2) W3, no activation
Parameter names follow the official state dict (model.layers.{i}.token_mixer.qkvu_proj.weight, ...),
with one exception: W1 and W2 are one matrix, channel_mixer.l12 = [l1; l2] (one matmul). State
dicts in the official layout load into it, state_dict() splits it back (SGLU), and the checkpoint
loader in tnl.model.weights maps the files' l1 / l2 the same way.

The model runs over a packed batch of sequences (`AttnBatch`): the first `n_decode` tokens are
one token each of running sequences (recurrent step), the rest are prompt chunks of
`len(prefill_slots)` sequences laid end to end (chunked prefill). Every sequence continues
from its state in the pool; the pool is updated in place.

Every operation of that forward runs on the model's kernel backend (`self.backend`, a
tnl.kernels.backend.Backend; plain PyTorch unless the loader hands it one for CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnl.config import ModelConfig, layer_slopes
from tnl.kernels.backend import Backend, BlockOps
from tnl.kernels.fla_prefill import varlen_meta
from tnl.kernels.torch_ops import chunk_attention, feature_map, rms_norm


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small host list on the device without waiting for the stream (pinned staging: a plain
    torch.tensor(..., device=cuda) synchronizes the stream, which stalls a step's launches)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass
class AttnBatch:
    """Where each packed token belongs.

    positions: [T] long, absolute position of each token in its sequence (LRPE)
    n_decode: the first n_decode tokens are single decode tokens
    decode_slots: [n_decode] long, pool slot of each decode token's sequence
    prefill_slots: [N] long, pool slot of each prefill chunk's sequence
    cu_seqlens: [N+1] long (on device) offsets of the chunks within the prefill part
    cu_seqlens_list: the same as a Python list (for the torch path)
    """

    positions: torch.Tensor
    n_decode: int
    decode_slots: torch.Tensor
    prefill_slots: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_list: list[int]
    chunk_meta: tuple | None = None   # fla's varlen indices (split_offsets, chunk_indices, NS), host-built

    @classmethod
    def build(cls, decode: list[tuple[int, int]], prefill: list[tuple[int, int, int]],
              device: torch.device | str) -> "AttnBatch":
        """decode: (slot, position) per decode token; prefill: (slot, start_position, n_tokens).
        Every index goes to the device in one copy (each part 16-byte aligned: Triton compiles a
        kernel per pointer alignment)."""
        pos = [p for _, p in decode]
        cu = [0]
        for _, start, n in prefill:
            pos.extend(range(start, start + n))
            cu.append(cu[-1] + n)
        parts = [pos, [s for s, _ in decode], [s for s, _, _ in prefill], cu]
        ns = 0
        if prefill:
            offsets, ns, pairs = varlen_meta(cu)
            parts += [offsets, pairs]
        flat, bounds = [], []
        for xs in parts:
            bounds.append((len(flat), len(flat) + len(xs)))
            flat += xs
            flat += [0] * (len(flat) % 2)
        t = to_device(flat, torch.long, device)
        views = [t[a:b] for a, b in bounds]
        meta = (views[4], views[5].view(-1, 2), ns) if prefill else None
        return cls(positions=views[0], n_decode=len(decode), decode_slots=views[1], prefill_slots=views[2],
                   cu_seqlens=views[3], cu_seqlens_list=cu, chunk_meta=meta)


class Lrpe(nn.Module):
    """Linearized relative positional encoding: x -> [x cos(theta t), x sin(theta t)] per head
    (applied by the backend's attention: torch_ops.feature_map, or inside the CUDA decode kernel).
    theta is a trained parameter [H, 1, dh]: loaded, never recomputed."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        d = n_heads * head_dim
        self.theta = nn.Parameter(torch.empty(n_heads, 1, head_dim))
        with torch.no_grad():
            if self.theta.device.type != "meta":
                self.theta.copy_((10000 ** (-2 / d * torch.arange(d))).reshape(n_heads, 1, head_dim))


class NormLinearAttention(nn.Module):
    """Token mixer: q,k = silu(.), optional LRPE, decayed linear attention, srms, gate u, out_proj."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkvu_proj = nn.Linear(cfg.d_model, 4 * cfg.hidden_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=cfg.bias)
        self.lrpe = Lrpe(cfg.n_heads, cfg.head_dim) if cfg.lrpe[layer] else None
        self.layer = layer
        self.register_buffer("slope", torch.empty(cfg.n_heads), persistent=False)   # [H]
        self.register_buffer("decay", torch.empty(cfg.n_heads), persistent=False)   # [H] exp(-slope)
        if self.slope.device.type != "meta":
            self.reset_decay(cfg, self.slope.device)

    def reset_decay(self, cfg: ModelConfig, device) -> None:
        """The per-head decay is computed, not stored in checkpoints: (re)build it in float32."""
        slope = torch.tensor(layer_slopes(cfg, self.layer), dtype=torch.float32, device=device)
        self.slope, self.decay = slope, torch.exp(-slope)

    @property
    def theta(self) -> torch.Tensor | None:
        return self.lrpe.theta if self.lrpe is not None else None

    def split_heads(self, qkvu: torch.Tensor):
        """qkvu [T, 4 hidden] -> raw q, k, v [T, H, dh] and the gate u [T, hidden] (views)."""
        T = qkvu.shape[0]
        q, k, v, u = qkvu.chunk(4, dim=-1)
        q, k, v = (t.reshape(T, self.n_heads, self.head_dim) for t in (q, k, v))
        return q, k, v, u

    def attend(self, q, k, v, batch: AttnBatch, pool: torch.Tensor, backend: Backend) -> torch.Tensor:
        """Raw projections q, k, v [T, H, dh] -> attention output [T, hidden] (decode tokens by
        the recurrent step, prompt chunks by the chunked kernel; each applies the feature map),
        states updated in the pool."""
        nd = batch.n_decode
        parts = []
        if nd:
            parts.append(backend.decode_attention(q[:nd], k[:nd], v[:nd], self.decay, pool, batch.decode_slots,
                                                  self.theta, batch.positions[:nd]))
        if q.shape[0] > nd:
            parts.append(backend.prefill_attention(q[nd:], k[nd:], v[nd:], self.slope, pool, batch.prefill_slots,
                                                   batch.cu_seqlens, batch.cu_seqlens_list, self.theta,
                                                   batch.positions[nd:], meta=batch.chunk_meta))
        o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return o.reshape(q.shape[0], -1)


class SGLU(nn.Module):
    """Simple GLU: (x W1) * (x W2) W3, no activation (the gate brings the non-linearity).

    W1 and W2 live as one matrix l12 = [W1; W2] [2 glu, d]: one read of x, one launch. Official
    state dicts name them l1 and l2: such a state dict loads into l12, and state_dict() writes
    l1 and l2 again (PACKED says which parts make which parameter)."""

    PACKED = {"l12": ("l1", "l2")}   # parameter -> the checkpoint modules stacked in it along dim 0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.l12 = nn.Linear(cfg.d_model, 2 * cfg.glu_dim, bias=cfg.bias)
        self.l3 = nn.Linear(cfg.glu_dim, cfg.d_model, bias=cfg.bias)
        self.register_load_state_dict_pre_hook(_stack_packed)
        self.register_state_dict_post_hook(_split_packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The differentiable form (training): x [..., d] -> [..., d]."""
        a, b = self.l12(x).chunk(2, dim=-1)
        return self.l3(a * b)


def packed_part(name: str) -> tuple[str, int, int] | None:
    """For a checkpoint tensor that is one part of a packed parameter, e.g.
    model.layers.3.channel_mixer.l2.weight: (the parameter, model.layers.3.channel_mixer.l12.weight;
    the part's index, 1; the number of parts, 2). None for every other name."""
    module, _, leaf = name.rpartition(".")
    parent, _, child = module.rpartition(".")
    if not parent.endswith("channel_mixer"):
        return None
    for packed, parts in SGLU.PACKED.items():
        if child in parts:
            return f"{parent}.{packed}.{leaf}", parts.index(child), len(parts)
    return None


def _stack_packed(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: official parts (l1, l2) -> the packed parameter (l12)."""
    for packed, parts in module.PACKED.items():
        for leaf in ("weight", "bias"):
            names = [f"{prefix}{p}.{leaf}" for p in parts]
            if all(n in state_dict for n in names):
                state_dict[f"{prefix}{packed}.{leaf}"] = torch.cat([state_dict.pop(n) for n in names])


def _split_packed(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: the packed parameter (l12) -> the official parts (l1, l2), where l12
    stood and in the official order (l1.weight, l1.bias, l2.weight, l2.bias)."""
    for packed, parts in module.PACKED.items():
        leaves = [leaf for leaf in ("weight", "bias") if f"{prefix}{packed}.{leaf}" in state_dict]
        chunks = {leaf: state_dict[f"{prefix}{packed}.{leaf}"].chunk(len(parts)) for leaf in leaves}
        official = {f"{prefix}{p}.{leaf}": chunks[leaf][i] for i, p in enumerate(parts) for leaf in leaves}
        items = list(state_dict.items())
        state_dict.clear()
        for name, t in items:
            if name == f"{prefix}{packed}.weight":
                state_dict.update(official)
            elif not name.startswith(f"{prefix}{packed}."):
                state_dict[name] = t


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.token_mixer = NormLinearAttention(cfg, layer)
        self.channel_mixer = SGLU(cfg)

    def forward(self, x: torch.Tensor, batch: AttnBatch, pool: torch.Tensor, ops: BlockOps) -> None:
        """x: the residual stream [T, d], updated in place. Each matmul takes the norm before it
        and the residual add after it (ops: one skinny-GEMM launch each in a fused decode step,
        separate norm kernels otherwise)."""
        tm, mlp = self.token_mixer, self.channel_mixer
        # x += TokenMixer(srms(x))
        qkvu = ops.linear(x, tm.qkvu_proj.weight, tm.qkvu_proj.bias, norm=True)      # [T, 4 hidden]
        q, k, v, u = tm.split_heads(qkvu)
        o = tm.attend(q, k, v, batch, pool, ops.backend)                               # [T, hidden]
        ops.linear(o, tm.out_proj.weight, tm.out_proj.bias, norm=True, gate=u, residual=x)  # x += (u srms(o)) Wout
        # x += SGLU(srms(x))
        ab = ops.linear(x, mlp.l12.weight, mlp.l12.bias, norm=True)                    # [T, 2 glu] = [a | b]
        ops.linear(ab, mlp.l3.weight, mlp.l3.bias, gated=True, residual=x)             # x += (a * b) W3

    def matmul_weights(self) -> list[torch.Tensor]:
        tm, mlp = self.token_mixer, self.channel_mixer
        return [tm.qkvu_proj.weight, tm.out_proj.weight, mlp.l12.weight, mlp.l3.weight]


class TransnormerModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0


class TransnormerForCausalLM(nn.Module):
    """The full model. Construct under `torch.device("meta")` and load weights with
    `tnl.model.weights.load_model` (which also hands it the kernel backend for its device); or
    construct normally for random weights (tests, training)."""

    def __init__(self, cfg: ModelConfig, backend: Backend | None = None):
        super().__init__()
        self.config = cfg
        self.backend = backend or Backend()    # the kernels the forward runs (default: plain PyTorch)
        self.model = TransnormerModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.quantization = "none"   # the layer matrices' storage: tnl.kernels.quant.quantize_model sets it

    # ---- weights -------------------------------------------------------------------------
    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_random(self, std: float = 0.02, seed: int | None = None) -> "TransnormerForCausalLM":
        """Random weights as the official init does (normal(0, std), zero biases); theta kept."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("lrpe.theta"):
                    continue
                if name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def new_state_pool(self, num_slots: int, device=None, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Per layer a [num_slots, H, dk, dv] zero tensor in `dtype` (float32, or a 16-bit state
        dtype: the kernels still accumulate in float32)."""
        device = device or self.model.embed_tokens.weight.device
        return [torch.zeros(num_slots, *s, dtype=dtype, device=device) for s in self.config.state_shapes()]

    # ---- inference ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, batch: AttnBatch, pools: list[torch.Tensor]) -> torch.Tensor:
        """Packed tokens [T] -> final-normed hidden states [T, d]. Updates the states in `pools`."""
        x = self.model.embed_tokens(input_ids) * self.model.embed_scale   # [T, d] a fresh tensor: updated in place
        layers = self.model.layers
        ops = self.backend.block_ops(x, layers[0].matmul_weights())     # fused decode layers or not: once a step
        for layer, pool in zip(layers, pools):
            layer(x, batch, pool, ops)
        return ops.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, d] normed hidden states -> [N, V] float32 logits."""
        # rounded to the weights' dtype, then float32, on every path: the skinny GEMM (up to 64
        # rows) and cuBLAS (more rows) then give the same logits up to summation order
        return self.backend.linear(hidden, self.head_weight).float()

    # ---- training -------------------------------------------------------------------------
    def forward_train(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Differentiable full-sequence forward from zero state. input_ids [B, n] -> logits [B, n, V] float32."""
        B, n = input_ids.shape
        x = self.model.embed_tokens(input_ids) * self.model.embed_scale      # [B, n, d]
        pos = torch.arange(n, device=input_ids.device)
        for layer in self.model.layers:
            tm = layer.token_mixer
            q, k, v, u = tm.split_heads(tm.qkvu_proj(rms_norm(x).reshape(B * n, -1)))
            q, k = (feature_map(t, tm.theta, pos.repeat(B)) for t in (q, k))
            # the batch rides along as extra heads: one chunked pass for all sequences
            H = tm.n_heads
            q, k, v = (t.reshape(B, n, H, -1).transpose(0, 1).reshape(n, B * H, -1) for t in (q, k, v))
            state = torch.zeros(B * H, q.shape[-1], v.shape[-1], device=x.device)
            o, _ = chunk_attention(q, k, v, tm.slope.repeat(B), state, chunk_size=64)
            o = rms_norm(o.to(v.dtype).reshape(n, B, H, -1).transpose(0, 1).reshape(B, n, -1))
            x = x + tm.out_proj(u.reshape(B, n, -1) * o)
            x = x + layer.channel_mixer(rms_norm(x))
        return F.linear(rms_norm(x), self.head_weight).float()


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The official state-dict names and shapes a checkpoint for `cfg` must hold (l1 and l2, not
    l12), in the model's order: embedding, layer by layer, head."""
    with torch.device("meta"):
        m = TransnormerForCausalLM(cfg)
    return {name: tuple(t.shape) for name, t in m.state_dict().items()}
