"""ServerConfig: the options of `tnl serve`, and the argparse flags that fill it.

A leaf module (no torch, no FastAPI): `tnl --help` and the CLI import it cheaply.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from tnl.args import add_model_args, checked, port, positive_int, seconds, wave_ms
from tnl.kernels.config import KernelConfig, add_kernel_args, kernel_config_from_args

DEFAULT_PORT = 6006  # the seed tutorial's port (AutoDL maps it to the user's machine)
# A linear-attention model has no context limit (its state has a fixed size), so what a prompt's
# length costs is the server's time and host memory: prefill is linear in it (~2 x params FLOPs a
# token: 1M tokens of a 7B model is ~14 PFLOP, tens of seconds of an H200 taken from every other
# request's token budget) and its ids take ~36 bytes a token in Python (~36 MB per copy at 1M).
# 1M tokens is far past real prompts (long documents, lm-eval tasks) and still bounds both.
DEFAULT_MAX_PROMPT_TOKENS = 1_000_000
# A parsed JSON body takes ~20x its size in memory, and parsing it holds the event loop. 8 MiB
# holds a prompt of DEFAULT_MAX_PROMPT_TOKENS as text (~4 bytes a token) or as token ids (<= 7
# bytes each in JSON); nginx's default is 1 MiB.
DEFAULT_MAX_BODY_MB = 8


@dataclass(frozen=True)
class ServerConfig:
    """Everything `tnl serve` needs: which model, where to listen, limits, security, logging.

    model: local checkpoint directory or hub id; None serves the bundled demo model.
    max_num_seqs, max_num_batched_tokens, max_waiting, max_prompt_tokens, async_scheduling: engine settings
        (None keeps the engine's default; see tnl.config.EngineConfig), but max_prompt_tokens has the
        server's own default, DEFAULT_MAX_PROMPT_TOKENS (None: no limit).
    max_body_mb: the largest request body read, in MiB; a larger one gets a 413 as soon as its
        Content-Length, or the bytes that arrived, say so.
    api_key: when set, every route except GET /health, the chat page and its static files needs
        `Authorization: Bearer <api_key>`.
    served_model_name: the name clients put in "model"; default: the basename of a local
        model path, or the hub id as given.
    chat_template: a Jinja file that replaces the checkpoint's chat template.
    cors_origins: origins allowed by CORS ("*" for any); empty: no CORS headers. Pages on these
        origins may also POST non-JSON bodies to POST / (other origins get a 403).
    allowed_hosts: Host names served besides the loopback ones ("*": any). Empty: on a loopback
        `host` only loopback names (localhost, 127.0.0.1, [::1]) and names without a dot (in no
        public DNS) are served, which stops DNS rebinding; on any other `host` every name is served.
    log_prompts: put prompt and response text in the access log (off: counts only).
    graceful_shutdown_s: on SIGTERM / Ctrl-C, how long running requests may run on (requests still
        waiting for a slot get a 503 at once); then streams end with finish_reason "abort" and the
        others get a 503.
    header_timeout_s: a connection must send a request's headers within this many seconds of opening
        (or of its previous response); then it is closed (408 if it had begun a request).
    body_timeout_s: a request's body must arrive in full within this many seconds of its headers (408).
    keep_alive_s: an idle kept-alive connection is closed after this many seconds.
    max_connections: open connections at most; a connection past it gets a 503 and is closed.
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
    quantization: str = "none"    # the layer matrices in 8 bits (tnl.config.QUANTIZATIONS)
    state_dtype: str = "float32"   # the state pool's storage (tnl.config.STATE_DTYPES; the flag's default)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    prefill_wave_ms: float | None = None
    max_waiting: int | None = None
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    async_scheduling: bool | None = None
    enable_prefix_caching: bool | None = None   # the prompt-state cache (None: on)
    kernel_config: KernelConfig = field(default_factory=KernelConfig)   # the kernels the model runs
    prefix_cache_gb: float | None = None
    prefix_cache_dir: str | None = None         # snapshots also as state files there, found again at start
    prefix_cache_dir_gb: float | None = None    # that directory's cap (None: EngineConfig's)
    api_key: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    log_prompts: bool = False
    graceful_shutdown_s: float = 10.0
    header_timeout_s: float = 10.0   # nginx's client_header_timeout is 60 s; a real client sends its headers at once
    body_timeout_s: float = 30.0     # prompts are kilobytes: even a slow link sends them in a second
    keep_alive_s: float = 5.0        # uvicorn's default
    max_connections: int = 1000      # well under the usual 1024 open-file limit (raised at start when it can be)
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
            "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_prompt_tokens", "async_scheduling",
            "enable_prefix_caching", "prefix_cache_gb", "prefix_cache_dir", "prefix_cache_dir_gb", "state_dtype",
            "prefill_wave_ms")})

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ServerConfig":
        """Build from the namespace of a parser that went through `add_server_args`; attributes
        the namespace lacks keep their defaults."""
        vals = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        for name in ("cors_origins", "allowed_hosts"):   # repeatable, comma-separated
            items = vals.pop(name, None)
            if items is not None:
                vals[name] = tuple(o.strip() for item in items for o in item.split(",") if o.strip())
        vals["kernel_config"] = kernel_config_from_args(ns)
        return cls(**vals)


def _gigabytes(text: str) -> float:
    return checked(text, float, "gigabytes", lambda v: v >= 0, "expected gigabytes >= 0, got {text}")


def _positive_gigabytes(text: str) -> float:
    return checked(text, float, "gigabytes", lambda v: v > 0, "expected gigabytes > 0, got {text}")


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
    parser.add_argument("--prefill-wave-ms", type=wave_ms, default=None, metavar="MS",
                        help="while sequences decode, admit new prompts in waves: once they fill the free slots "
                             "or the step's token budget, or the oldest has waited MS (default 20 on CUDA, where "
                             "a step with prompts costs ~30 ms beside the decode graph; 0 on the CPU; 0: at once)")
    parser.add_argument("--max-waiting", type=positive_int, default=None,
                        help="requests allowed to wait for a slot; more are refused with 429")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=d.max_prompt_tokens,
                        help=f"longest prompt accepted, in tokens (default {d.max_prompt_tokens}: the model has "
                             f"no context limit; this bounds a prompt's prefill time and memory)")
    parser.add_argument("--max-body-mb", type=positive_int, default=d.max_body_mb,
                        help=f"largest request body accepted, in MiB; a larger one gets a 413 before it is read "
                             f"(default {d.max_body_mb})")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="queue each decode step before reading back the last one's tokens "
                             "(default: on for CUDA)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="the prompt-state cache: snapshots of the recurrent state at exact token "
                             "boundaries (message ends, prompt ends, generation ends) that later prompts "
                             "starting with those tokens continue from (default: on)")
    parser.add_argument("--prefix-cache-gb", type=_gigabytes, default=None,
                        help="the prompt-state cache's budget (default: half the GPU memory free after the "
                             "state slots; 1 GB on CPU)")
    parser.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                        help="also write the prompt-state cache's snapshots to DIR as state files, and load "
                             "this model's files found there at start (a restarted server keeps its cache)")
    parser.add_argument("--prefix-cache-dir-gb", type=_positive_gigabytes, default=None,
                        help="cap of --prefix-cache-dir: this model's oldest files are deleted beyond it "
                             "(default 10)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (GET /health and the chat page stay open)")
    parser.add_argument("--served-model-name", default=None,
                        help="model name shown to clients (default: the model directory's name or hub id)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template file replacing the checkpoint's")
    parser.add_argument("--cors-origins", action="append", default=None, metavar="ORIGINS",
                        help="comma-separated origins allowed by CORS, '*' for any (repeatable)")
    parser.add_argument("--allowed-hosts", action="append", default=None, metavar="HOSTS",
                        help="comma-separated Host names to serve besides localhost, 127.0.0.1 and [::1] "
                             "(repeatable; '*' for any). Default: on a loopback --host only those and names "
                             "without a dot, which stops DNS rebinding; on another --host any")
    parser.add_argument("--log-prompts", action="store_true",
                        help="log prompt and response text in the access log")
    parser.add_argument("--graceful-shutdown-s", type=seconds, default=d.graceful_shutdown_s,
                        help=f"on SIGTERM / Ctrl-C, seconds running requests may take to finish; queued ones "
                             f"get a 503 at once, and streams still running then end with finish_reason "
                             f"'abort' (default {d.graceful_shutdown_s:g})")
    parser.add_argument("--header-timeout-s", type=seconds, default=d.header_timeout_s,
                        help=f"seconds a connection may take to send a request's headers, from when it opens "
                             f"or its last response ended; 0: no limit (default {d.header_timeout_s:g})")
    parser.add_argument("--body-timeout-s", type=seconds, default=d.body_timeout_s,
                        help=f"seconds a request's body may take to arrive after its headers; 0: no limit "
                             f"(default {d.body_timeout_s:g})")
    parser.add_argument("--keep-alive-s", type=seconds, default=d.keep_alive_s,
                        help=f"seconds an idle kept-alive connection stays open (default {d.keep_alive_s:g})")
    parser.add_argument("--max-connections", type=positive_int, default=d.max_connections,
                        help=f"open connections at most; more get a 503 (default {d.max_connections})")
    parser.add_argument("--log-level", default=d.log_level,
                        choices=["debug", "info", "warning", "error"], help="log level (default info)")
    add_kernel_args(parser)
    add_ray_args(parser)
    return parser


# A state moves between replicas when the prefix it saves is at least this long: a 7B state is
# 65 MB, and its export plus import took ~0.43 s on an H200 while prefill ran ~20k tokens/s there
# (README, "Saving a conversation and moving it to another server"), so ~8k tokens break even.
DEFAULT_MOVE_STATE_MIN_TOKENS = 8192


def _nonnegative_float(text: str) -> float:
    return checked(text, float, "a number", lambda v: v >= 0, "expected a number >= 0, got {text}")


def _nonnegative_int(text: str) -> int:
    return checked(text, int, "an integer", lambda v: v >= 0, "expected an integer >= 0, got {text}")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `tnl serve --ray` (tnl.ray_app.RayOptions; Ray is imported only with --ray)."""
    g = parser.add_argument_group("scale-out on Ray Serve (pip install 'tnl[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: one endpoint at --host/--port over --num-replicas engines, "
                        "requests routed to the replica that holds their prompt's state")
    g.add_argument("--num-replicas", type=positive_int, default=None,
                   help="engine replicas (default 1; with `serve run`, the config file may set it or autoscaling)")
    g.add_argument("--ray-address", default=None,
                   help="the Ray cluster to join ('auto': the one this machine belongs to); default: a local "
                        "Ray instance, or the one RAY_ADDRESS names")
    g.add_argument("--ray-dashboard", action=argparse.BooleanOptionalAction, default=True,
                   help="start the local Ray instance with its dashboard (port 8265; `serve status` needs it); "
                        "default on; no effect with --ray-address")
    g.add_argument("--replica-gpus", type=_nonnegative_float, default=None,
                   help="GPUs per replica (default 1 when the cluster has GPUs and --device is not cpu, else 0; "
                        "0.5 puts two replicas on one GPU: then set --max-num-seqs and --prefix-cache-gb)")
    g.add_argument("--replica-cpus", type=_nonnegative_float, default=1.0,
                   help="CPUs Ray reserves per replica (default 1; fractions allowed)")
    g.add_argument("--ingress-replicas", type=positive_int, default=1,
                   help="replicas of the ingress that routes requests to the engines (default 1; each keeps "
                        "its own view of where the states are)")
    g.add_argument("--ray-router", choices=["affine", "random"], default="affine",
                   help="affine (default): by the longest prompt prefix a replica holds, else by load; "
                        "random: any replica (the baseline of benchmarks/ray_bench.py)")
    g.add_argument("--move-state-min-tokens", type=_nonnegative_int, default=DEFAULT_MOVE_STATE_MIN_TOKENS,
                   help=f"when a request's state holder is saturated and it goes elsewhere, move the state "
                        f"there if it saves at least this many tokens of prefill; 0: never move "
                        f"(default {DEFAULT_MOVE_STATE_MIN_TOKENS})")
