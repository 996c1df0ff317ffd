"""16-bit states (--state-dtype) through the engine: the pool, the prompt-state cache and state
files carry the dtype; a file of another dtype is converted on import (and said so in the log);
--prefix-cache-dir files too; 8-bit weights are another model for state files."""
from __future__ import annotations

import json
import logging
import struct

import pytest
import safetensors.torch
import torch

from helpers_server import make_tiny_model
from tnl import LLM, SamplingParams
from tnl.engine import state_file

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PREFIX = [1] + list(range(5, 45))
NEXT = PREFIX + [50, 51, 52]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engines(tiny) -> dict[str, LLM]:
    return {d: LLM(tiny, device="cpu", state_dtype=d, max_num_batched_tokens=32, progress=False)
            for d in ("float32", "bfloat16", "float16")}


def _meta(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_pool_cache_and_file_carry_the_dtype(engines, dtype):
    llm = engines[dtype]
    core = llm.engine.core
    assert all(t.dtype == getattr(torch, dtype) for t in core.runner.pool.layers)
    data = llm.export_state(token_ids=PREFIX)
    assert all(t.dtype == getattr(torch, dtype) for t in core.prefix_cache.get(PREFIX).state)
    head = _meta(data)
    assert head["__metadata__"]["dtype"] == dtype
    assert {head[f"state.{i}"]["dtype"] for i in range(core.model_config.n_layers)} == {"BF16" if dtype == "bfloat16"
                                                                                        else "F16"}
    assert head["logits"]["dtype"] == "F32"
    f32 = engines["float32"].export_state(token_ids=PREFIX)
    assert len(f32) - len(data) > 0.45 * sum(t.numel() * 4 for t in safetensors.torch.load(f32).values()
                                             if t.dim() == 3)       # about half the bytes
    ids, state, logits = state_file.loads(data, core.fingerprint, core.model_config)
    assert ids == PREFIX and state[0].dtype == getattr(torch, dtype) and logits.dtype == torch.float32
    # a round trip: the same engine continues from its own file exactly as from its own cache
    want = [o.outputs[0].token_ids for o in llm.generate([NEXT], GREEDY)]
    llm.unpin_states()
    llm.import_state(data)
    assert [o.outputs[0].token_ids for o in llm.generate([NEXT], GREEDY)] == want


@pytest.mark.parametrize("src,dst", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float16", "bfloat16")])
def test_import_of_another_dtype_converts_and_says_so(engines, src, dst, caplog):
    names = ["float32", "bfloat16", "float16"]
    base = 100 + 60 * names.index(src) + 20 * names.index(dst)
    prefix = [1] + [base + i for i in range(30)]       # cached by neither engine yet (one per pair)
    data = engines[src].export_state(token_ids=prefix)
    target = engines[dst]
    with caplog.at_level(logging.INFO, logger="tnl.engine.core"):
        target.import_state(data)
    assert f"state stored in {src}, converted to this engine's state dtype {dst}" in caplog.text
    entry = target.engine.core.prefix_cache.get(prefix)
    assert entry.state[0].dtype == getattr(torch, dst)
    ref = state_file.loads(data, target.engine.core.fingerprint, target.engine.core.model_config)[1]
    for got, want in zip(entry.state, ref):
        assert torch.equal(got, want.to(got.dtype))      # converted once, nothing else changed
    out = target.generate([prefix + [7, 8]], GREEDY)[0]
    assert out.num_cached_tokens == len(prefix)          # continued from the converted state
    target.unpin_states()


def test_a_file_whose_tensors_disagree_with_its_dtype_is_refused(engines):
    llm = engines["bfloat16"]
    core = llm.engine.core
    data = engines["float32"].export_state(token_ids=PREFIX)
    tensors = safetensors.torch.load(data)
    meta = {k: v for k, v in _meta(data)["__metadata__"].items()}
    meta["dtype"] = "bfloat16"                  # F32 tensors under a bfloat16 label
    bad = safetensors.torch.save(tensors, metadata=meta)
    with pytest.raises(state_file.CorruptStateFile, match="expected BF16"):
        state_file.loads(bad, core.fingerprint, core.model_config)
    meta["dtype"] = "int8"
    with pytest.raises(state_file.CorruptStateFile, match="metadata 'dtype' is 'int8'"):
        state_file.loads(safetensors.torch.save(tensors, metadata=meta), core.fingerprint, core.model_config)


def test_prefix_cache_dir_files_load_into_an_engine_of_another_dtype(tiny, tmp_path):
    d = str(tmp_path / "states")
    a = LLM(tiny, device="cpu", state_dtype="float32", prefix_cache_dir=d, progress=False)
    want = a.generate([NEXT], GREEDY)[0].outputs[0].token_ids
    a.engine.core.state_dir.flush()
    b = LLM(tiny, device="cpu", state_dtype="bfloat16", prefix_cache_dir=d, progress=False)
    cache = b.engine.core.prefix_cache
    assert cache.entries and all(e.state[0].dtype == torch.bfloat16 for e in cache.entries)
    got = b.generate([NEXT], GREEDY)[0].outputs[0].token_ids
    assert len(got) == len(want)


def test_int8_weights_are_another_model_for_state_files(tiny, engines):
    q = LLM(tiny, device="cpu", quantization="int8", progress=False)
    assert q.engine.core.fingerprint != engines["float32"].engine.core.fingerprint
    with pytest.raises(state_file.WrongModelState, match="--quantization"):
        q.import_state(engines["float32"].export_state(token_ids=PREFIX))
