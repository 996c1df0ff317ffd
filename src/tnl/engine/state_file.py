"""State files: one sequence's recurrent state after a run of token ids, as a safetensors file,
and the directory of them that --prefix-cache-dir keeps across restarts.

A linear-attention model's whole past is one fixed-size state per layer, so the state after a
conversation is a complete, portable checkpoint of it: save it, move it to another server (or
restart this one), load it, and the next prompt that starts with those tokens continues from it
at once instead of computing them again.

The file (safetensors: a length-prefixed JSON header, then raw little-endian tensors; never
pickle):
    tensors   state.0 .. state.{L-1}  [H, dk, dv] in the engine's state dtype (float32, bfloat16 or
                                      float16: --state-dtype), the per-layer state (ModelConfig.state_shapes)
              logits                  float32 [V], the next-token logits after the last id (optional)
    metadata  format "tnl-state", format_version "1", fingerprint (model_fingerprint), dtype
              (the state tensors' dtype name), num_layers, state_shapes (JSON), num_tokens, token_ids (JSON),
              data_sha256 (over the tensors' bytes in the order above), model_config (JSON,
              for messages only)

Files are untrusted input: `loads` bounds the size before parsing and the header before reading
it, checks every name, dtype, shape and offset against the model (never a length the file gives),
checks the digest, and refuses NaN or inf, each with a typed error (StateFileError's subclasses).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import safetensors.torch

from tnl.config import STATE_DTYPES, ModelConfig
from tnl.engine.prefix_cache import CacheEntry

log = logging.getLogger(__name__)

FORMAT = "tnl-state"
FORMAT_VERSION = 1
# The header is JSON: tensor entries plus metadata, where the token ids dominate (at most 7
# bytes per id below 10^5 with the separator): 8 MiB holds a conversation of over a million tokens.
MAX_HEADER_BYTES = 8 << 20
FINGERPRINT_SAMPLES = 1024   # weight values hashed per parameter
SUFFIX = ".safetensors"
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}   # state dtype -> header name


# ---- errors --------------------------------------------------------------------------------
class StateFileError(ValueError):
    """A state file this engine will not load; the message says what was wrong and what is
    expected. The server answers 400 unless a subclass says otherwise."""


class CorruptStateFile(StateFileError):
    """Not a safetensors file, not a tnl state file, truncated, or bytes changed since it was written."""


class UnsupportedStateVersion(StateFileError):
    """A tnl state file of a format version this tnl does not read."""


class WrongModelState(StateFileError):
    """A state computed by another model (its fingerprint differs): HTTP 409."""


class NonFiniteState(StateFileError):
    """NaN or inf in a tensor."""


class StateFileTooLarge(StateFileError):
    """Larger than any state file of this model can be: HTTP 413 (checked before parsing)."""


class StateCacheError(RuntimeError):
    """The prompt-state cache cannot give or take a state: it is off (`off`), or full of pinned
    states / too small for one (`off` False)."""

    def __init__(self, message: str, off: bool = False):
        super().__init__(message)
        self.off = off


# ---- the model's fingerprint ---------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config (config.json's form, less torch_dtype) and a digest of the
    weights: for every parameter in name order, its name and shape and FINGERPRINT_SAMPLES values
    at evenly spaced flat positions (integer arithmetic, so every device picks the same ones),
    rounded to bfloat16. One gather per parameter and one copy to the host: milliseconds at 7B.

    The bfloat16 rounding makes the fingerprint the checkpoint's, not the serving dtype's: a
    bfloat16 checkpoint served in bfloat16 on a GPU and in float32 on a CPU has one fingerprint
    (their states are the same computation, up to rounding), while another checkpoint, a
    fine-tune included, differs in nearly every sampled value. 8-bit weights (--quantization)
    are another model: their states differ by more than rounding, so the config then carries the
    quantization and the 8-bit matrices and their scales are sampled (the float ones are gone)."""
    cfg = model.config.to_dict()
    cfg.pop("torch_dtype", None)
    quantization = getattr(model, "quantization", "none")
    if quantization != "none":
        cfg["quantization"] = quantization
    h = hashlib.sha256(b"tnl-model-fingerprint/1\0")
    h.update(json.dumps(cfg, sort_keys=True).encode())
    samples = []
    weights = dict(model.named_parameters())
    weights.update((n, b) for n, b in model.named_buffers() if n.endswith((".qweight", ".scale")))
    for name, p in sorted(weights.items(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        n, k = flat.numel(), min(flat.numel(), FINGERPRINT_SAMPLES)
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
        samples.append(flat[idx.to(flat.device)].to(torch.bfloat16))
        h.update(f"{name}:{tuple(p.shape)}\0".encode())
    if samples:
        h.update(torch.cat(samples).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


# ---- writing ---------------------------------------------------------------------------------
def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:   # raw bytes (numpy has no bfloat16)
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def dumps(entry: CacheEntry, fingerprint: str, model_config: ModelConfig | None = None) -> bytes:
    """The state file of `entry` (ids, state: per-layer [H, dk, dv], logits [V] or None; on any
    device, in the engine's state dtype, which the file keeps). model_config only adds a
    description of the model to the metadata (for messages)."""
    state = [t.detach().to("cpu").contiguous() for t in entry.state]
    dtype = str(state[0].dtype).removeprefix("torch.") if state else "float32"
    if dtype not in SAFETENSORS_DTYPE or any(t.dtype != state[0].dtype for t in state):
        raise ValueError(f"a state file holds one state dtype of {', '.join(SAFETENSORS_DTYPE)}; got "
                         f"{sorted({str(t.dtype) for t in state})}")
    tensors = {f"state.{i}": t for i, t in enumerate(state)}
    ordered = list(state)
    if entry.logits is not None:
        tensors["logits"] = entry.logits.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        ordered.append(tensors["logits"])
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "fingerprint": fingerprint,
        "dtype": dtype,
        "num_layers": str(len(state)),
        "state_shapes": json.dumps([list(t.shape) for t in state]),
        "num_tokens": str(len(entry.ids)),
        "token_ids": json.dumps(list(entry.ids), separators=(",", ":")),
        "data_sha256": _digest(ordered),
    }
    if model_config is not None:
        cfg = model_config.to_dict()
        meta["model_config"] = json.dumps({k: cfg[k] for k in ("vocab_size", "decoder_embed_dim", "decoder_layers",
                                                               "decoder_attention_heads", "hidden_dim")})
    return safetensors.torch.save(tensors, metadata=meta)


# ---- reading ---------------------------------------------------------------------------------
def max_file_bytes(model_config: ModelConfig) -> int:
    """The largest state file of this model: header at its cap, the state (in float32, the widest
    state dtype) and the logits."""
    return 8 + MAX_HEADER_BYTES + model_config.state_bytes() + 4 * model_config.vocab_size


@dataclass
class StateHeader:
    """A state file's header, checked against the model."""

    ids: tuple[int, ...]
    has_logits: bool
    dtype: str                                  # the state tensors' dtype (a STATE_DTYPES name)
    data_start: int                             # 8 + header length
    offsets: dict[str, tuple[int, int]]         # tensor name -> [start, end) in the data section
    digest: str


def _header_length(first8: bytes, file_size: int) -> int:
    if file_size < 8:
        raise CorruptStateFile(f"{file_size} bytes is too short for a safetensors file (an 8-byte header length, "
                               f"then a JSON header, then the tensors)")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER_BYTES:
        raise CorruptStateFile(f"not a state file: its first 8 bytes give a header of {n} bytes, more than a "
                               f"state file's {MAX_HEADER_BYTES} (is it a safetensors file?)")
    if 8 + n > file_size:
        raise CorruptStateFile(f"truncated: the header alone needs {8 + n} bytes, the file has {file_size}")
    return n


def _meta_int(meta: dict, key: str) -> int:
    value = meta.get(key)
    if not isinstance(value, str) or not value.isdigit() or len(value) > 12:
        raise CorruptStateFile(f"metadata '{key}' must be a decimal number, got {value!r}")
    return int(value)


def _meta_json(meta: dict, key: str):
    value = meta.get(key)
    if not isinstance(value, str):
        raise CorruptStateFile(f"metadata '{key}' is missing")
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise CorruptStateFile(f"metadata '{key}' is not valid JSON ({e})") from None


def _model_description(meta: dict) -> str:
    try:
        cfg = json.loads(meta.get("model_config", ""))
        return (f" (a model of {cfg['decoder_layers']} layers, width {cfg['decoder_embed_dim']}, "
                f"{cfg['decoder_attention_heads']} heads, vocabulary {cfg['vocab_size']})")
    except (ValueError, TypeError, KeyError, RecursionError):
        return ""


def parse_header(header: bytes, file_size: int, expected_fingerprint: str, model_config: ModelConfig) -> StateHeader:
    """Check a state file's JSON header (the bytes after the 8-byte length) against this model:
    format, version, fingerprint, dtype, every tensor's name, shape and offsets, the token ids,
    and that `file_size` is exactly what the header describes."""
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError) as e:   # (UnicodeDecodeError is a ValueError)
        raise CorruptStateFile(f"not a state file: its header is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptStateFile(f"not a state file: its header is a JSON {type(doc).__name__}, not an object")
    meta = doc.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptStateFile(f"not a tnl state file: a safetensors file whose metadata lacks format '{FORMAT}'")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise UnsupportedStateVersion(f"state file format version {version!r}; this tnl reads version "
                                      f"{FORMAT_VERSION} only")
    fingerprint = meta.get("fingerprint")
    if fingerprint != expected_fingerprint:
        raise WrongModelState(f"the state was computed by another model{_model_description(meta)}: its fingerprint "
                              f"is {str(fingerprint)[:16]}..., this server's model has {expected_fingerprint[:16]}...; "
                              f"a state continues only on the model (config and weights, 8-bit ones under --quantization "
                              f"included) that computed it")
    dtype = meta.get("dtype")
    if dtype not in SAFETENSORS_DTYPE:
        raise CorruptStateFile(f"metadata 'dtype' is {dtype!r}; states are {', '.join(SAFETENSORS_DTYPE)}")
    shapes = model_config.state_shapes()
    if _meta_int(meta, "num_layers") != len(shapes) or _meta_json(meta, "state_shapes") != [list(s) for s in shapes]:
        raise CorruptStateFile(f"metadata 'state_shapes' {meta.get('state_shapes')!r} does not match this model's "
                               f"{[list(s) for s in shapes]}")
    ids = _meta_json(meta, "token_ids")
    V = model_config.vocab_size
    if not isinstance(ids, list) or not ids:
        raise CorruptStateFile("metadata 'token_ids' must be a non-empty JSON list of token ids")
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V:
            raise CorruptStateFile(f"metadata 'token_ids': {t!r} at position {i} is not a token id in [0, {V})")
    if _meta_int(meta, "num_tokens") != len(ids):
        raise CorruptStateFile(f"metadata 'num_tokens' is {meta['num_tokens']}, but 'token_ids' has {len(ids)}")
    digest = meta.get("data_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CorruptStateFile("metadata 'data_sha256' is missing")
    expected = {f"state.{i}": list(s) for i, s in enumerate(shapes)}
    if "logits" in doc:
        expected["logits"] = [V]
    if set(doc) != set(expected):
        missing, extra = sorted(set(expected) - set(doc)), sorted(set(doc) - set(expected))
        raise CorruptStateFile(f"the file's tensors do not match this model's state: missing {missing}, "
                               f"unexpected {extra}")
    offsets = {}
    tensor_dtype = {name: "F32" if name == "logits" else SAFETENSORS_DTYPE[dtype] for name in expected}
    for name, shape in expected.items():
        info = doc[name]
        if not isinstance(info, dict) or info.get("dtype") != tensor_dtype[name]:
            got = info.get("dtype") if isinstance(info, dict) else info
            raise CorruptStateFile(f"tensor '{name}' has dtype {got!r}; expected {tensor_dtype[name]} "
                                   f"(metadata 'dtype' is {dtype}; logits are float32)")
        if info.get("shape") != shape:
            raise CorruptStateFile(f"tensor '{name}' has shape {info.get('shape')!r}; this model's is {shape}")
        span = info.get("data_offsets")
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            raise CorruptStateFile(f"tensor '{name}' has data_offsets {span!r}; expected [start, end]")
        offsets[name] = tuple(span)
    # the tensors must tile the data section exactly: no gaps, no overlaps, the sizes their shapes give
    pos = 0
    for name, (a, b) in sorted(offsets.items(), key=lambda kv: kv[1]):
        size = 4 if tensor_dtype[name] == "F32" else 2
        for dim in expected[name]:
            size *= dim
        if a != pos or b - a != size:
            raise CorruptStateFile(f"tensor '{name}' has data_offsets [{a}, {b}]; expected [{pos}, {pos + size}]")
        pos = b
    data_start = 8 + len(header)
    if file_size < data_start + pos:
        raise CorruptStateFile(f"truncated: the file has {file_size} bytes, its header describes "
                               f"{data_start + pos}")
    if file_size > data_start + pos:
        raise CorruptStateFile(f"{file_size - data_start - pos} unexpected bytes after the tensors")
    return StateHeader(tuple(ids), "logits" in offsets, dtype, data_start, offsets, digest)


def loads(data: bytes, expected_fingerprint: str, model_config: ModelConfig
          ) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
    """Parse and check a state file (untrusted input).

    Returns:
        (token ids, the per-layer state [H, dk, dv] on the host in the file's state dtype (the
        engine converts it to its own), the logits [V] float32 or None).
    Raises:
        StateFileTooLarge (before parsing), CorruptStateFile, UnsupportedStateVersion,
        WrongModelState, NonFiniteState: each a StateFileError saying what was wrong.
    """
    cap = max_file_bytes(model_config)
    if len(data) > cap:
        raise StateFileTooLarge(f"{len(data)} bytes is larger than any state file of this model ({cap} bytes at most)")
    if not data:
        raise CorruptStateFile("the state file is empty")
    n = _header_length(bytes(data[:8]), len(data))
    head = parse_header(bytes(data[8:8 + n]), len(data), expected_fingerprint, model_config)
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as e:   # safetensors' own checks (the header passed ours, so this is unexpected)
        raise CorruptStateFile(f"not a readable safetensors file ({e})") from None
    state = [tensors[f"state.{i}"] for i in range(model_config.n_layers)]
    logits = tensors.get("logits")
    ordered = state + ([logits] if logits is not None else [])
    if _digest(ordered) != head.digest:
        raise CorruptStateFile("the tensors' bytes do not match the digest in the header (data_sha256): the file "
                               "was changed or damaged after it was written")
    for name, t in zip([f"state.{i}" for i in range(len(state))] + ["logits"], ordered):
        if not torch.isfinite(t).all():
            raise NonFiniteState(f"tensor '{name}' holds NaN or inf: such a state cannot be continued")
    return list(head.ids), state, logits


def read_header_file(path: str, expected_fingerprint: str, model_config: ModelConfig) -> StateHeader:
    """The checked header of the state file at `path`, reading only the header."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_file_bytes(model_config):
            raise StateFileTooLarge(f"{size} bytes is larger than any state file of this model")
        n = _header_length(f.read(8), size)
        return parse_header(f.read(n), size, expected_fingerprint, model_config)


# ---- --prefix-cache-dir ------------------------------------------------------------------------
@dataclass
class _OnDisk:
    size: int
    mtime: float
    has_logits: bool


class StateDirectory:
    """The prompt-state cache's snapshots as state files in a directory, so that a restarted
    server (or one started on a copy of the directory) has them again.

    Writes are off the engine thread: `put` (engine thread) queues host copies of a snapshot
    and returns; a writer thread serializes each, writes a temporary file in the directory,
    fsyncs it, renames it into place (a reader sees a whole file or none) and fsyncs the
    directory. The thread exits when it has been idle a second, so a process ends once its
    last states are on disk. At most MAX_PENDING snapshots wait (a burst beyond that is dropped:
    the cache in memory still holds them). Past `cap_bytes`, this model's oldest files are
    deleted; files of other models and other names in the directory are never touched.

    A file is named after the model's fingerprint and its token ids, so the snapshot of the same
    tokens is one file (rewritten only to add the logits it lacked).
    """

    MAX_PENDING = 8
    IDLE_EXIT_S = 1.0

    def __init__(self, path: str, cap_bytes: int, fingerprint: str, model_config: ModelConfig):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self.cap_bytes = cap_bytes
        self.fingerprint = fingerprint
        self.model_config = model_config
        self._files: dict[str, _OnDisk] = {}     # this model's files: name -> size, age, logits
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self.written = self.dropped = self.failed = self.removed = 0

    def file_name(self, ids) -> str:
        digest = hashlib.sha256(json.dumps(list(ids), separators=(",", ":")).encode()).hexdigest()
        return f"{self.fingerprint[:16]}-{digest[:32]}{SUFFIX}"

    # ---- start-up: the index ---------------------------------------------------------------
    def scan(self) -> list[tuple[str, StateHeader]]:
        """(path, header) of every valid state file of this model in the directory, newest
        first. A file that fails the header checks (truncated, another model's, another format
        version, not a state file) is skipped with a warning and left as it is."""
        found = []
        for name in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, name)
            if not name.endswith(SUFFIX) or not os.path.isfile(path):
                continue
            try:
                head = read_header_file(path, self.fingerprint, self.model_config)
                st = os.stat(path)
            except (StateFileError, OSError) as e:
                log.warning("--prefix-cache-dir: skipping %s: %s", path, e)
                continue
            self._files[name] = _OnDisk(st.st_size, st.st_mtime, head.has_logits)
            found.append((st.st_mtime, path, head))
        found.sort(key=lambda x: x[0], reverse=True)
        return [(path, head) for _, path, head in found]

    def read(self, path: str) -> tuple[list[int], list[torch.Tensor], torch.Tensor | None]:
        """A whole state file, checked as `loads` checks an imported one."""
        with open(path, "rb") as f:
            data = f.read(max_file_bytes(self.model_config) + 1)
        return loads(data, self.fingerprint, self.model_config)

    # ---- writing ---------------------------------------------------------------------------
    def _refusal(self, name: str, has_logits: bool) -> str | None:
        have = self._files.get(name)
        if have is not None and (have.has_logits or not has_logits):
            return "on disk"
        if len(self._pending) >= self.MAX_PENDING:
            return "full"
        return None

    def wants(self, ids, has_logits: bool) -> bool:
        """Whether `put` would queue this snapshot: not on disk yet (or there without the
        logits it has) and the writer keeping up (else it counts as dropped: the cache in
        memory still has it). Lets the engine skip copies that nobody would write."""
        with self._cond:
            why = self._refusal(self.file_name(ids), has_logits)
            if why == "full":
                self.dropped += 1
                log.debug("--prefix-cache-dir: writer behind, a snapshot of %d tokens not written", len(ids))
            return why is None

    def put(self, ids, state: list[torch.Tensor], logits: torch.Tensor | None, ready=None) -> bool:
        """Queue a snapshot for writing (engine thread; returns at once). state / logits: host
        tensors nobody writes to again; `ready`: a CUDA event to wait for before reading them
        (copies from the device still under way), or None. False: already on disk, or the
        writer is MAX_PENDING snapshots behind."""
        name = self.file_name(ids)
        with self._cond:
            if self._refusal(name, logits is not None) is not None:
                return False
            self._pending.append((name, tuple(ids), state, logits, ready))
            if self._thread is None:
                # not a daemon: the process waits for the last writes (the thread ends when idle)
                self._thread = threading.Thread(target=self._run, name="tnl-state-writer")
                self._thread.start()
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued snapshot is written; False if `timeout` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(self.IDLE_EXIT_S)
                if not self._pending:
                    self._thread = None
                    self._cond.notify_all()
                    return
                item = self._pending.popleft()
                self._busy = True
            try:
                self._write(*item)
            except Exception as e:   # a full disk, a removed directory: the server goes on without the file
                self.failed += 1
                log.warning("--prefix-cache-dir: could not write a state file in %s: %s", self.path, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, name: str, ids: tuple[int, ...], state, logits, ready) -> None:
        if ready is not None:
            ready.synchronize()
        with self._cond:
            if self._refusal(name, logits is not None) == "on disk":   # (a copy queued twice)
                return
        data = dumps(CacheEntry(ids, state, logits, 0), self.fingerprint, self.model_config)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.path, name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)   # the rename itself survives a crash
        finally:
            os.close(dir_fd)
        with self._cond:
            self._files[name] = _OnDisk(len(data), time.time(), logits is not None)
            self.written += 1
            victims = []
            total = sum(f.size for f in self._files.values())
            for old in sorted(self._files, key=lambda k: self._files[k].mtime):
                if total <= self.cap_bytes:
                    break
                total -= self._files.pop(old).size
                victims.append(old)
        for old in victims:
            try:
                os.unlink(os.path.join(self.path, old))
                self.removed += 1
            except OSError as e:
                log.warning("--prefix-cache-dir: could not remove %s: %s", old, e)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"prefix_cache_dir_files": len(self._files),
                    "prefix_cache_dir_bytes": sum(f.size for f in self._files.values()),
                    "prefix_cache_dir_written": self.written, "prefix_cache_dir_dropped": self.dropped}
