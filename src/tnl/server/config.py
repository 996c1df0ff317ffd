"""ServerConfig: the options of `tnl serve`, and the argparse flags that fill it.

A leaf module (no torch, no FastAPI): `tnl --help` and the CLI import it cheaply.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from tnl.args import add_model_args, port, positive_int, seconds

DEFAULT_PORT = 6006  # the seed tutorial's port (AutoDL maps it to the user's machine)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `tnl serve` needs: which model, where to listen, limits, security, logging.

    model: local checkpoint directory or hub id; None serves the bundled demo model.
    max_num_seqs, max_num_batched_tokens, max_waiting, max_prompt_tokens, async_scheduling: engine settings
        (None keeps the engine's default; see tnl.config.EngineConfig).
    api_key: when set, every route except GET /health, the chat page and its static files needs
        `Authorization: Bearer <api_key>`.
    served_model_name: the name clients put in "model"; default: the basename of a local
        model path, or the hub id as given.
    chat_template: a Jinja file that replaces the checkpoint's chat template.
    cors_origins: origins allowed by CORS ("*" for any); empty: no CORS headers.
    log_prompts: put prompt and response text in the access log (off: counts only).
    graceful_shutdown_s: on SIGTERM / Ctrl-C, how long in-flight requests may run on.
    """

    model: str | None = None
    source: str = "modelscope"  # hub to download from when `model` is an id not in the cache
    cache_dir: str | None = None  # hub download cache (None: $TNL_CACHE_DIR, else the hub library's)
    revision: str | None = None   # hub branch, tag or commit
    threads: int | None = None    # CPU matmul threads (None: derived from the model's size)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_waiting: int | None = None
    max_prompt_tokens: int | None = None
    async_scheduling: bool | None = None
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    log_prompts: bool = False
    graceful_shutdown_s: float = 10.0
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        """The name served in /v1/models and accepted in requests' "model" field."""
        if self.served_model_name:
            return self.served_model_name
        if self.model in (None, "demo"):   # the bundled demo model (tnl.loading.DEMO_MODEL)
            return "tnl-demo"
        path = self.model.rstrip("/\\")
        if os.path.isdir(path):
            return os.path.basename(path) or path
        return self.model  # a hub id such as OpenNLPLab/TransNormerLLM-7B stays whole

    def engine_config(self):
        """The EngineConfig these options ask for (unset options keep the engine's defaults)."""
        from tnl.config import engine_config

        return engine_config(**{name: getattr(self, name) for name in (
            "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_prompt_tokens", "async_scheduling")})

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ServerConfig":
        """Build from the namespace of a parser that went through `add_server_args`; attributes
        the namespace lacks keep their defaults."""
        vals = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        origins = vals.pop("cors_origins", None)
        if origins is not None:
            vals["cors_origins"] = tuple(o.strip() for item in origins for o in item.split(",") if o.strip())
        return cls(**vals)


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `tnl serve` flags to `parser` (its namespace then feeds ServerConfig.from_args).

    The model flags (--model, --device, --dtype, --source, --cache-dir, --revision, --threads)
    are tnl.args.add_model_args, shared with the other commands."""
    d = ServerConfig()
    add_model_args(parser)
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=port, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=None,
                        help="state slots = sequences decoded at once (default: as many as memory holds)")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                        help="token budget of one engine step")
    parser.add_argument("--max-waiting", type=positive_int, default=None,
                        help="requests allowed to wait for a slot; more are refused with 429")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                        help="longest prompt accepted, in tokens (default: no limit)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="queue each decode step before reading back the last one's tokens "
                             "(default: on for CUDA)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (GET /health and the chat page stay open)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name shown to clients (default: the model directory's name or hub id)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template file replacing the checkpoint's")
    parser.add_argument("--cors-origins", action="append", default=None, metavar="ORIGINS",
                        help="comma-separated origins allowed by CORS, '*' for any (repeatable)")
    parser.add_argument("--log-prompts", action="store_true",
                        help="log prompt and response text in the access log")
    parser.add_argument("--graceful-shutdown-s", type=seconds, default=d.graceful_shutdown_s,
                        help=f"on SIGTERM / Ctrl-C, seconds in-flight requests may take to finish "
                             f"(default {d.graceful_shutdown_s:g})")
    parser.add_argument("--log-level", default=d.log_level,
                        choices=["debug", "info", "warning", "error"], help="log level (default info)")
    return parser
