"""Model references -> directories: local paths, real hub cache layouts, and offline failures.

Nothing here may reach the internet: every test runs with Hugging Face offline mode on and with
sockets limited to loopback (a connection or a name lookup anywhere else fails the test). Names
under .invalid, which no resolver may resolve (RFC 6761), get the resolver's answer without a query."""
from __future__ import annotations

import importlib.util
import os
import socket

import pytest

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from tnl import hub
from tnl.hub import HubError, ModelNotFoundError, download, resolve_model
from tnl.model.weights import load_model

MODEL_ID = "OpenNLPLab/TransNormerLLM-7B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HAS_MODELSCOPE = importlib.util.find_spec("modelscope") is not None


class NetworkUsed(AssertionError):
    pass


needs_modelscope = pytest.mark.skipif(not HAS_MODELSCOPE, reason="modelscope is not installed")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Offline Hugging Face, and any non-loopback connection or DNS lookup fails the test."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.delenv("TNL_CACHE_DIR", raising=False)
    loopback = ("127.0.0.1", "::1", "localhost")
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in loopback:
            raise NetworkUsed(f"test tried to connect to {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kw):
        if isinstance(host, str) and host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host not in loopback and host is not None:
            raise NetworkUsed(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused, as on a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint(directory) -> str:
    cfg = tiny_config()
    return write_checkpoint(str(directory), cfg, random_state_dict(cfg))


def hf_cache(root, repo_id: str = MODEL_ID) -> str:
    """The real Hugging Face cache layout: blobs, a snapshot of symlinks, refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    staging = checkpoint(root / "staging")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(staging))):
        blob = repo / "blobs" / f"{i:040x}"
        os.replace(os.path.join(staging, name), blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return str(snap)


# ---- local paths -------------------------------------------------------------------------------------
def test_local_directory_is_used_as_is(tmp_path, monkeypatch):
    path = checkpoint(tmp_path / "ckpt")
    assert resolve_model(path) == path
    monkeypatch.chdir(tmp_path)
    assert resolve_model("ckpt") == path  # relative paths win over the org/name reading
    assert resolve_model("./ckpt/", source="hf", download=False) == path


def test_local_directory_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(HubError, match="has no config.json") as e:
        resolve_model(str(tmp_path / "weights"))
    assert str(tmp_path / "weights") in str(e.value)


def test_a_file_is_not_a_model(tmp_path):
    path = os.path.join(checkpoint(tmp_path), "config.json")
    with pytest.raises(HubError, match="is a file; expected a checkpoint directory"):
        resolve_model(path)


@pytest.mark.parametrize("bad", ["TransNormerLLM-7B", "a/b/c", "../tnl-no-such-dir-3f9a", "/no/such/dir", "org/", "org/na me"])
def test_neither_path_nor_id(bad):
    with pytest.raises(HubError, match="neither an existing directory nor a model id of the form org/name"):
        resolve_model(bad)


def test_bad_source_and_bad_download_id():
    with pytest.raises(HubError, match="unknown source 'github'"):
        resolve_model(MODEL_ID, source="github")
    with pytest.raises(HubError, match="not a model id of the form org/name"):
        download("just-a-name", source="hf")


# ---- Hugging Face cache ------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["huggingface", "hf", "HF"])
def test_hf_id_resolved_from_the_cache(tmp_path, source):
    snap = hf_cache(tmp_path / "cache")
    got = resolve_model(MODEL_ID, source=source, cache_dir=str(tmp_path / "cache"))
    assert os.path.samefile(got, snap)
    assert_params_loadable(got)


def test_tnl_cache_dir_environment(tmp_path, monkeypatch):
    snap = hf_cache(tmp_path / "envcache")
    monkeypatch.setenv("TNL_CACHE_DIR", str(tmp_path / "envcache"))
    assert os.path.samefile(resolve_model(MODEL_ID, source="hf", download=False), snap)
    # an explicit cache_dir beats the environment
    with pytest.raises(ModelNotFoundError):
        resolve_model(MODEL_ID, source="hf", cache_dir=str(tmp_path / "empty"), download=False)


def test_hf_cached_snapshot_without_weights_is_not_used(tmp_path):
    snap = hf_cache(tmp_path / "cache")
    for name in os.listdir(snap):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(snap, name))
    with pytest.raises(ModelNotFoundError, match="could not be reached"):
        resolve_model(MODEL_ID, source="hf", cache_dir=str(tmp_path / "cache"))


def assert_params_loadable(path: str):
    m = load_model(path, "cpu", progress=False)
    assert m.model.embed_tokens.weight.shape == (400, 48)


# ---- offline ------------------------------------------------------------------------------------------
def assert_offline_advice(err: ModelNotFoundError, source: str, cache: str):
    """The message says the hub is unreachable, names the cache directory looked in, and gives the advice."""
    msg = str(err)
    assert "could not be reached" in msg and MODEL_ID in msg
    assert f"it is not in {cache}. " in msg
    assert "--model /path/to/dir" in msg and f"tnl download {MODEL_ID} --source {source}" in msg


def test_hf_uncached_id_offline_mode(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(MODEL_ID, source="hf", cache_dir=str(tmp_path))
    assert_offline_advice(e.value, "huggingface", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as e:
        download(MODEL_ID, source="huggingface", cache_dir=str(tmp_path))
    assert_offline_advice(e.value, "huggingface", str(tmp_path))


def test_hf_offline_error_names_the_default_cache(tmp_path, monkeypatch):
    """No cache_dir: the message names huggingface_hub's own cache directory, not "the default"."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # $HF_HUB_CACHE, read at import
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(MODEL_ID, source="hf")
    assert_offline_advice(e.value, "huggingface", str(tmp_path / "hf"))


def test_hf_uncached_id_connection_refused(tmp_path, monkeypatch):
    """Offline mode off, the hub endpoint a closed loopback port: the way a machine without network fails."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(MODEL_ID, source="hf", cache_dir=str(tmp_path))
    assert_offline_advice(e.value, "huggingface", str(tmp_path))


def test_download_false_never_downloads(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache.*downloading is off") as e:
        resolve_model(MODEL_ID, source="hf", cache_dir=str(tmp_path), download=False)
    assert f"({tmp_path})" in str(e.value) and "tnl download" in str(e.value)


# ---- ModelScope ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["TransNormerLLM-7B", "TransNormerLLM-7B.v2"])
def test_modelscope_cache_layout(tmp_path, name):
    """<cache>/<org>/<name> as modelscope.snapshot_download(cache_dir=...) lays it out; readable
    with or without modelscope installed. Newer modelscope spells '.' in names as '___'."""
    path = checkpoint(tmp_path / "OpenNLPLab" / name.replace(".", "___"))
    got = resolve_model(f"OpenNLPLab/{name}", source="ms", cache_dir=str(tmp_path), download=False)
    assert os.path.samefile(got, path)
    assert_params_loadable(got)


@pytest.mark.skipif(HAS_MODELSCOPE, reason="modelscope is installed: this checks the advice given without it")
def test_modelscope_not_installed_gives_install_advice(tmp_path):
    for call in (lambda: resolve_model(MODEL_ID, cache_dir=str(tmp_path)),
                 lambda: download(MODEL_ID, source="modelscope", cache_dir=str(tmp_path))):
        with pytest.raises(HubError) as e:
            call()
        msg = str(e.value)  # tnl is not on PyPI: the advice names what pip can install
        assert "pip install modelscope" in msg and 'pip install -e ".[modelscope]"' in msg
        assert 'pip install "tnl[modelscope]"' not in msg and "--source huggingface" in msg


def point_modelscope_at(monkeypatch, domain: str):
    """Make the installed modelscope download from `domain` (host[:port]; it adds https://)."""
    # modelscope >= 1.38 reads MODELSCOPE_ENDPOINT (MODELSCOPE_DOMAIN is its deprecated spelling);
    # older versions read only MODELSCOPE_DOMAIN.
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", domain)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", domain)
    try:  # >= 1.38 keeps one process-wide config, built from the environment on first use
        import modelscope_hub.config
    except ImportError:
        return
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)


@needs_modelscope
@pytest.mark.parametrize("hub", ["connection-refused", "unresolvable-name"])
def test_modelscope_uncached_id_without_network(tmp_path, monkeypatch, hub):
    """The two ways a machine without network fails: nothing listening, a name no resolver knows."""
    point_modelscope_at(monkeypatch, f"127.0.0.1:{closed_port()}" if hub == "connection-refused"
                        else "modelscope.tnl-test.invalid")
    cache = str(tmp_path / "cache")
    for call in (lambda: resolve_model(MODEL_ID, source="modelscope", cache_dir=cache),
                 lambda: download(MODEL_ID, source="ms", cache_dir=cache)):
        with pytest.raises(ModelNotFoundError) as e:
            call()
        assert_offline_advice(e.value, "modelscope", cache)


@needs_modelscope
def test_modelscope_offline_error_names_the_default_cache(tmp_path, monkeypatch):
    """No cache_dir: the message names the directory modelscope itself uses ($MODELSCOPE_CACHE here)."""
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    point_modelscope_at(monkeypatch, f"127.0.0.1:{closed_port()}")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(MODEL_ID)
    assert_offline_advice(e.value, "modelscope", str(tmp_path / "ms"))


def test_default_cache_dir(tmp_path, monkeypatch):
    assert hub.default_cache_dir() is None
    monkeypatch.setenv("TNL_CACHE_DIR", str(tmp_path / "c"))
    assert hub.default_cache_dir() == str(tmp_path / "c")
    assert hub.default_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x")
