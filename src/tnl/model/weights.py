"""Checkpoint files -> a ready model, and random checkpoints for tests and benchmarks.

Checkpoints use the official names; one mapping differs from the model's parameters: each layer's
channel_mixer.l1 and l2 are the two halves of the model's channel_mixer.l12 (one matmul). Loading
writes each into its half (packed_part says where); saving splits l12 back (the model's
state_dict() does, see SGLU).

Layouts read (in this order of preference, the first one present wins):
    model.safetensors.index.json + model-0000k-of-0000n.safetensors
    model.safetensors
    pytorch_model.bin.index.json + pytorch_model-0000k-of-0000n.bin
    pytorch_model.bin
(shards without their index are read too when the whole 1..n set is present).

Loading streams one tensor at a time: the model is built on the meta device (no memory), each
checkpoint tensor is read from the file, converted to the target dtype, moved to the target
device and becomes its parameter. No second copy of the weights exists at any time, so a
model loads where it fits: the 7B (13.67 GB in bf16) peaks at exactly its parameters' 13.67 GB of
CUDA memory (measured on an H100), so it fits a 24 GB GPU. On CPU, a tensor already in the target
dtype is not copied at all: the parameter is a private (copy-on-write) memory map of the file,
read from disk on first use.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tnl.config import ModelConfig
from tnl.kernels.backend import Backend
from tnl.kernels.config import KernelConfig
from tnl.kernels.quant import check_device, quantize_model
from tnl.model.transnormer import Lrpe, TransnormerForCausalLM, expected_tensors, packed_part

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory tnl cannot load; the message says which file or tensor and why."""


CONFIG_NAME = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_SHARD_RE = re.compile(r"^(model|pytorch_model)-(\d+)-of-(\d+)\.(safetensors|bin)$")

# Written by the official (fairseq-era) code; its loader ignores it, so does tnl.
IGNORED_TENSORS = frozenset({"decoder.version"})
HEAD = "lm_head.weight"
MAX_LISTED = 30  # per kind of problem in one error message

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


# ---- device and dtype ---------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise a torch device string that exists here."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"bad device {device!r} ({e}); expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "meta":
        raise ValueError("device 'meta' holds no data; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The weight dtype: "auto" is bfloat16 on CUDA and float32 on CPU.

    float16 is allowed but warned about: the released 7B overflows in fp16 (NaN probabilities)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; choose one of: auto, {', '.join(_DTYPES)}")
        out = dtype
    elif not isinstance(dtype, str):
        raise ValueError(f"bad dtype {dtype!r}; choose one of: auto, {', '.join(_DTYPES)}")
    elif dtype.lower() == "auto":
        kind = resolve_device(device).type if device == "auto" else torch.device(device).type
        return torch.bfloat16 if kind == "cuda" else torch.float32
    elif dtype.lower().removeprefix("torch.") in _DTYPES:
        out = _DTYPES[dtype.lower().removeprefix("torch.")]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(_DTYPES)}")
    if out == torch.float16:
        logger.warning("float16 weights: the TransNormerLLM-7B overflows in fp16 (NaN probabilities have "
                       "been reported); bfloat16 is recommended")
    return out


# ---- finding the files ---------------------------------------------------------------------------
@dataclass
class WeightFiles:
    """The weight files of one checkpoint directory, in read order."""

    fmt: str                 # "safetensors" | "bin"
    files: list[str]         # absolute paths
    index: str | None        # the index json, when the layout has one


def _from_index(directory: str, index_name: str, fmt: str) -> WeightFiles:
    index_path = os.path.join(directory, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' must map tensor names to file names")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index file ({type(e).__name__}: {e}); expected "
                              "JSON with a 'weight_map' of tensor name -> shard file") from None
    shards = sorted(set(weight_map.values()))
    if not shards:
        raise CheckpointError(f"{index_path}: 'weight_map' is empty; expected tensor name -> shard file")
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise CheckpointError(f"{index_path} names shard file(s) that are not in {directory}: "
                              f"{', '.join(missing)} (the download may be incomplete)")
    return WeightFiles(fmt, [os.path.join(directory, s) for s in shards], index_path)


def _unindexed_shards(directory: str, names: list[str], stem: str, ext: str) -> WeightFiles | None:
    found = {}
    for n in names:
        m = _SHARD_RE.match(n)
        if m and m.group(1) == stem and m.group(4) == ext:
            found.setdefault(int(m.group(3)), {})[int(m.group(2))] = n
    if not found:
        return None
    total = max(found)
    have = found[total]
    lacking = [f"{stem}-{k:05d}-of-{total:05d}.{ext}" for k in range(1, total + 1) if k not in have]
    index_name = SAFE_INDEX if ext == "safetensors" else BIN_INDEX
    if lacking:
        raise CheckpointError(f"{directory}: no {index_name} and shard file(s) missing: {', '.join(lacking)}")
    logger.warning("%s: no %s; reading the %d shards found", directory, index_name, total)
    return WeightFiles(ext, [os.path.join(directory, have[k]) for k in sorted(have)], None)


def find_weight_files(directory: str) -> WeightFiles:
    """The weight files of a checkpoint directory (safetensors preferred over .bin)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory; expected a checkpoint folder with "
                              f"{CONFIG_NAME} and weight files")
    names = sorted(os.listdir(directory))
    for fmt, index, single, prefix in (("safetensors", SAFE_INDEX, SAFE_SINGLE, "model"),
                                       ("bin", BIN_INDEX, BIN_SINGLE, "pytorch_model")):
        if index in names:
            return _from_index(directory, index, fmt)
        if single in names:
            return WeightFiles(fmt, [os.path.join(directory, single)], None)
        shards = _unindexed_shards(directory, names, prefix, fmt)
        if shards:
            return shards
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"
    raise CheckpointError(
        f"{directory}: no weight files. Expected {SAFE_SINGLE}, model-0000k-of-0000n.safetensors + "
        f"{SAFE_INDEX}, {BIN_SINGLE}, or pytorch_model-0000k-of-0000n.bin + {BIN_INDEX}; found: {shown}")


# ---- reading tensors -----------------------------------------------------------------------------
def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped where the file format allows (zip format, torch >= 2.1)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (pre-zip) serialization cannot be mapped: read the whole shard.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError/OSError/pickle errors for damaged files
        raise CheckpointError(f"{path}: cannot read this .bin file ({type(e).__name__}: {e}); it may be "
                              "truncated or not a PyTorch state dict (re-download it)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    return sd


def _open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError derives from Exception only
        raise CheckpointError(f"{path}: cannot read this safetensors file ({e}); it may be truncated "
                              "(re-download it)") from None


def _scan(wf: WeightFiles) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, file) over all files, reading only headers (safetensors) or mmaps (.bin)."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    dup = []
    for path in wf.files:
        if wf.fmt == "safetensors":
            with _open_safetensors(path) as f:
                entries = [(n, tuple(f.get_slice(n).get_shape())) for n in f.keys()]
        else:
            sd = _load_bin(path)
            entries = [(n, tuple(t.shape)) for n, t in sd.items()]
            del sd
        for name, shape in entries:
            if name in found:
                dup.append(f"{name} (in {os.path.basename(found[name][1])} and {os.path.basename(path)})")
            found[name] = (shape, path)
    if dup:
        raise CheckpointError("tensors stored twice: " + "; ".join(dup))
    return found


def _listing(items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "".join(f"\n    {s}" for s in shown) + more


def _check_names(cfg: ModelConfig, found: dict, directory: str) -> set[str]:
    """Compare the checkpoint with the model; raise one CheckpointError listing every problem.
    Returns the checkpoint names to skip (ignored ones, a tied checkpoint's redundant head)."""
    expected = expected_tensors(cfg)
    skip = {n for n in found if n in IGNORED_TENSORS}
    if cfg.tie_word_embeddings and HEAD in found:
        skip.add(HEAD)  # the head is the embedding; a saved copy of it is redundant
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and n not in skip]
    wrong = [(n, expected[n], found[n][0], found[n][1]) for n in expected
             if n in found and tuple(found[n][0]) != tuple(expected[n])]
    if not (missing or unexpected or wrong):
        return skip
    parts = [f"checkpoint {directory} does not match its config.json:"]
    if missing:
        parts.append(f"  missing tensors ({len(missing)}):" + _listing([f"{n} {list(expected[n])}" for n in missing]))
        if HEAD in missing:
            parts.append("  lm_head.weight is missing and config.json says \"tie_word_embeddings\": false; if "
                         "the head shares the embedding matrix, set it to true (or remove the key)")
    if unexpected:
        parts.append(f"  unexpected tensors ({len(unexpected)}):" + _listing(
            [f"{n} {list(found[n][0])} in {os.path.basename(found[n][1])}" for n in unexpected]))
    if wrong:
        parts.append(f"  wrong shapes ({len(wrong)}):" + _listing(
            [f"{n}: expected {list(e)}, found {list(s)} in {os.path.basename(p)}" for n, e, s, p in wrong]))
    if wrong or (missing and unexpected):
        parts.append("  (is config.json the one that belongs to these weights?)")
    raise CheckpointError("\n".join(parts))


def _iter_tensors(wf: WeightFiles, skip: set[str]):
    """Yield (path, name, cpu tensor) one tensor at a time, file by file. The tensors are
    private (copy-on-write) memory maps of the file where the reader maps it."""
    for path in wf.files:
        if wf.fmt == "safetensors":
            with _open_safetensors(path) as f:
                for name in f.keys():
                    if name not in skip:
                        yield path, name, f.get_tensor(name)
        else:
            sd = _load_bin(path)
            for name in list(sd):
                t = sd.pop(name)  # drop the dict's reference so each tensor is freed after use
                if name not in skip:
                    yield path, name, t
            del sd


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _place(model: nn.Module, name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Checkpoint tensor `name` -> its parameter on `device` in `dtype`: the parameter itself (on
    CPU in the file's dtype, no copy: the file's private mapping), or, for one part of a packed
    parameter (l1 / l2 -> l12), copied into its rows of that parameter (allocated with the
    first part). Returns the value placed."""
    part = packed_part(name)
    if part is None:
        value = t.to(device=device, dtype=dtype).contiguous()
        _set_parameter(model, name, value)
        return value
    packed, index, count = part
    param = model.get_parameter(packed)
    if param.is_meta:
        _set_parameter(model, packed, torch.empty(param.shape, device=device, dtype=dtype))
        param = model.get_parameter(packed)
    rows = param.shape[0] // count
    param[index * rows:(index + 1) * rows].copy_(t)
    return param


def _place_buffers(model: TransnormerForCausalLM, device: torch.device) -> None:
    """The per-layer decay rates are computed, not stored: under meta they have no values yet."""
    for layer in model.model.layers:
        layer.token_mixer.reset_decay(model.config, device)


def _check_ignored_head(wf: WeightFiles, found: dict, model: TransnormerForCausalLM) -> None:
    """A tied checkpoint's saved lm_head should equal the embedding; warn if it does not
    (it is ignored either way, as Hugging Face does when it ties the weights)."""
    path = found[HEAD][1]
    rows = 8
    if wf.fmt == "safetensors":
        with _open_safetensors(path) as f:
            head = f.get_slice(HEAD)[:rows]
    else:
        head = _load_bin(path)[HEAD][:rows].clone()
    emb = model.model.embed_tokens.weight[:rows].cpu()
    if not torch.equal(head.to(emb.dtype), emb):  # both rounded to the model's dtype the same way
        logger.warning("%s: lm_head.weight differs from the embedding but config.json ties them "
                       "(tie_word_embeddings true or absent); lm_head.weight is ignored", path)
    else:
        logger.debug("%s: lm_head.weight equals the embedding (tied); ignored", path)


def load_model(path: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               progress: bool = True, kernel_config: KernelConfig | None = None,
               quantization: str = "none") -> TransnormerForCausalLM:
    """Load a TransNormerLLM checkpoint directory.

    Args:
        path: directory with config.json and the weights (see the module docstring for layouts).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "bfloat16", "float16", "float32" or a
            torch.dtype. LRPE theta stays float32 whatever this is (angles need the precision).
        progress: show a progress bar over bytes on stderr (only when stderr is a terminal).
        kernel_config: the kernels the model runs (default KernelConfig(): fla and Triton where
            they load on CUDA, PyTorch on the CPU); its Backend is built here for `device`.
        quantization: "none", or "int8" / "fp8": the layer matrices quantized once loaded
            (tnl.kernels.quant.quantize_model; the embedding and the head keep `dtype`).
    Returns:
        the model in eval mode, gradients off, every parameter and buffer on `device`, with its
        kernel backend.
    Raises:
        ConfigError: config.json missing, unparsable, or with a missing / wrong-typed key.
        CheckpointError: weight files missing, damaged, or not matching config.json.
        ValueError: a bad device or dtype.
    """
    dev = resolve_device(device)
    target = resolve_dtype(dtype, dev)
    check_device(quantization, dev)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory; expected a checkpoint folder with "
                              f"{CONFIG_NAME} and weight files")
    cfg = ModelConfig.from_file(os.path.join(path, CONFIG_NAME))
    wf = find_weight_files(path)
    found = _scan(wf)
    skip = _check_names(cfg, found, path)
    for name in sorted(skip - {HEAD}):
        logger.debug("ignoring checkpoint tensor %s", name)

    backend = Backend(kernel_config, dev)
    with torch.device("meta"):
        model = TransnormerForCausalLM(cfg, backend=backend)

    t0 = time.perf_counter()
    read_bytes = in_place = 0
    sizes = [os.path.getsize(f) for f in wf.files]
    # Over file bytes; disable=None turns the bar off when stderr is not a terminal (logs, CI).
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"Loading {os.path.basename(path.rstrip('/'))}",
               file=sys.stderr, disable=None if progress else True, leave=False)
    file_start = dict(zip(wf.files, [sum(sizes[:i]) for i in range(len(sizes))]))
    with torch.no_grad():
        for file, name, t in _iter_tensors(wf, skip):
            bar.update(max(0, file_start[file] - bar.n))  # headers and skipped tensors of earlier files
            want = torch.float32 if name.endswith("lrpe.theta") else target
            # On CPU in the file's dtype this is no copy at all: the parameter is the (private)
            # mapping of the file, paged in on first use and shared with the page cache.
            value = _place(model, name, t, dev, want)
            nbytes = t.numel() * t.element_size()
            in_place += nbytes if value.data_ptr() == t.data_ptr() else 0
            del t, value
            read_bytes += nbytes
            bar.update(nbytes)
    bar.update(bar.total - bar.n)
    bar.close()
    _place_buffers(model, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0

    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:  # _check_names guarantees this cannot happen; fail loudly rather than run on meta tensors
        raise CheckpointError(f"{path}: internal error, tensors left without values: {', '.join(left)}")
    if HEAD in skip:
        _check_ignored_head(wf, found, model)
    model.eval()
    model.requires_grad_(False)
    quantize_model(model, quantization)
    logger.info("loaded %s: %d tensors, %.2f GB (%s) in %.2f s (%.2f GB/s) -> %s %s%s",
                path, len(found) - len(skip), read_bytes / 1e9, wf.fmt, seconds,
                read_bytes / 1e9 / max(seconds, 1e-9), dev, str(target).removeprefix("torch."),
                f"; {in_place / 1e9:.2f} GB used in place (memory-mapped, read from disk on first use)"
                if in_place >= 1e7 else "")
    return model


# ---- writing checkpoints ---------------------------------------------------------------------------
def _config_dict_for(cfg: dict, dtype: torch.dtype | None) -> dict:
    cfg = dict(cfg)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def save_checkpoint(model: TransnormerForCausalLM, directory: str, dtype: torch.dtype | None = None) -> str:
    """Write config.json + model.safetensors under the official names (tied: no lm_head.weight).

    dtype: convert the weights (theta stays float32); None keeps each tensor's dtype.
    Returns the directory. Holds one CPU copy of the weights while writing."""
    os.makedirs(directory, exist_ok=True)
    sd = {}
    for name, t in model.state_dict().items():      # the official names: l12 split into l1 and l2
        want = torch.float32 if name.endswith("lrpe.theta") else (dtype or t.dtype)
        sd[name] = t.to("cpu", want).contiguous()
    save_file(sd, os.path.join(directory, SAFE_SINGLE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(_config_dict_for(model.config.to_dict(), dtype), f, indent=2)
    return directory


_RANDOM_CHUNK = 1 << 24  # elements per generator: fixed, so the values do not depend on the thread count


def _random_normal(shape: tuple[int, ...], dtype: torch.dtype, std: float, seed: int, ordinal: int,
                   pool: ThreadPoolExecutor) -> torch.Tensor:
    """normal(0, std) filled in parallel (one CPU generator runs on one core: 7B values would take
    minutes), each 16M-element chunk from its own generator seeded by (seed, tensor, chunk)."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)

    def fill(c: int) -> None:
        gen = torch.Generator().manual_seed(((seed << 40) ^ (ordinal << 20) ^ c) & (2**64 - 1))
        flat[c * _RANDOM_CHUNK:(c + 1) * _RANDOM_CHUNK].normal_(0.0, std, generator=gen)

    list(pool.map(fill, range(-(-flat.numel() // _RANDOM_CHUNK))))
    return out


def make_random_checkpoint(directory: str, cfg_dict: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           max_shard_bytes: int = 2 * 10**9) -> str:
    """Write a random-weight checkpoint of any size: config.json, model-0000k-of-0000n.safetensors
    shards of at most ~max_shard_bytes, and model.safetensors.index.json.

    Weights are normal(0, init_std) (config's init_std, default 0.02), biases zero, LRPE theta
    its default. Tensors are generated shard by shard, so peak memory is about one shard (2 GB),
    not the model (14 GB for the 7B in bf16). Returns the directory."""
    cfg = ModelConfig.from_dict(cfg_dict)
    std = float(cfg_dict.get("init_std", 0.02))
    names = expected_tensors(cfg)  # model order: embedding, layer by layer, head
    item = torch.empty((), dtype=dtype).element_size()

    def nbytes(name: str) -> int:
        return math.prod(names[name]) * (4 if name.endswith("lrpe.theta") else item)

    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes(name) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)

    os.makedirs(directory, exist_ok=True)
    n = len(shards)
    weight_map = {}
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        ordinal = 0
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            part = {}
            for name in shard:
                shape = names[name]
                if name.endswith("lrpe.theta"):
                    part[name] = Lrpe(shape[0], shape[2]).theta.detach().float()
                elif name.endswith(".bias"):
                    part[name] = torch.zeros(shape, dtype=dtype)
                else:
                    part[name] = _random_normal(shape, dtype, std, seed, ordinal, pool)
                ordinal += 1
                weight_map[name] = fname
            save_file(part, os.path.join(directory, fname), metadata={"format": "pt"})
            del part
            logger.debug("wrote %s (%d tensors)", fname, len(shard))
    total = sum(nbytes(name) for name in names)
    with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(_config_dict_for(cfg_dict, dtype), f, indent=2)
    logger.info("wrote a random checkpoint to %s: %d shards, %.2f GB", directory, n, total / 1e9)
    return directory


# ---- random weights straight on the device (benchmarks) ---------------------------------------
RANDOM_7B = {  # the official 7B shapes (config.json keys)
    "model_type": "transnormer", "vocab_size": 64000, "decoder_embed_dim": 4096, "hidden_dim": 4096,
    "decoder_layers": 30, "decoder_attention_heads": 32, "glu_dim": 11008,
    "linear_use_lrpe_list": [1] + [0] * 29, "no_scale_embedding": False, "bias": False,
    "norm_type": "simplermsnorm", "linear_act_fun": "silu", "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def random_model(cfg_dict: dict, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 kernel_config: KernelConfig | None = None, quantization: str = "none"):
    """A random model built straight on the device (no files): for speed, which does not depend
    on the weights. Matrices normal(0, 0.02) in `dtype`; LRPE theta and the decay buffers keep
    their float32 values. kernel_config, quantization: as for load_model."""
    check_device(quantization, device)
    cfg = ModelConfig.from_dict(cfg_dict)
    torch.manual_seed(seed)
    backend = Backend(kernel_config, device)
    with torch.device(device):
        m = TransnormerForCausalLM(cfg, backend=backend)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("lrpe.theta"):
                p.data = torch.empty_like(p, dtype=dtype).normal_(0, 0.02)
    return quantize_model(m.eval().requires_grad_(False), quantization)
