"""Command-line flags shared by `tnl serve`, `generate`, `chat` and `bench` (and
`python -m tnl.server`), and argparse number types that say what was expected.

Torch-free: `tnl --help` builds every parser without importing torch.
"""
from __future__ import annotations

import argparse

from tnl.config import DEFAULT_SYSTEM_PROMPT, QUANTIZATIONS, STATE_DTYPES
from tnl.hub import DEFAULT_SOURCE, SOURCES


def checked(text: str, cast, expected: str, ok, out_of_range: str):
    """argparse type: cast(text), else 'expected <expected>, got <text>'; then ok(value), else
    out_of_range formatted with {value} and {text}."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(out_of_range.format(value=value, text=text))
    return value


def positive_int(text: str) -> int:
    return checked(text, int, "a positive integer", lambda v: v >= 1, "expected a positive integer, got {value}")


def port(text: str) -> int:
    return checked(text, int, "a port number", lambda v: 0 <= v <= 65535, "port must be in [0, 65535], got {value}")


def seconds(text: str) -> float:
    return checked(text, float, "seconds", lambda v: v >= 0, "expected seconds >= 0, got {text}")


def wave_ms(text: str) -> float:
    return checked(text, float, "milliseconds", lambda v: 0 <= v <= 10_000,
                   "expected milliseconds in [0, 10000], got {text}")


def add_model_args(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    """Which model, where it comes from, and where it runs."""
    p.add_argument("--model", default=None, help=model_help or (
        "checkpoint directory, hub id (org/name), or 'demo' (default: the bundled demo model)"))
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu or auto (default auto)")
    p.add_argument("--dtype", default="auto",
                   help="bfloat16, float16, float32 or auto (default auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--source", default=DEFAULT_SOURCE, choices=list(SOURCES),
                   help=f"hub to download from when --model is a hub id not in the cache "
                        f"(default {DEFAULT_SOURCE})")
    p.add_argument("--cache-dir", default=None,
                   help="download cache directory (default: $TNL_CACHE_DIR, else the hub library's own)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a hub model (default: ModelScope master, Hugging Face main)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the model's matmuls (default: one per 100M parameters, at most the "
                        "cores torch would use; so 1 for the demo model). Only matters on CPU")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="store the layer matrices in 8 bits, quantized at load time per output channel "
                        "(float32 scales; embedding and head keep --dtype): int8 on any device, fp8 (e4m3) on "
                        "GPUs of compute capability 8.9+ (default none). Accuracy: README, '8-bit weights and a 16-bit state'")
    p.add_argument("--state-dtype", default="float32", choices=list(STATE_DTYPES),
                   help="how each sequence's recurrent state is stored; updates accumulate in float32 either way, "
                        "and 16 bits hold twice the sequences in the same memory (default float32)")


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template file replacing the checkpoint's")
    p.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT,
                   help=f"system message before the first user message ('' for none; default "
                        f"{DEFAULT_SYSTEM_PROMPT!r}, as POST / and the web page send)")
