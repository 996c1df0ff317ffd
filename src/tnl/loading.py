"""Loading: a model name -> a local directory -> a model, its tokenizer and its stop ids -> an
engine. The one builder, used by `LLM`, the CLI, the server and `tnl bench`.

Names: None or "demo" is the bundled demo model, "random-7b" random weights with the 7B's
shapes (benchmarks), anything else a local directory or a hub id (tnl.hub).
"""
from __future__ import annotations

import functools
import json
import logging
import os

from tnl.config import EngineConfig
from tnl.kernels.config import KernelConfig

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = os.path.join(os.path.dirname(__file__), "demo")
DEMO_MODEL = "demo"          # --model demo: the bundled demo model (what no --model means); ./demo is a directory
RANDOM_MODEL = "random-7b"   # --model random-7b: random weights with the 7B's shapes (speed tests)
PARAMS_PER_THREAD = 100_000_000   # CPU: below ~100M parameters per thread the matmuls are too small to split


def resolve_model_dir(model: str | None, source: str = "modelscope", cache_dir: str | None = None,
                      revision: str | None = None) -> str:
    """None or "demo" -> the bundled demo model; a local directory; or a hub id (cache, then download)."""
    if model is None or model == DEMO_MODEL:
        if not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")):
            raise FileNotFoundError("no model given and the bundled demo model is missing from this install")
        return DEMO_MODEL_DIR
    from tnl.hub import resolve_model
    return resolve_model(model, source=source, cache_dir=cache_dir, revision=revision)


def available_memory() -> int | None:
    """Bytes this process can still allocate on the host: MemAvailable, within the cgroup's
    memory limit when one is set (containers); None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_host_memory(what: str, nbytes: int) -> None:
    """Refuse, before allocating, weights that cannot fit in host memory (a 7B in float32 is
    ~28 GB: building it on a small machine ends in the OOM killer, not an error)."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise MemoryError(f"{what} needs {nbytes / 1e9:.1f} GB of memory on the CPU and {avail / 1e9:.1f} GB "
                          f"is available: run it on a GPU (--device cuda), or use --model demo")


def set_cpu_threads(cfg, threads: int | None) -> None:
    """Intra-op threads for CPU matmuls: `threads`, else one per PARAMS_PER_THREAD parameters
    (at most torch's default, the physical cores), unless OMP_NUM_THREADS says otherwise.
    Small models lose badly to more threads when the cores are shared: 13-token scoring
    requests on the demo model took ~1.07 s in bursts with torch's default threads on 2 busy
    cores, against ~25 ms with one thread."""
    import torch
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = max(1, min(_default_threads(), cfg.num_params() // PARAMS_PER_THREAD))
    torch.set_num_threads(threads)
    log.debug("CPU threads: %d", threads)


@functools.cache
def _default_threads() -> int:
    import torch
    return torch.get_num_threads()   # read once, before any set_num_threads of ours


def generation_stop_ids(model_dir: str | None) -> set[int]:
    """eos ids from generation_config.json (an int or a list), when the checkpoint has one."""
    if not model_dir:
        return set()
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", path)
        return set()
    if isinstance(eos, int):
        return {eos}
    return {e for e in eos or [] if isinstance(e, int)}


def build_engine(model: str | None = None, device: str = "auto", dtype: str = "auto",
                 engine_config: EngineConfig | None = None, chat_template_file: str | None = None,
                 source: str = "modelscope", cache_dir: str | None = None, revision: str | None = None,
                 progress: bool = True, threads: int | None = None, kernel_config: KernelConfig | None = None,
                 quantization: str = "none"):
    """The LLMEngine for `model` (see the module docstring for names); kernel_config: the kernels
    its model runs (default KernelConfig()); quantization: the layer matrices in 8 bits
    (tnl.kernels.quant), checked against the device before any weight is read."""
    from tnl.config import ModelConfig
    from tnl.engine.llm_engine import LLMEngine
    from tnl.model.tokenizer import Tokenizer
    from tnl.kernels.quant import check_device
    from tnl.model.weights import RANDOM_7B, load_model, random_model, resolve_device, resolve_dtype

    check_device(quantization, resolve_device(device))   # fp8 on a CPU or an old GPU: refused before loading
    if model == RANDOM_MODEL:  # benchmarks: random 7B-shaped weights built on the device, no tokenizer
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu":
            cfg = ModelConfig.from_dict(RANDOM_7B)
            check_host_memory(f"{RANDOM_MODEL} in {str(dt).removeprefix('torch.')}",
                              cfg.num_params() * dt.itemsize)
            set_cpu_threads(cfg, threads)
        m = random_model(RANDOM_7B, dev, dt, kernel_config=kernel_config, quantization=quantization)
        return LLMEngine(m, None, engine_config)
    path = resolve_model_dir(model, source, cache_dir, revision)
    m = load_model(path, device=device, dtype=dtype, progress=progress, kernel_config=kernel_config,
                   quantization=quantization)
    if m.head_weight.device.type == "cpu":
        set_cpu_threads(m.config, threads)
    cfg = m.config
    tok = Tokenizer.from_dir(path, chat_template_file=chat_template_file, bos_token_id=cfg.bos_token_id,
                             eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if tok is None:
        log.warning("%s has no tokenizer.model: prompts must be token ids", path)
        if chat_template_file:
            raise ValueError("--chat-template needs a tokenizer, and this checkpoint has no tokenizer.model")
    return LLMEngine(m, tok, engine_config, extra_stop_ids=generation_stop_ids(path))
