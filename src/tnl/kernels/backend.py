"""The kernel backend: which implementation runs each operation of the model, decided once from a
KernelConfig and a device.

On CUDA (kernels "auto"): fla's chunk kernels for prompt chunks (fla_prefill: launched directly
with host-built indices, configs pinned), tnl's Triton kernels for the decode step and the norms
(triton_decode), and tnl's Triton skinny GEMM (triton_gemm) for decode-sized matmuls where a tuned
table measured it faster than cuBLAS. The table (tuned.choose_table): `tnl tune`'s for this card,
else one shipped for it (kernels/tuned/), else the sm_90 one (measured on an H100). Everything else, and everything on the CPU, runs the plain PyTorch path (torch_ops).

Both attention entry points take the RAW q/k projections and apply the feature map (silu, then
LRPE where the layer has theta) themselves: fused into the Triton decode kernel, with
torch_ops.feature_map everywhere else. Both read each sequence's state from the pool and write it
back in place.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F

from tnl.config import ModelConfig
from tnl.kernels import quant, torch_ops, tuned
from tnl.kernels.config import KernelConfig
from tnl.kernels.quant import QuantWeight

log = logging.getLogger(__name__)

SKINNY_MAX_M = 64        # rows up to which a plain matmul may take the skinny GEMM (the tuned range)
SKINNY_GATED_MAX_M = 32  # ... a gated one (gemm_bench, H100: 1.13x at 1-16 rows, 1.01x at 32, 0.73x at 64)
_HALF = (torch.bfloat16, torch.float16)   # float32 stays with cuBLAS (tl.dot would round to tf32)

# plain: F.linear(x, W); gated: F.linear(a * b, W) for x = [a | b]; fused: the fused decode
# layer's call with the norm (and gate, residual) inside; fused-gated: its gated l3 with the residual
Kind = Literal["plain", "gated", "fused", "fused-gated"]


class Backend:
    """The kernels one model runs, loaded once: `Backend(KernelConfig(), device)`. On the CPU, or
    with kernels "torch", every operation is plain PyTorch (which runs on any device).

    Attributes: config, device; fla (fla_prefill.FlaPrefill or None), triton_decode (the
    tnl.kernels.triton_decode module or None), gemm (the skinny GEMM's TunedTable or None; its
    kernels in gemm_kernels) and gemm_table (the table's path), pdl (programmatic dependent launch
    in use: asked for and sm_90+).
    """

    def __init__(self, config: KernelConfig | None = None, device: torch.device | str = "cpu"):
        self.config = config or KernelConfig()
        self.device = torch.device(device)
        self.fla = None           # tnl.kernels.fla_prefill.FlaPrefill on CUDA with fla-core
        self.table_note = "none"
        self.triton_decode = None
        self.gemm = None
        self.gemm_kernels = None
        self.gemm_table: str | None = None
        self.pdl = False
        if self.device.type == "cuda":
            self._load_cuda_kernels()
        log.log(logging.INFO if self.device.type == "cuda" else logging.DEBUG, "kernels on %s: %s",
                self.device, ", ".join(f"{k} {v}" for k, v in self.names().items()))

    def __deepcopy__(self, memo) -> Backend:
        return self        # loaded once and never changed: a copied model shares it

    def _load_cuda_kernels(self) -> None:
        cfg = self.config
        if cfg.kernels == "torch":
            log.info("every Triton and fla kernel off (kernels 'torch'): plain PyTorch on %s", self.device)
            return
        capability = torch.cuda.get_device_capability(self.device)
        self.pdl = cfg.pdl and capability >= (9, 0)
        name = torch.cuda.get_device_name(self.device)
        choice = tuned.choose_table(name, capability, cfg.gemm_table)
        self.table_note = choice.describe(name)
        try:
            from tnl.kernels.fla_prefill import FlaPrefill
            self.fla = FlaPrefill(tuned.fla_configs(choice, capability), direct=cfg.fla_direct)
        except ImportError as e:  # fla-core is optional: the [cuda] extra
            log.warning("fla-core not importable (%s); CUDA prefill uses the PyTorch path", e)
        try:
            from tnl.kernels import triton_decode
            self.triton_decode = triton_decode
        except Exception as e:
            log.warning("Triton decode kernel unavailable (%s); CUDA decode uses the PyTorch path", e)
        log.info("kernel table: %s", self.table_note)
        if cfg.skinny_gemm == "off":
            log.info("skinny GEMM off (skinny_gemm 'off'): decode matmuls use cuBLAS")
            return
        if choice.path is None:
            return
        try:
            from tnl.kernels import triton_gemm
        except Exception as e:
            log.warning("skinny GEMM unavailable (%s); decode matmuls use cuBLAS", e)
            return
        try:
            self.gemm = triton_gemm.TunedTable.load(choice.obj)
        except (ValueError, KeyError, TypeError) as e:
            if cfg.gemm_table is not None:
                raise ValueError(f"gemm table {choice.path}: cannot read it ({type(e).__name__}: {e}); expected the "
                                 "JSON that `tnl tune` writes") from None
            log.warning("skinny GEMM table %s unreadable (%s); decode matmuls use cuBLAS", choice.path, e)
            return
        self.gemm_kernels = triton_gemm
        self.gemm_table = choice.path

    def names(self) -> dict[str, str]:
        """Which implementation runs each part (for logs and bench output)."""
        if self.gemm is None:
            matmul = "cuBLAS" if self.device.type == "cuda" else "torch"
        else:
            matmul = f"triton skinny GEMM where tuned ({len(self.gemm)} shapes from {self.gemm_table}), else cuBLAS"
        fused, rows = self.config.fused_decode, self.config.fused_decode_max_rows
        return {"prefill": self.fla.name() if self.fla else "torch",
                "decode": "triton" if self.triton_decode else "torch",
                "decode_matmul": matmul,
                "fused_decode": fused if fused != "auto" else f"auto (up to {rows} row{'s' * (rows != 1)})",
                "pdl": "on" if self.pdl else "off"}

    # ---- matmuls -----------------------------------------------------------------------------
    def route(self, M: int, N: int, K: int, kind: Kind) -> Literal["skinny", "cublas"]:
        """Where a matmul of x [M, K] by W [N, K] of this kind runs: the rule the call sites and
        precompile share. The skinny GEMM where the table has measured the shape: for a plain
        matmul up to SKINNY_MAX_M rows where it beat cuBLAS; for a gated one up to
        SKINNY_GATED_MAX_M rows wherever it is tuned (the fused gate saves a kernel of its own,
        worth more than cuBLAS's edge, but every block re-reads both halves of x, which at many
        rows costs more than that kernel: measured at 64 rows, 59 us vs 43 us); in a fused decode
        layer up to fused_decode_max_rows rows wherever it is tuned (a gated one also only up to
        SKINNY_GATED_MAX_M)."""
        t = self.gemm
        if t is None:
            return "cublas"
        if kind == "plain":
            ok = M <= SKINNY_MAX_M and t.prefer_triton(M, N, K)
        elif kind == "gated":
            ok = M <= SKINNY_GATED_MAX_M and t.has_tuned(M, N, K)
        elif kind in ("fused", "fused-gated"):
            ok = M <= self.config.fused_decode_max_rows and t.has_tuned(M, N, K) \
                and (kind == "fused" or M <= SKINNY_GATED_MAX_M)
        else:
            raise ValueError(f"unknown matmul kind {kind!r}")
        return "skinny" if ok else "cublas"

    def _skinny_ok(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether x [M, K] @ weight may take the skinny GEMM at all: a table, CUDA, half
        precision, no autograd (the Triton kernel has no backward)."""
        if self.gemm is None or not x.is_cuda or x.dim() != 2 or x.dtype != weight.dtype or x.dtype not in _HALF:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))

    def _skinny(self, x, weight, bias, **fusions) -> torch.Tensor:
        M, (N, K) = x.shape[0], weight.shape
        return self.gemm_kernels.skinny_linear(x, weight, bias, config=self.gemm.choose_config(M, N, K),
                                               pdl=self.pdl, prefetch=self.config.pdl_prefetch, **fusions)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias) for x [T, K]: the skinny GEMM where route says so."""
        if isinstance(weight, QuantWeight):
            return self.quant_linear(x, weight, bias)
        if self._skinny_ok(x, weight) and self.route(x.shape[0], *weight.shape, "plain") == "skinny":
            return self._skinny(x, weight, bias)
        return F.linear(x, weight, bias)

    def gated_linear(self, ab: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(a * b, weight, bias) for ab = [a | b] [T, 2K]: the GLU's gate product and its
        down projection; in the skinny GEMM (a * b inside its loads) where route says so."""
        if isinstance(weight, QuantWeight):
            return self.quant_linear(ab, weight, bias, gated=True)
        if self._skinny_ok(ab, weight) and self.route(ab.shape[0], *weight.shape, "gated") == "skinny":
            return self._skinny(ab, weight, bias, gated=True)
        a, b = ab.chunk(2, dim=-1)
        return F.linear(a * b, weight, bias)

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm: bool = False, gate: torch.Tensor | None = None, gated: bool = False,
                     residual: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
        """F.linear(y, weight, bias) with y = srms(x) when `norm`, times `gate` when given (gated:
        x = [a | b], y = a * b); with `residual`, residual += that, in place, and returned.
        One skinny-GEMM launch does all of it where route says so (the norm is a per-row scale,
        summed over K while x streams through); otherwise the norm kernel, then one cuBLAS matmul
        that also adds the residual (addmm with beta = 1)."""
        if isinstance(weight, QuantWeight):
            return self.quant_linear(x, weight, bias, norm=norm, gate=gate, gated=gated, residual=residual, eps=eps)
        kind = "fused-gated" if gated else "fused"
        if self._skinny_ok(x, weight) and self.route(x.shape[0], *weight.shape, kind) == "skinny":
            return self._skinny(x, weight, bias, norm=norm, gate=gate, gated=gated, residual=residual, eps=eps)
        if gated:
            x, gate = x.chunk(2, dim=-1)
        if norm:
            y = self.rms_norm(x, gate=gate, eps=eps)
        else:
            y = x if gate is None else x * gate
        if residual is None:
            return F.linear(y, weight, bias)
        residual.addmm_(y, weight.t())
        if bias is not None:
            residual += bias
        return residual

    def fused_decode_ok(self, x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
        """Whether a forward over x [T, d] runs the fused decode layers (every matmul of a layer
        through fused_linear): fused_decode "on" / "off" forces it; "auto" where the skinny GEMM
        takes every one of `weights` (one layer's qkvu, out_proj, l12, l3) as a fused matmul."""
        if self.config.fused_decode != "auto":
            return self.config.fused_decode == "on"
        return bool(weights) and all(self._skinny_ok(x, w) for w in weights) \
            and self._fused_step(x.shape[0], [tuple(w.shape) for w in weights])

    def _fused_step(self, M: int, shapes: list[tuple[int, int]]) -> bool:
        """fused_decode_ok's rule on shapes alone (for precompile)."""
        if self.config.fused_decode != "auto":
            return self.config.fused_decode == "on"
        return all(self.route(M, N, K, "fused") == "skinny" for N, K in shapes)

    def block_ops(self, x: torch.Tensor, weights: list[torch.Tensor]) -> BlockOps:
        """The matmuls, norms and residual adds of one forward over x [T, d], fused or not as
        fused_decode_ok decides, once, for the whole step (weights: one layer's matmul weights)."""
        return BlockOps(self, self.fused_decode_ok(x, weights))

    def precompile(self, cfg: ModelConfig, dtype: torch.dtype, rows: list[int]) -> int:
        """Compile, in parallel, the skinny-GEMM kernels that a decode step of each row count in
        `rows` will launch for a model of `cfg` with weights of `dtype` (the matmuls as
        TransnormerForCausalLM.forward and .logits call them, routed by route), so that capturing
        CUDA graphs does not wait on one compile after another. Returns how many were queued."""
        if self.gemm is None or dtype not in _HALF:
            return 0
        d, hid, glu, bias = cfg.d_model, cfg.hidden_dim, cfg.glu_dim, cfg.bias
        # (N, K, unfused kind, fusions in the fused decode layer) of each layer matmul, in call order;
        # out_proj's gate u is a view into the qkvu output (row stride 4 * hidden)
        layer = [(4 * hid, d, "plain", dict(norm=True)),
                 (d, hid, "plain", dict(norm=True, gate_stride=4 * hid, residual=True)),
                 (2 * glu, d, "plain", dict(norm=True)),
                 (d, glu, "gated", dict(gated=True, residual=True))]
        jobs = {}
        for M in rows:
            fused = self._fused_step(M, [(N, K) for N, K, _, _ in layer])
            calls = [(N, K, bias, "fused-gated" if f.get("gated") else "fused", f) if fused
                     else (N, K, bias, kind, kind == "gated") for N, K, kind, f in layer]
            calls.append((cfg.vocab_size, d, False, "plain", False))       # the head (logits)
            for N, K, has_bias, kind, fusions in calls:
                if self.route(M, N, K, kind) == "skinny":
                    job = (M, N, K, self.gemm.choose_config(M, N, K), dtype, dtype, has_bias, fusions)
                    jobs.setdefault(repr(job), job)
        if jobs:
            self.gemm_kernels.precompile(list(jobs.values()), pdl=self.pdl, prefetch=self.config.pdl_prefetch)
        return len(jobs)

    # ---- 8-bit weights (tnl.kernels.quant) ---------------------------------------------------
    def quant_linear(self, x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None, *,
                     norm: bool = False, gate: torch.Tensor | None = None, gated: bool = False,
                     residual: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
        """fused_linear's contract for an 8-bit matrix. On CUDA one Triton launch per row block:
        the skinny GEMM loads the 8-bit tiles, converts them in registers, scales each output
        channel after the sum over K (tnl.kernels.triton_quant; never a bf16 copy of W). With
        kernels "torch", on the CPU, or where Triton does not load: plain PyTorch
        (quant.linear_torch, which converts W a block of rows at a time)."""
        tq = self._triton_quant() if x.is_cuda else None
        if tq is not None:
            return tq.quant_linear(x, weight.qweight, weight.scale, bias, table=self.gemm, norm=norm, gate=gate,
                                   gated=gated, residual=residual, eps=eps, pdl=self.pdl,
                                   prefetch=self.config.pdl_prefetch)
        if gated:
            x, gate = x.chunk(2, dim=-1)
        if norm:
            y = torch_ops.rms_norm(x, gate, eps)
        else:
            y = x if gate is None else x * gate
        out = quant.linear_torch(y, weight, bias)
        if residual is None:
            return out
        residual += out
        return residual

    def _triton_quant(self):
        """tnl.kernels.triton_quant, imported on first use (None with kernels "torch", or when
        Triton does not load: then a warning, and the PyTorch path, which converts W per call)."""
        if not hasattr(self, "_tq"):
            self._tq = None
            if self.config.kernels != "torch":
                try:
                    from tnl.kernels import triton_quant
                    self._tq = triton_quant
                except Exception as e:
                    log.warning("8-bit skinny GEMM unavailable (%s): 8-bit matmuls convert W in PyTorch per call, "
                                "slower than bf16", e)
        return self._tq

    # ---- norms -------------------------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, gate: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
        """SimpleRMSNorm over the last dim of x [T, N] (torch_ops.rms_norm): one Triton pass on CUDA;
        times `gate` when given (the token mixer's u * srms(o))."""
        if x.is_cuda and self.triton_decode is not None:
            return self.triton_decode.rms_norm(x, gate, eps, pdl=self.pdl)
        return torch_ops.rms_norm(x, gate, eps)

    def add_rms_norm(self, residual: torch.Tensor, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """residual += x (in place), then return srms(residual): one pass on CUDA."""
        if x.is_cuda and self.triton_decode is not None:
            return self.triton_decode.rms_norm(x, None, eps, residual=residual, pdl=self.pdl)
        residual += x
        return torch_ops.rms_norm(residual, eps=eps)

    # ---- attention ---------------------------------------------------------------------------
    def decode_attention(self, q, k, v, decay, pool, slots, theta=None, positions=None) -> torch.Tensor:
        """One token per sequence from RAW projections: the feature map (silu, LRPE when theta is
        given) is fused into the kernel on CUDA.
        q, k, v [B, H, dh]; decay [H]; pool [S, H, dk, dv] f32; slots [B]; theta [H, 1, dh] or None;
        positions [B]. Returns o [B, H, dv]."""
        if q.is_cuda and self.triton_decode is not None:
            return self.triton_decode.recurrent_step_triton(q, k, v, decay, pool, slots, features=True, theta=theta,
                                                            positions=positions, pdl=self.pdl)
        q = torch_ops.feature_map(q, theta, positions)
        k = torch_ops.feature_map(k, theta, positions)
        return torch_ops.recurrent_step(q, k, v, decay, pool, slots)

    def prefill_attention(self, q, k, v, slope, pool, slots, cu_seqlens, cu_seqlens_list, theta=None,
                          positions=None, chunk_size: int = 256, meta: tuple | None = None) -> torch.Tensor:
        """Packed prompt chunks from RAW projections (the feature map applied here, then fla's
        chunked kernel on CUDA or the PyTorch chunk loop). q, k, v [T, H, dh]; slope [H];
        pool [S, H, dk, dv] f32; slots [N]; cu_seqlens [N+1] (and as a list); theta [H, 1, dh] or
        None; positions [T]; meta: fla's varlen indices built on the host (AttnBatch.chunk_meta; None:
        fla builds them, with a host sync). Returns o [T, H, dv]."""
        q = torch_ops.feature_map(q, theta, positions)
        k = torch_ops.feature_map(k, theta, positions)
        init = pool.index_select(0, slots).float()   # a 16-bit pool (state_dtype): float32 from here on
        if q.is_cuda and self.fla is not None:
            o, final = self.fla(q, k, v, slope, init, cu_seqlens, meta)
        else:
            o, final = torch_ops.varlen_chunk_attention(q, k, v, slope, init, cu_seqlens_list, chunk_size)
        pool.index_copy_(0, slots, final.to(pool.dtype))   # rounded once, to the pool's dtype
        return o


class BlockOps:
    """The matmuls of one forward through the decoder layers, each with the norm before it and the
    residual add after it, fused or not as the backend decided once for the whole step.

    Fused (decode batches the skinny GEMM covers, see Backend.fused_decode_ok): each call is one
    skinny-GEMM launch that also normalises its input, multiplies the gate and adds the residual
    (Backend.fused_linear), so a layer is five kernels (four GEMMs and the recurrent step).
    Unfused: the norm kernel, the matmul (Backend.linear / gated_linear), and each residual add
    fused with the norm after it (Backend.add_rms_norm); the next norm=True call on that same
    residual stream, or norm(), takes that result instead of normalising again."""

    def __init__(self, backend: Backend, fused: bool):
        self.backend = backend
        self.fused = fused
        self._normed: tuple[torch.Tensor, torch.Tensor] | None = None   # (x, srms(x)) after an add into x

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               norm: bool = False, gate: torch.Tensor | None = None, gated: bool = False,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(y, weight, bias) with y = srms(x) when `norm`, times `gate` when given (gated:
        x = [a | b], y = a * b); with `residual`, residual += that, in place, and returned."""
        b = self.backend
        if self.fused:
            return b.fused_linear(x, weight, bias, norm=norm, gate=gate, gated=gated, residual=residual)
        if gated and not norm:
            y = b.gated_linear(x, weight, bias)
        else:
            if gated:
                x, gate = x.chunk(2, dim=-1)
            if norm:
                x = self.norm(x) if gate is None else b.rms_norm(x, gate=gate)
            elif gate is not None:
                x = x * gate
            y = b.linear(x, weight, bias)
        if residual is None:
            return y
        self._normed = (residual, b.add_rms_norm(residual, y))
        return residual

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """srms(x) [T, d]: the one computed with the last residual add into x, if x was that."""
        if self._normed is not None and self._normed[0] is x:
            return self._normed[1]
        return self.backend.rms_norm(x)
