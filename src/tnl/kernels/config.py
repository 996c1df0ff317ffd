"""KernelConfig: which kernels tnl runs, resolved once from command-line flags.

A leaf module (no torch, no tnl): the CLI builds a KernelConfig before anything heavy is imported,
and tnl.kernels.backend.Backend turns it, with a device, into the kernels that run. Nothing here is
read from the environment: two engines in one process may run different kernels.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

KERNELS = ("auto", "torch")
SKINNY_GEMM = ("auto", "off")
FUSED_DECODE = ("auto", "off", "on")


@dataclass(frozen=True)
class KernelConfig:
    """The kernel choices of one engine.

    kernels: "auto" runs fla's chunked prefill kernel and tnl's Triton decode, norm and skinny-GEMM
        kernels on CUDA where they load (each falls back to PyTorch with a warning when it does
        not); "torch" turns every Triton and fla kernel off (plain PyTorch, the CPU path, on any
        device: the fallback if a fast kernel misbehaves). On the CPU both mean PyTorch.
    skinny_gemm: "auto" sends decode-sized matmuls (up to 64 rows) to tnl's Triton skinny GEMM
        where the tuned table measured it faster than cuBLAS; "off" keeps cuBLAS (the A/B).
    gemm_table: a tuned table written by `tnl tune`; None uses `tnl tune`'s table for this card,
        else the one shipped for it, else the sm_90 one (measured on an H100; tnl.kernels.tuned),
        and no skinny GEMM on a card without any (an untuned kernel is not known to beat cuBLAS).
    fla_direct: launch fla's prompt kernels directly with host-built indices (no host sync per
        layer; tnl.kernels.fla_prefill), or through fla's public chunk_simple_gla (False; the
        A/B, and what any fla-core but the pinned version gets). None: direct where supported.
    fused_decode: "auto" runs the fused decode layers (every norm, gate and residual add inside
        a skinny GEMM: five kernels per layer instead of eight) at up to fused_decode_max_rows
        rows where the table covers every layer matmul; "off" never; "on" always, through the
        PyTorch fallback where there is no kernel (so the CPU tests exercise that forward).
    fused_decode_max_rows: rows (tokens in the step) up to which "auto" fuses.
    pdl: programmatic dependent launch for tnl's Triton kernels on sm_90+ (ignored elsewhere):
        each kernel lets the next one be scheduled while it runs and waits (griddepcontrol.wait)
        before its first memory access, hiding launch latency between the ~150 small kernels of
        a decode step. On by default; off for A/B runs.
    pdl_prefetch: with PDL, bytes of its weight slab each skinny-GEMM block asks L2 to prefetch
        before waiting on the previous kernel (0: none).
    """

    kernels: str = "auto"
    skinny_gemm: str = "auto"
    gemm_table: str | None = None
    fla_direct: bool | None = None
    fused_decode: str = "auto"
    # Measured on an H100, 7B decode, tok/s fused vs unfused: batch 1 199.8 vs 194.4, 2: 362 vs 370,
    # 4: 700 vs 742, 8: 1446 vs 1443, 16: 2660 vs 2650, 32: 3948 vs 4445, 64: 6258 vs 7230 -- a win
    # at one row only
    fused_decode_max_rows: int = 1
    pdl: bool = True
    # H100, 7B decode, batch 1, tok/s by prefetch bytes: 0 -> 197.1, 2K 198.6, 8K 199.8, 16K 199.4,
    # 32K 192.4, 128K 160.9
    pdl_prefetch: int = 8192

    def __post_init__(self):
        for name, choices in (("kernels", KERNELS), ("skinny_gemm", SKINNY_GEMM), ("fused_decode", FUSED_DECODE)):
            if getattr(self, name) not in choices:
                raise ValueError(f"KernelConfig.{name} = {getattr(self, name)!r}; expected one of {', '.join(choices)}")
        for name in ("fused_decode_max_rows", "pdl_prefetch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KernelConfig.{name} = {value!r}; expected a whole number >= 0")
        if not isinstance(self.pdl, bool):
            raise ValueError(f"KernelConfig.pdl = {self.pdl!r}; expected True or False")
        if self.fla_direct is not None and not isinstance(self.fla_direct, bool):
            raise ValueError(f"KernelConfig.fla_direct = {self.fla_direct!r}; expected True, False or None")
        if self.gemm_table is not None and not isinstance(self.gemm_table, str):
            raise ValueError(f"KernelConfig.gemm_table = {self.gemm_table!r}; expected a file path or None")


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _table_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file; expected the JSON that `tnl tune` writes")
    return text


def add_kernel_args(parser: argparse.ArgumentParser) -> None:
    """Add the kernel flags (an argument group "kernels") to `parser`; its namespace then feeds
    kernel_config_from_args."""
    d = KernelConfig()
    g = parser.add_argument_group("kernels")
    g.add_argument("--kernels", choices=KERNELS, default=d.kernels,
                   help="auto: fla and Triton kernels on CUDA; torch: plain PyTorch everywhere (default auto)")
    g.add_argument("--skinny-gemm", choices=SKINNY_GEMM, default=d.skinny_gemm,
                   help="auto: Triton skinny GEMM for decode matmuls where the tuned table says it beats "
                        "cuBLAS; off: cuBLAS only (default auto)")
    g.add_argument("--gemm-table", type=_table_file, default=d.gemm_table, metavar="PATH",
                   help="tuned kernel table from `tnl tune` (default: tnl tune's for this card, else the one "
                        "shipped for it or its architecture)")
    g.add_argument("--fla-direct", action=argparse.BooleanOptionalAction, default=d.fla_direct,
                   help="launch fla's prompt kernels directly, indices built on the host (default: where the "
                        "installed fla-core is the tested version)")
    g.add_argument("--fused-decode", choices=FUSED_DECODE, default=d.fused_decode,
                   help="fused decode layers (norms and residual adds inside the matmuls): auto where tuned, "
                        "off, or on (default auto)")
    g.add_argument("--fused-decode-max-rows", type=_whole_number, default=d.fused_decode_max_rows, metavar="N",
                   help=f"rows up to which --fused-decode auto fuses (default {d.fused_decode_max_rows})")
    g.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=d.pdl,
                   help="programmatic dependent launch on sm_90+ (default on)")
    g.add_argument("--pdl-prefetch", type=_whole_number, default=d.pdl_prefetch, metavar="BYTES",
                   help=f"with PDL, weight bytes each GEMM block prefetches into L2 (default {d.pdl_prefetch})")


def kernel_config_from_args(ns: argparse.Namespace) -> KernelConfig:
    """The KernelConfig of a namespace parsed with add_kernel_args' flags; attributes the
    namespace lacks keep their defaults."""
    return KernelConfig(**{f.name: getattr(ns, f.name) for f in fields(KernelConfig) if hasattr(ns, f.name)})
