"""The offline API (vLLM's shape) and the one place that turns a model name into an engine."""
from __future__ import annotations

import functools
import logging
import os

from tnl.config import EngineConfig
from tnl.engine.engine import LLMEngine, generation_stop_ids
from tnl.engine.request import RequestOutput
from tnl.engine.sampling_params import SamplingParams

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


def build_engine(model: str | None = None, device: str = "auto", dtype: str = "auto",
                 engine_config: EngineConfig | None = None, chat_template_file: str | None = None,
                 source: str = "modelscope", cache_dir: str | None = None, revision: str | None = None,
                 progress: bool = True, threads: int | None = None) -> LLMEngine:
    from tnl.config import ModelConfig
    from tnl.model.tokenizer import Tokenizer
    from tnl.model.weights import RANDOM_7B, load_model, random_model, resolve_device, resolve_dtype

    if model == RANDOM_MODEL:  # benchmarks: random 7B-shaped weights built on the device, no tokenizer
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dev.type == "cpu":
            cfg = ModelConfig.from_dict(RANDOM_7B)
            check_host_memory(f"{RANDOM_MODEL} in {str(dt).removeprefix('torch.')}",
                              cfg.num_params() * dt.itemsize)
            set_cpu_threads(cfg, threads)
        m = random_model(RANDOM_7B, dev, dt)
        if m.head_weight.is_cuda:
            m.fuse()
        return LLMEngine(m, None, engine_config)
    path = resolve_model_dir(model, source, cache_dir, revision)
    m = load_model(path, device=device, dtype=dtype, progress=progress)
    if m.head_weight.device.type == "cpu":
        set_cpu_threads(m.config, threads)
    if m.head_weight.is_cuda:
        m.fuse()
    cfg = m.config
    tok = Tokenizer.from_dir(path, chat_template_file=chat_template_file, bos_token_id=cfg.bos_token_id,
                             eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if tok is None:
        log.warning("%s has no tokenizer.model: prompts must be token ids", path)
        if chat_template_file:
            raise ValueError("--chat-template needs a tokenizer, and this checkpoint has no tokenizer.model")
    return LLMEngine(m, tok, engine_config, extra_stop_ids=generation_stop_ids(path))


class LLM:
    """Offline generation over the same engine the server uses.

    >>> llm = LLM("path/or/hub-id", device="auto", dtype="auto")
    >>> outs = llm.generate(["你好", "Hello"], SamplingParams(max_tokens=64, temperature=0.8, seed=1))
    >>> outs[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 max_num_seqs: int | None = None, max_num_batched_tokens: int = 2048,
                 chat_template: str | None = None, source: str = "modelscope", cache_dir: str | None = None,
                 revision: str | None = None, cuda_graphs: bool = True, progress: bool = True,
                 threads: int | None = None):
        ec = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_waiting=1 << 30, cuda_graphs=cuda_graphs)
        self.engine = build_engine(model, device, dtype, ec, chat_template, source, cache_dir, revision, progress,
                                   threads=threads)
        self.tokenizer = self.engine.tokenizer

    def _encode(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, (list, tuple)):
            return list(prompt), None
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. Returns one RequestOutput
        per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        eng = self.engine
        reqs = []
        try:
            for p, sp in zip(prompts, plist):
                ids, text = self._encode(p)
                reqs.append(eng.add_request(ids, sp, prompt=text))
            while any(not r.finished for r in reqs):
                eng.step()
        except BaseException:
            for r in reqs:
                eng.abort(r.request_id)
            while eng.has_work:   # free the slots before handing the error on
                eng.step()
            raise
        finally:
            for r in reqs:
                eng.release(r.request_id)
        return [eng.final_output(r) for r in reqs]

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this checkpoint has no tokenizer.model")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.tokenizer
        prompts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
        ids = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True) for c in convs]
        outs = self.generate(ids, sampling_params)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs
