"""Which tuned kernel table a card uses: `tnl tune`'s own measurement of this card first, then a
table shipped for this card, then the one shipped for its architecture (sm_90: measured on an
H100), else none. The log names the table and whether it was measured on this card.

A table is the JSON that `tnl tune` writes (and benchmarks/gemm_bench.py --json): "device" (the
card's name), "tuned" (the skinny GEMM's best config per (M bucket, N, K), which
triton_gemm.TunedTable reads) and optionally "fla" (one Triton config per fla prompt kernel,
pinned by fla_prefill.pin_configs so that nothing autotunes at start-up).

Where `tnl tune` writes: $TNL_CACHE_DIR/tuned/<card>.json, else ~/.cache/tnl/tuned/<card>.json,
<card> the device name in lower case with dashes ("NVIDIA H200" -> nvidia-h200).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "tuned")
# the shipped table for cards of an architecture that have none of their own
ARCH_DEFAULT = {(9, 0): "nvidia-h100-80gb-hbm3"}
# fla's prompt kernels on sm_90 when a table has no "fla" entry: what fla's autotuner chose on an
# H200 for tnl's 7B shapes (BENCHMARKS.md, 2026-12-02, the cold-start profile)
FLA_SM90 = {"chunk_fwd_kernel_h": {"BK": 64, "BV": 64, "num_warps": 8, "num_stages": 3},
            "chunk_fwd_kernel_o": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3}}


def card_slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"


def tune_dir() -> str:
    root = os.environ.get("TNL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tnl")
    return os.path.join(root, "tuned")


def user_table_path(device_name: str) -> str:
    return os.path.join(tune_dir(), card_slug(device_name) + ".json")


@dataclass
class TableChoice:
    path: str | None       # None: no table (cuBLAS; fla autotunes)
    obj: dict | None
    for_this_card: bool    # measured on a card of this name
    source: str            # "tnl tune", "shipped", "given", "none"

    def describe(self, device_name: str) -> str:
        if self.path is None:
            return f"no tuned table for {device_name}: run `tnl tune`"
        measured = (self.obj or {}).get("device", "?")
        note = "tuned on this card" if self.for_this_card else f"tuned on {measured}, not this card: run `tnl tune`"
        return f"{self.source} table {self.path} ({note})"


def read_table(path: str) -> dict:
    with open(path) as f:
        obj = json.load(f)
    if not isinstance(obj, dict) or not isinstance(obj.get("tuned"), list):
        raise ValueError("no 'tuned' list")
    return obj


def choose_table(device_name: str, capability: tuple[int, int], given: str | None = None) -> TableChoice:
    """The table for this card (see the module's docstring). `given` (--gemm-table) wins and must
    be readable (ValueError); an unreadable cached table is skipped with a warning."""
    if given is not None:
        try:
            obj = read_table(given)
        except (OSError, ValueError) as e:
            raise ValueError(f"gemm table {given}: cannot read it ({type(e).__name__}: {e}); expected the JSON "
                             "that `tnl tune` (or benchmarks/gemm_bench.py --json) writes") from None
        return TableChoice(given, obj, obj.get("device") == device_name, "given")
    candidates = [(user_table_path(device_name), "tnl tune"),
                  (os.path.join(SHIPPED_DIR, card_slug(device_name) + ".json"), "shipped")]
    if capability in ARCH_DEFAULT:
        candidates.append((os.path.join(SHIPPED_DIR, ARCH_DEFAULT[capability] + ".json"), "shipped"))
    for path, source in candidates:
        if not os.path.exists(path):
            continue
        try:
            obj = read_table(path)
        except (OSError, ValueError) as e:
            log.warning("tuned table %s unreadable (%s: %s); skipped", path, type(e).__name__, e)
            continue
        return TableChoice(path, obj, obj.get("device") == device_name, source)
    return TableChoice(None, None, False, "none")


def fla_configs(choice: TableChoice, capability: tuple[int, int]) -> dict | None:
    """The fla kernel configs to pin: the table's, else tnl's sm_90 defaults, else None (autotune)."""
    if choice.obj and isinstance(choice.obj.get("fla"), dict):
        return choice.obj["fla"]
    return dict(FLA_SM90) if capability == (9, 0) else None
