"""fla's chunked prompt kernels (fla-core, github.com/fla-org/flash-linear-attention), called
below their autograd wrapper, and with their Triton configs pinned.

Why below the wrapper: `chunk_simple_gla` builds its varlen index tensors from `cu_seqlens` on
the device and reads one back with `.item()` (`chunk_fwd_h`: the number of state splits), once
per call, i.e. once per layer: 30 host syncs in a 7B prompt step, and a step with a few short
prompts beside decoding rows is then bound by the host. Here the same indices are computed once
per step on the host, from the chunk lengths the scheduler already knows (`varlen_meta`, sent to
the device with the step's other indices), and the two kernels (`chunk_fwd_kernel_h`, the chunk
states, and `chunk_fwd_o`, the outputs) are launched directly: no sync and no per-layer index
work. This is fla's internal API, so it is used only with the version it was written against
(FLA_DIRECT_VERSION); any other version runs the public `chunk_simple_gla` (same results, the
syncs included), with a log line saying so.

Why pinned: both kernels are `triton.autotune`d over up to 48 configs, which on a fresh machine
took 83 s of a 110.7 s `tnl serve` start (BENCHMARKS.md, 2026-12-02). A kernel with one config is
not benchmarked, so the tuned table (`tnl tune`; shipped per card) names one config per kernel,
and `pin_configs` leaves only that one. Without a table entry fla autotunes as it always did.
"""
from __future__ import annotations

import importlib.metadata
import logging
import math

import torch

log = logging.getLogger(__name__)

FLA_DIRECT_VERSION = "0.6.0"   # the fla-core whose internals `FlaPrefill` calls (pyproject's [cuda] pin)
CHUNK = 64                     # fla's chunk length (BT) and state split (BS) for simple GLA
RCP_LN2 = 1.0 / math.log(2.0)  # fla's kernels take the decay pre-scaled for exp2
KERNELS = ("chunk_fwd_kernel_h", "chunk_fwd_kernel_o")


def varlen_meta(cu: list[int]) -> tuple[list[int], int, list[int]]:
    """For chunks of lengths diff(cu): the state-split offsets [N+1] (split_offsets), their total
    NS, and the (sequence, chunk-in-sequence) pair of every CHUNK-token block, flattened [2 NT]
    (chunk_indices): what fla's prepare_chunk_offsets / prepare_chunk_indices compute on the device."""
    offsets, pairs = [0], []
    for i in range(len(cu) - 1):
        n = -(-(cu[i + 1] - cu[i]) // CHUNK)
        offsets.append(offsets[-1] + n)
        for j in range(n):
            pairs += (i, j)
    return offsets, offsets[-1], pairs


def _autotuner(kernel):
    """The triton Autotuner under a kernel's heuristics wrappers (None if there is none)."""
    obj = kernel
    for _ in range(4):
        if hasattr(obj, "configs") and hasattr(obj, "cache"):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def pin_configs(kernels: dict, table: dict) -> dict[str, str]:
    """Leave one autotune config per kernel named in `table` ({name: {"BK", "BV", "num_warps",
    "num_stages"}}): what was pinned, per kernel, for the log."""
    import triton
    pinned = {}
    for name, cfg in table.items():
        tuner = _autotuner(kernels.get(name))
        if tuner is None:
            log.warning("fla kernel %s has no autotuner to pin (fla-core changed?): it autotunes as fla does", name)
            continue
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        tuner.configs = [triton.Config(meta, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])]
        tuner.cache.clear()
        pinned[name] = " ".join(f"{k}={v}" for k, v in cfg.items())
    return pinned


def fla_version() -> str | None:
    try:
        return importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        return None


class FlaPrefill:
    """fla's chunked simple-GLA forward for packed prompt chunks (varlen, batch 1).
    `FlaPrefill(configs)` raises ImportError without fla-core; `direct` says whether the kernels
    are launched directly (else through the public chunk_simple_gla)."""

    def __init__(self, configs: dict | None = None, direct: bool | None = None):
        from fla.ops.simple_gla import chunk_simple_gla
        self.public = chunk_simple_gla
        self.version = fla_version()
        self.kernels: dict = {}
        try:
            from fla.ops.common import chunk_h, chunk_o
            self.kernels = {"chunk_fwd_kernel_h": chunk_h.chunk_fwd_kernel_h,
                            "chunk_fwd_kernel_o": chunk_o.chunk_fwd_kernel_o}
            self._chunk_fwd_o = chunk_o.chunk_fwd_o
        except (ImportError, AttributeError) as e:
            log.info("fla-core %s: its chunk kernels are not where tnl expects them (%s)", self.version, e)
        if direct is None:
            direct = self.version == FLA_DIRECT_VERSION and bool(self.kernels)
            if not direct:
                log.warning("fla-core %s (tnl calls the chunk kernels of %s directly): prompt chunks go through "
                            "fla.chunk_simple_gla, one host sync per layer", self.version, FLA_DIRECT_VERSION)
        self.direct = direct and bool(self.kernels)
        self.pinned = pin_configs(self.kernels, configs) if configs and self.kernels else {}

    def name(self) -> str:
        how = "direct, host-side indices" if self.direct else "chunk_simple_gla"
        pins = f", pinned {', '.join(self.pinned)}" if self.pinned else ", autotuned"
        return f"fla {self.version} ({how}{pins})"

    def __call__(self, q, k, v, slope, init, cu_seqlens, meta=None):
        """q, k, v [T, H, dh] (feature map applied), slope [H] f32, init [N, H, dk, dv] f32,
        cu_seqlens [N+1] long on the device; meta: (split_offsets [N+1] and chunk_indices [NT, 2]
        long on the device, NS) from varlen_meta, or None (then the public API).
        Returns o [T, H, dv] and the final states [N, H, dk, dv] f32."""
        if not self.direct or meta is None:
            o, final = self.public(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g_gamma=-slope, scale=1.0,
                                   initial_state=init, output_final_state=True, cu_seqlens=cu_seqlens)
            return o.squeeze(0), final
        split_offsets, chunk_indices, NS = meta
        q, k, v = (t.unsqueeze(0).contiguous() for t in (q, k, v))
        T, H, K = k.shape[1:]
        V = v.shape[-1]
        N = cu_seqlens.shape[0] - 1
        g_gamma = slope * -RCP_LN2
        h = k.new_empty(1, NS, H, K, V)
        final = torch.empty(N, H, K, V, dtype=torch.float32, device=k.device)
        grid = lambda meta: (-(-K // meta["BK"]) * -(-V // meta["BV"]) * N * H,)   # noqa: E731
        self.kernels["chunk_fwd_kernel_h"][grid](
            k=k, v=v, h=h, g=None, g_gamma=g_gamma, gk=None, gv=None, h0=init.contiguous(), ht=final,
            cu_seqlens=cu_seqlens, split_offsets=split_offsets, T=T, H=H, K=K, V=V, BT=CHUNK, BS=CHUNK,
            USE_G=False, USE_G_GAMMA=True, USE_GK=False, USE_GV=False, STATE_V_FIRST=False)
        o = self._chunk_fwd_o(q=q, k=k, v=v, h=h, g=None, g_gamma=g_gamma, scale=1.0, cu_seqlens=cu_seqlens,
                              chunk_size=CHUNK, chunk_indices=chunk_indices)
        return o.squeeze(0), final
