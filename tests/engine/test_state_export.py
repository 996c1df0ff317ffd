"""State files (tnl.engine.state_file): a conversation's recurrent state saved, moved to another
engine or server of the same model, loaded, and continued with the same greedy tokens; every
bad file refused with its status, nothing cached, the server alive; --prefix-cache-dir across a
restart, with bad files on disk skipped with a warning. Real servers on loopback, real files."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import struct
import time

import pytest
import requests
import safetensors.torch
import torch

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from helpers_server import ServerProcess, make_tiny_model
from helpers_tokenizer import build_test_tokenizer
from tnl import LLM, SamplingParams
from tnl.config import EngineConfig, ModelConfig
from tnl.engine import state_file
from tnl.loading import build_engine
from tnl.model.weights import load_model

LP_TOL = 1e-4
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
KEY = "state-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OCTET = {**AUTH, "Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> str:
    """The same architecture and tokenizer as `tiny`, other weights: another model."""
    d = str(tmp_path_factory.mktemp("other"))
    build_test_tokenizer(d)
    cfg = tiny_config(vocab_size=400)
    write_checkpoint(d, cfg, random_state_dict(cfg, seed=3, std=0.3))
    return d


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny, device="cpu", max_num_batched_tokens=32)


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    """A state file's tensors, read by safetensors itself (not by the module under test)."""
    return safetensors.torch.load(data)


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


def _rebuild(good: bytes, change_meta=None, change_tensors=None, keep_digest: bool = False) -> bytes:
    """`good` with its metadata and / or tensors changed, its digest recomputed (unless
    keep_digest) so that the check under test is the one that trips."""
    meta = dict(_header(good)["__metadata__"])
    tensors = _tensors(good)
    if change_tensors:
        change_tensors(tensors)
    if not keep_digest:
        h = hashlib.sha256()
        names = sorted((k for k in tensors if k.startswith("state.")), key=lambda k: int(k.split(".")[1]))
        for k in names + (["logits"] if "logits" in tensors else []):
            h.update(tensors[k].contiguous().numpy().tobytes())
        meta["data_sha256"] = h.hexdigest()
    if change_meta:
        change_meta(meta)
    return safetensors.torch.save(tensors, metadata=meta)


def _chat(srv: ServerProcess, messages: list[dict], max_tokens: int = 8, headers=None) -> dict:
    r = requests.post(srv.url + "/v1/chat/completions", headers=headers, timeout=60, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    return r.json()


def _cached(reply: dict, srv: ServerProcess, hit_tokens_before: float) -> int:
    """The reply's cached prompt tokens: usage.prompt_tokens_details.cached_tokens where the
    server reports it, else what /metrics' hit counter grew by."""
    details = reply["usage"].get("prompt_tokens_details")
    if details is not None:
        return details["cached_tokens"]
    return int(srv.metric("tnl_prefix_cache_hit_tokens_total") - hit_tokens_before)


def _logprobs(reply: dict) -> list[float]:
    return [t["logprob"] for t in reply["choices"][0]["logprobs"]["content"]]


def _wait_for_files(directory: str, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if len(files) >= n or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


# ---- the file format ---------------------------------------------------------------------------
def test_fingerprint_names_the_checkpoint_not_the_serving_dtype(tiny, other, llm):
    fp32 = state_file.model_fingerprint(load_model(tiny, device="cpu", dtype="float32", progress=False))
    bf16 = state_file.model_fingerprint(load_model(tiny, device="cpu", dtype="bfloat16", progress=False))
    theirs = state_file.model_fingerprint(load_model(other, device="cpu", dtype="float32", progress=False))
    assert fp32 == bf16 == llm.engine.core.fingerprint
    assert theirs != fp32 and len(fp32) == 64


def test_file_holds_the_state_logits_and_metadata(llm):
    ids = [1, 17, 42, 99, 5]
    data = llm.export_state(token_ids=ids)
    meta = _header(data)["__metadata__"]
    cfg = llm.engine.model_config
    assert meta["format"] == "tnl-state" and meta["format_version"] == "1" and meta["dtype"] == "float32"
    assert meta["fingerprint"] == llm.engine.core.fingerprint
    assert json.loads(meta["token_ids"]) == ids and meta["num_tokens"] == "5"
    assert json.loads(meta["state_shapes"]) == [list(s) for s in cfg.state_shapes()]
    t = _tensors(data)
    assert sorted(t) == ["logits"] + [f"state.{i}" for i in range(cfg.n_layers)]
    assert all(t[f"state.{i}"].dtype == torch.float32 and tuple(t[f"state.{i}"].shape) == s
               for i, s in enumerate(cfg.state_shapes()))
    assert t["logits"].shape == (cfg.vocab_size,)
    assert len(data) < cfg.state_bytes() + 4 * cfg.vocab_size + 4096   # the header is small


def test_exported_state_is_the_state_after_exactly_those_tokens(tiny):
    """The same state whether the cache had nothing, a shorter prefix, or the whole prefix."""
    ids = [1] + [(7 * i + 3) % 397 + 3 for i in range(40)]
    scratch = _tensors(LLM(tiny, device="cpu", max_num_batched_tokens=32).export_state(token_ids=ids))
    e = LLM(tiny, device="cpu", max_num_batched_tokens=32)
    e.export_state(token_ids=ids[:17])                       # a shorter prefix cached first
    from_shorter = _tensors(e.export_state(token_ids=ids))
    from_whole = _tensors(e.export_state(token_ids=ids))     # the whole prefix cached now
    assert e.engine.stats()["prefix_cache_hit_tokens"] >= 17 + len(ids)
    for name, want in scratch.items():
        rel = ((from_shorter[name] - want).norm() / want.norm()).item()
        assert rel < 1e-5, (name, rel)      # only float rounding: the chunks split differently
        assert torch.equal(from_whole[name], from_shorter[name])


def test_offline_round_trip_between_two_llms(tiny):
    """Export a conversation from one LLM, import it into another: the next turn gives the
    tokens and logprobs (within 1e-4) of computing it from scratch, from the imported state."""
    a = LLM(tiny, device="cpu", max_num_batched_tokens=32)
    conv = [SYSTEM, {"role": "user", "content": "hello world"}]
    reply = a.chat(conv, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    conv += [{"role": "assistant", "content": reply}]
    data = a.export_state(messages=conv)
    n = len(a.tokenizer.apply_chat_template(conv, add_generation_prompt=False, tokenize=True))

    b = LLM(tiny, device="cpu", max_num_batched_tokens=32)
    info = b.import_state(data)
    assert info == {"tokens": n, "fingerprint": a.engine.core.fingerprint}
    nxt = a.tokenizer.apply_chat_template(conv + [{"role": "user", "content": "the state of a layer"}],
                                          tokenize=True)
    assert len(nxt) > n
    sp = SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True)
    got = b.generate(nxt, sp)[0]
    want = LLM(tiny, device="cpu", max_num_batched_tokens=32).generate(nxt, sp)[0]   # an empty cache: from scratch
    assert got.num_cached_tokens == n and want.num_cached_tokens == 0
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    for t, lp_got, lp_want in zip(want.outputs[0].token_ids, got.outputs[0].logprobs, want.outputs[0].logprobs):
        assert abs(lp_got[t] - lp_want[t]) < LP_TOL
    assert b.unpin_states() == 1 and b.unpin_states() == 0


def test_offline_errors_are_typed(tiny, other, llm):
    data = llm.export_state(prompt="the model reads a long prompt")
    with pytest.raises(state_file.WrongModelState, match="another model"):
        LLM(other, device="cpu").import_state(data)
    off = build_engine(tiny, device="cpu", engine_config=EngineConfig(enable_prefix_caching=False), progress=False)
    with pytest.raises(state_file.StateCacheError, match="off") as e:
        off.core.state_entry([1, 2, 3])
    assert e.value.off
    with pytest.raises(ValueError, match="exactly one"):
        llm.export_state(prompt="x", token_ids=[1])
    cfg = llm.engine.model_config
    fp = llm.engine.core.fingerprint
    # a header length far past the end is refused from the 8 bytes, before any allocation
    with pytest.raises(state_file.CorruptStateFile, match="header of"):
        state_file.loads(struct.pack("<Q", 1 << 40) + b"{}", fp, cfg)
    with pytest.raises(state_file.StateFileTooLarge):
        state_file.loads(b"\0" * (state_file.max_file_bytes(cfg) + 1), fp, cfg)
    assert len(llm.engine.core.prefix_cache.entries) > 0   # (the checks above cached nothing new)


def test_prefix_cache_dir_cap_deletes_the_oldest_files(tiny, tmp_path):
    d = str(tmp_path / "states")
    e = LLM(tiny, device="cpu", max_num_batched_tokens=32, prefix_cache_dir=d)
    e.generate([1, 5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    e.engine.core.state_dir.flush(10)
    sizes = [os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors"))]
    assert len(sizes) == 2   # the prompt's end (with its logits) and the generation's end
    cap_gb = 3.5 * max(sizes) / 1e9
    e = LLM(tiny, device="cpu", max_num_batched_tokens=32, prefix_cache_dir=d, prefix_cache_dir_gb=cap_gb)
    prompts = [[1, 10 + i, 20 + i, 30 + i] for i in range(4)]
    for p in prompts:
        e.generate(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        e.engine.core.state_dir.flush(10)
    files = glob.glob(os.path.join(d, "*.safetensors"))
    assert 2 <= len(files) <= 3 and sum(map(os.path.getsize, files)) <= cap_gb * 1e9
    newest = e.engine.core.state_dir.file_name(prompts[-1])
    assert os.path.exists(os.path.join(d, newest))
    assert not glob.glob(os.path.join(d, ".tmp-*"))   # every write renamed into place
    # a new engine on the directory continues the newest prompt from its file
    f = LLM(tiny, device="cpu", max_num_batched_tokens=32, prefix_cache_dir=d, prefix_cache_dir_gb=cap_gb)
    out = f.generate(prompts[-1] + [44], SamplingParams(max_tokens=1, temperature=0))[0]
    assert out.num_cached_tokens == len(prompts[-1])


# ---- HTTP ----------------------------------------------------------------------------------------
def test_export_then_import_into_a_fresh_server_continues_the_conversation(tiny):
    conv = [SYSTEM, {"role": "user", "content": "hello world"}]
    with ServerProcess(tiny) as a:
        first = _chat(a, conv)
        conv += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]}]
        model = requests.get(a.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = requests.post(a.url + "/v1/state/export", json={"model": model, "messages": conv}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        n = int(r.headers["x-tnl-state-tokens"])
        fingerprint = r.headers["x-tnl-state-fingerprint"]
        tokens = requests.post(a.url + "/tokenize", json={"messages": conv, "add_generation_prompt": False},
                               timeout=10).json()["tokens"]
        assert n == len(tokens) and json.loads(_header(r.content)["__metadata__"]["token_ids"]) == tokens
        turn2 = conv + [{"role": "user", "content": "and the decay speed?"}]
        uninterrupted = _chat(a, turn2, max_tokens=10)
    with ServerProcess(tiny) as b:
        hits0 = b.metric("tnl_prefix_cache_hit_tokens_total")
        t0 = time.perf_counter()
        imp = requests.post(b.url + "/v1/state/import", data=r.content, headers=OCTET, timeout=60)
        assert imp.status_code == 200, imp.text
        assert imp.json() == {"tokens": n, "fingerprint": fingerprint}
        assert b.metric("tnl_prefix_cache_entries") == 1
        moved = _chat(b, turn2, max_tokens=10)
        took_ms = (time.perf_counter() - t0) * 1000
        assert _cached(moved, b, hits0) == n
        assert moved["choices"][0]["message"]["content"] == uninterrupted["choices"][0]["message"]["content"]
        for x, y in zip(_logprobs(moved), _logprobs(uninterrupted), strict=True):
            assert abs(x - y) < LP_TOL
        assert took_ms < 30_000
        gone = requests.delete(b.url + "/v1/state/pins", timeout=10)
        assert gone.status_code == 200 and gone.json() == {"unpinned": 1}


def test_bad_state_files_are_refused_and_nothing_is_cached(tiny, other):
    cfg = ModelConfig.from_file(tiny)
    good = LLM(tiny, device="cpu").export_state(token_ids=[1, 30, 31, 32, 33])
    theirs = LLM(other, device="cpu").export_state(token_ids=[1, 30, 31, 32, 33])
    data_start = 8 + struct.unpack("<Q", good[:8])[0]
    corrupt = bytearray(good)
    corrupt[data_start + 100] ^= 0x40
    pickle = io.BytesIO()
    torch.save(_tensors(good), pickle)

    def nan_state(t):
        t["state.1"][0, 0, 0] = float("nan")

    def inf_logits(t):
        t["logits"][7] = float("inf")

    def wrong_shape(t):
        t["state.0"] = torch.zeros(*t["state.0"].shape[:-1], t["state.0"].shape[-1] + 1)

    def wrong_dtype(t):
        t["state.2"] = t["state.2"].half()

    cases = [
        ("another model's", theirs, 409, "another model"),
        ("truncated", good[:len(good) // 2], 400, "truncated"),
        ("corrupt bytes", bytes(corrupt), 400, "digest"),
        ("not safetensors", b"this is not a state file\n" * 40, 400, "not a state file"),
        ("a pickle", pickle.getvalue(), 400, "not a state file"),
        ("wrong version", _rebuild(good, lambda m: m.update(format_version="2")), 400, "version '2'"),
        ("NaN in a state", _rebuild(good, change_tensors=nan_state), 400, "NaN or inf"),
        ("inf in the logits", _rebuild(good, change_tensors=inf_logits), 400, "NaN or inf"),
        ("wrong shape", _rebuild(good, change_tensors=wrong_shape), 400, "shape"),
        ("wrong dtype", _rebuild(good, change_tensors=wrong_dtype), 400, "dtype"),
        ("no digest", _rebuild(good, lambda m: m.pop("data_sha256")), 400, "data_sha256"),
        ("token ids outside the vocabulary", _rebuild(good, lambda m: m.update(token_ids="[1, 400]")), 400,
         "not a token id"),
        # (413 from the route's cap, or from --max-body-mb's before it where that is lower)
        ("over the cap", b"\0" * (state_file.max_file_bytes(cfg) + 1), 413, "larger than|more than this server's"),
        ("empty", b"", 400, "empty"),
    ]
    with ServerProcess(tiny, "--api-key", KEY) as srv:
        for path, method in (("/v1/state/import", "post"), ("/v1/state/export", "post"), ("/v1/state/pins", "delete")):
            assert getattr(requests, method)(srv.url + path, timeout=10).status_code == 401
        for name, body, status, message in cases:
            r = requests.post(srv.url + "/v1/state/import", data=body, headers=OCTET, timeout=60)
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert re.search(message, err["message"]) and err["code"] == status, (name, err)
            assert requests.get(srv.url + "/health", timeout=10).status_code == 200, name
            assert srv.metric("tnl_prefix_cache_entries", AUTH) == 0, name
        for body, status in (({"prompt": "hello", "token_ids": [1]}, 400), ({}, 400),
                             ({"token_ids": [1, 400]}, 400), ({"token_ids": []}, 400),
                             ({"model": "no-such-model", "token_ids": [1]}, 404)):
            r = requests.post(srv.url + "/v1/state/export", json=body, headers=AUTH, timeout=30)
            assert r.status_code == status, (body, r.text)
        assert srv.metric("tnl_prefix_cache_entries", AUTH) == 0
        r = requests.post(srv.url + "/v1/state/import", data=good, headers=OCTET, timeout=60)   # and a good one
        assert r.status_code == 200 and r.json()["tokens"] == 5
        assert srv.metric("tnl_prefix_cache_entries", AUTH) == 1
        assert requests.delete(srv.url + "/v1/state/pins", headers=AUTH, timeout=10).json() == {"unpinned": 1}


def test_restart_with_prefix_cache_dir_finds_the_states_and_skips_bad_files(tiny, other, tmp_path):
    d = str(tmp_path / "states")
    conv = [SYSTEM, {"role": "user", "content": "hello world"}]
    with ServerProcess(tiny, "--prefix-cache-dir", d) as srv:
        before = _chat(srv, conv)
        assert len(_wait_for_files(d, 2)) >= 2   # written while the server runs
    files = _wait_for_files(d, 2)   # all of them: the process ended after its last write
    assert len(files) >= 2, files   # the prompt's end and the generation's end at least
    with open(files[0], "rb") as f:
        whole = f.read()
    truncated = os.path.join(d, "truncated.safetensors")
    with open(truncated, "wb") as f:
        f.write(whole[:len(whole) - 100])
    foreign = os.path.join(d, "other-model.safetensors")
    with open(foreign, "wb") as f:
        f.write(LLM(other, device="cpu").export_state(token_ids=[1, 30, 31]))

    with ServerProcess(tiny, "--prefix-cache-dir", d) as srv:
        log = srv.log()
        assert f"skipping {truncated}: truncated" in log
        assert f"skipping {foreign}: the state was computed by another model" in log
        assert f"{len(files)} states loaded" in log
        assert srv.metric("tnl_prefix_cache_entries") == len(files)
        hits0 = srv.metric("tnl_prefix_cache_hit_tokens_total")
        after = _chat(srv, conv)
        assert _cached(after, srv, hits0) == after["usage"]["prompt_tokens"]   # the whole prompt, from disk
        assert after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
        for x, y in zip(_logprobs(after), _logprobs(before), strict=True):
            assert abs(x - y) < LP_TOL
    assert os.path.exists(truncated) and os.path.exists(foreign)   # skipped, never deleted
