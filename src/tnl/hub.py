"""Model ids -> local checkpoint directories: a local path, a cached copy, or a download.

Sources: ModelScope (the default, the tutorial's source; `pip install modelscope`) and Hugging
Face (`huggingface_hub`, always installed). Both host the same OpenNLPLab checkpoints.

Cache directory, first that is set: the `cache_dir` argument (`--cache-dir`), the environment
variable `TNL_CACHE_DIR`, then the library's own default (ModelScope: `$MODELSCOPE_CACHE` or
~/.cache/modelscope, ~/.cache/modelscope/hub before modelscope 1.38; Hugging Face: `$HF_HUB_CACHE`
or ~/.cache/huggingface/hub). Both sources can share one directory: their layouts do not collide
(`<org>/<name>` or `models/<org>--<name>` against `models--org--name`).

Network access happens only in `download` (and in `resolve_model` when the id is not cached and
download=True); the calls are thin wrappers over `modelscope.snapshot_download` and
`huggingface_hub.snapshot_download`. A ModelScope download first checks in one short request that
the endpoint modelscope would use answers at all: offline, modelscope's own retries take ~25 s
before they give up. Imports no torch: `tnl download` stays light.
"""
from __future__ import annotations

import glob
import inspect
import logging
import os
import re
import threading

logger = logging.getLogger(__name__)

SOURCES = {"modelscope": "modelscope", "ms": "modelscope", "huggingface": "huggingface", "hf": "huggingface"}
DEFAULT_SOURCE = "modelscope"
CACHE_ENV = "TNL_CACHE_DIR"
_DISPLAY = {"modelscope": "ModelScope", "huggingface": "Hugging Face"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What a serving engine needs from a model repository: config, tokenizer, weights. Not the
# remote code (*.py), not training artefacts.
_HF_FILES = ["*.json", "*.model", "*.tiktoken", "*.txt"]
# Seconds the ModelScope reachability check may take in all (name lookup, connect, an HTTP answer).
# Offline, a lookup or connect fails at once; this bounds the case where packets are dropped.
_PROBE_TIMEOUT_S = 3.0


class HubError(RuntimeError):
    """A model reference that cannot be turned into a local directory; the message says what to do."""


class ModelNotFoundError(HubError):
    """The model is not local, not cached, and could not be downloaded (hub unreachable or no such id)."""


def normalize_source(source: str) -> str:
    """"modelscope" | "ms" -> "modelscope"; "huggingface" | "hf" -> "huggingface"."""
    key = source.lower().strip() if isinstance(source, str) else source
    if key not in SOURCES:
        raise HubError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    return SOURCES[key]


def default_cache_dir(cache_dir: str | None = None) -> str | None:
    """cache_dir, else $TNL_CACHE_DIR, else None (the source library's default)."""
    value = cache_dir or os.environ.get(CACHE_ENV) or None
    return os.path.abspath(os.path.expanduser(value)) if value else None


def is_model_id(model: str) -> bool:
    """'org/name' as both hubs spell ids (no '..', one slash)."""
    return bool(_ID_RE.match(model)) and ".." not in model


def _has_checkpoint(directory: str) -> bool:
    """config.json and at least one weight file: enough to call a cached copy usable
    (tnl.model.weights reports a partial one precisely when it is loaded)."""
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return False
    return any(glob.glob(os.path.join(directory, pat)) for pat in ("*.safetensors", "*.bin"))


def _advice(model_id: str, source: str) -> str:
    return (f"Pass a local checkpoint directory instead (--model /path/to/dir: a folder with config.json, "
            f"the tokenizer and the weights), or pre-download it where the network is reachable with "
            f"`tnl download {model_id} --source {source}` (then --model the printed path, or copy that folder).")


def _cache_root(source: str, cache: str | None) -> str:
    """The directory the source library reads and writes for `cache` (None: its own default)."""
    if source == "modelscope":
        return _modelscope_cache_root(cache)
    if cache:
        return cache
    from huggingface_hub import constants  # read here: snapshot_download reads it at call time too

    return constants.HF_HUB_CACHE


def _unreachable(model_id: str, source: str, cache: str | None, err: BaseException) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{_DISPLAY[source]} could not be reached to download {model_id!r} "
        f"({type(err).__name__}: {_first_line(err)}), and it is not in {_cache_root(source, cache)}. "
        + _advice(model_id, source))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _is_connection_error(err: BaseException) -> bool:
    """Connection refused, DNS failure, timeout, offline mode, across httpx / requests / urllib3."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    for cls in type(err).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("httpx", "httpx2", "requests", "urllib3") and cls.__name__ in (
                "TransportError", "ConnectionError", "Timeout", "TimeoutException", "NewConnectionError",
                "MaxRetryError", "ProxyError", "SSLError"):
            return True
    return False


# ---- ModelScope ------------------------------------------------------------------------------------
def _modelscope():
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise HubError('ModelScope support is not installed: pip install modelscope (from a tnl checkout: '
                       'pip install -e ".[modelscope]"), or use --source huggingface (the same checkpoints '
                       "are on Hugging Face)") from None
    return snapshot_download


def _modelscope_cache_root(cache: str | None) -> str:
    if cache:
        return cache
    try:  # modelscope >= 1.38 downloads through modelscope_hub: $MODELSCOPE_CACHE, else ~/.cache/modelscope
        from modelscope_hub.config import get_default_config

        return str(get_default_config().cache_dir)
    except ImportError:  # older modelscope, or none installed (a cache copied from another machine)
        default = os.path.join(os.path.expanduser("~"), ".cache", "modelscope", "hub")
        return os.environ.get("MODELSCOPE_CACHE") or default


def _modelscope_unreachable() -> BaseException | None:
    """None when the endpoint the installed modelscope downloads from gives any HTTP answer within
    _PROBE_TIMEOUT_S; else the error (a connection error, or TimeoutError when nothing came back)."""
    import requests  # a dependency of modelscope; it also honours HTTPS_PROXY / NO_PROXY as modelscope does
    from modelscope.hub.api import HubApi

    endpoint = HubApi().endpoint  # MODELSCOPE_ENDPOINT / MODELSCOPE_DOMAIN, else modelscope's default
    result: list[BaseException | None] = []

    def head():
        try:
            requests.head(endpoint, timeout=_PROBE_TIMEOUT_S, allow_redirects=False)
            result.append(None)
        except Exception as e:
            result.append(e)

    # A thread, because the name lookup has no timeout of its own (a resolver that never answers).
    probe = threading.Thread(target=head, name="tnl-modelscope-probe", daemon=True)
    probe.start()
    probe.join(_PROBE_TIMEOUT_S)
    if not result:
        return TimeoutError(f"no answer from {endpoint} within {_PROBE_TIMEOUT_S:g} s")
    err = result[0]
    if err is not None and not _is_connection_error(err):
        # not a network failure (a malformed endpoint, say): modelscope reports it in its own words
        logger.debug("modelscope endpoint check of %s: %s", endpoint, err)
        return None
    return err


def _modelscope_cached(model_id: str, cache: str | None, revision: str | None) -> str | None:
    try:
        snapshot_download = _modelscope()
    except HubError:
        snapshot_download = None
    if snapshot_download is not None and "local_files_only" in inspect.signature(snapshot_download).parameters:
        try:
            path = snapshot_download(model_id, cache_dir=cache, revision=revision or "master", local_files_only=True)
        except Exception as e:  # modelscope raises ValueError (older) or its own errors when not cached
            logger.debug("modelscope cache lookup for %s: %s", model_id, e)
            path = None
        if path and _has_checkpoint(path):
            return path
    # The cache layout, readable without modelscope (a cache copied from another machine):
    # <root>/<org>/<name>; newer modelscope puts defaults under <root>/models and spells '.' as '___'.
    org, name = model_id.split("/")
    root = _modelscope_cache_root(cache)
    for base in (root, os.path.join(root, "models")):
        for n in dict.fromkeys((name, name.replace(".", "___"))):
            path = os.path.join(base, org, n)
            if _has_checkpoint(path):
                return path
    return None


def _modelscope_download(model_id: str, cache: str | None, revision: str | None) -> str:
    snapshot_download = _modelscope()
    err = _modelscope_unreachable()
    if err is not None:
        raise _unreachable(model_id, "modelscope", cache, err) from err
    try:
        return snapshot_download(model_id, cache_dir=cache, revision=revision or "master")
    except Exception as e:
        if _is_connection_error(e):
            raise _unreachable(model_id, "modelscope", cache, e) from e
        if type(e).__name__ in ("NotExistError", "InvalidParameter") or "not exist" in str(e).lower():
            raise ModelNotFoundError(f"ModelScope has no model {model_id!r} (revision {revision or 'master'}): "
                                     f"{_first_line(e)}. Check the id, or try --source huggingface.") from e
        if isinstance(e, OSError):
            raise HubError(f"downloading {model_id!r} from ModelScope into {_cache_root('modelscope', cache)} "
                           f"failed: {type(e).__name__}: {e}") from e
        raise


# ---- Hugging Face ----------------------------------------------------------------------------------
def _hf_cached(model_id: str, cache: str | None, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        # Only the files a download by tnl would have fetched count towards "complete".
        path = snapshot_download(model_id, revision=revision, cache_dir=cache, local_files_only=True,
                                 allow_patterns=_HF_FILES + ["*.safetensors"])
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError (incl. an incomplete snapshot) is an OSError
        logger.debug("huggingface cache lookup for %s: %s", model_id, e)
        return None
    return path if _has_checkpoint(path) else None


def _hf_download(model_id: str, cache: str | None, revision: str | None) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        # model_info: one request, no retry loop (list_repo_files backs off for ~20 s when offline)
        info = HfApi().model_info(model_id, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        # Repositories often carry both formats: fetch .bin only when there is no safetensors.
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return snapshot_download(model_id, revision=revision, cache_dir=cache, allow_patterns=_HF_FILES + weights)
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"Hugging Face model {model_id!r} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:  # also gated / private repositories without a token
        raise ModelNotFoundError(f"Hugging Face has no model {model_id!r} (or it is private or gated: log in "
                                 "with `hf auth login`). Check the id, or try --source modelscope.") from e
    except Exception as e:
        if isinstance(e, LocalEntryNotFoundError) or _is_connection_error(e):
            raise _unreachable(model_id, "huggingface", cache, e) from e
        if isinstance(e, OSError):  # HTTP errors from the hub (5xx), a cache dir that cannot be written
            raise HubError(f"downloading {model_id!r} from Hugging Face into {_cache_root('huggingface', cache)} "
                           f"failed: {type(e).__name__}: {_first_line(e)}") from e
        raise


# ---- public ----------------------------------------------------------------------------------------
def download(model_id: str, source: str = DEFAULT_SOURCE, cache_dir: str | None = None,
             revision: str | None = None) -> str:
    """Download (or complete / refresh) `model_id` from `source` into the cache; return its directory.

    Raises ModelNotFoundError when the hub cannot be reached or has no such model, HubError for
    an id that is not 'org/name' or a missing modelscope package."""
    source = normalize_source(source)
    if not is_model_id(model_id):
        raise HubError(f"{model_id!r} is not a model id of the form org/name (e.g. OpenNLPLab/TransNormerLLM-7B)")
    return _download(model_id, source, default_cache_dir(cache_dir), revision)


def _download(model_id: str, source: str, cache: str | None, revision: str | None) -> str:
    logger.info("downloading %s from %s into %s", model_id, _DISPLAY[source], _cache_root(source, cache))
    if source == "modelscope":
        return _modelscope_download(model_id, cache, revision)
    return _hf_download(model_id, cache, revision)


def resolve_model(model: str, source: str = DEFAULT_SOURCE, cache_dir: str | None = None,
                  revision: str | None = None, download: bool = True) -> str:
    """A local checkpoint directory for `model`.

    Args:
        model: a local directory (used as is; must hold config.json) or a hub id "org/name".
        source: "modelscope" ("ms", the default) or "huggingface" ("hf").
        cache_dir: where hub downloads live (default: $TNL_CACHE_DIR, else the library's default).
        revision: branch, tag or commit (default: ModelScope "master", Hugging Face "main").
        download: fetch an id that is not in the cache (False: cache only, never the network).
    Returns:
        the directory path.
    Raises:
        HubError: a directory without config.json, something neither a directory nor org/name,
            a missing modelscope package.
        ModelNotFoundError: an id neither cached nor downloadable (the message says how to pass a
            local path or pre-download).
    """
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise HubError(f"{os.path.abspath(path)} is a directory but has no config.json; expected a "
                           "checkpoint folder with config.json, the tokenizer and the weights")
        return os.path.abspath(path)
    if os.path.exists(path):
        raise HubError(f"{os.path.abspath(path)} is a file; expected a checkpoint directory (with config.json) "
                       "or a model id org/name")
    if not is_model_id(model):
        raise HubError(f"{model!r} is neither an existing directory nor a model id of the form org/name "
                       "(e.g. OpenNLPLab/TransNormerLLM-7B)")
    source = normalize_source(source)
    cache = default_cache_dir(cache_dir)
    lookup = _modelscope_cached if source == "modelscope" else _hf_cached
    cached = lookup(model, cache, revision)
    if cached:
        logger.info("using cached %s at %s", model, cached)
        return cached
    if not download:
        raise ModelNotFoundError(f"{model!r} is not in the {_DISPLAY[source]} cache ({_cache_root(source, cache)}) "
                                 "and downloading is off. " + _advice(model, source))
    return _download(model, source, cache, revision)
