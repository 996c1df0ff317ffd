"""Which kernel table a card gets (tnl.kernels.tuned), the shipped tables themselves, fla's
host-built varlen indices (tnl.kernels.fla_prefill.varlen_meta, AttnBatch.build), and `tnl tune`
without a GPU. The kernels these feed run in tests/kernels/test_cuda.py (GPU)."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tnl.kernels import triton_gemm, tuned
from tnl.kernels.fla_prefill import CHUNK, varlen_meta
from tnl.model.transnormer import AttnBatch

H100 = "NVIDIA H100 80GB HBM3"


def write_table(path, device: str, fla: dict | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    obj = {"device": device, "tuned": [triton_gemm.tuned_entry(1, 4096, 4096, triton_gemm.heuristic_config(1, 4096, 4096),
                                                               1.2)]}
    if fla:
        obj["fla"] = fla
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def test_shipped_tables_load_name_their_card_and_are_packaged():
    files = sorted(glob.glob(os.path.join(tuned.SHIPPED_DIR, "*.json")))
    assert files, "no shipped tables"
    for path in files:
        obj = tuned.read_table(path)
        assert tuned.card_slug(obj["device"]) + ".json" == os.path.basename(path), path
        assert len(triton_gemm.TunedTable.load(obj)) > 0
    for slug in tuned.ARCH_DEFAULT.values():
        assert os.path.join(tuned.SHIPPED_DIR, slug + ".json") in files
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")) as f:
        assert '"kernels/tuned/*.json"' in f.read()


def test_card_slug():
    assert tuned.card_slug("NVIDIA H200") == "nvidia-h200"
    assert tuned.card_slug(H100) == "nvidia-h100-80gb-hbm3"
    assert tuned.card_slug("  ") == "unknown"


def test_choice_order_tnl_tune_then_this_card_then_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("TNL_CACHE_DIR", str(tmp_path))
    # an sm_90 card with no table of its own: the H100's, said to be another card's
    c = tuned.choose_table("NVIDIA H800", (9, 0))
    assert c.source == "shipped" and c.path.endswith("nvidia-h100-80gb-hbm3.json") and not c.for_this_card
    assert "tuned on NVIDIA H100 80GB HBM3, not this card: run `tnl tune`" in c.describe("NVIDIA H800")
    # the H200's shipped table
    c = tuned.choose_table("NVIDIA H200", (9, 0))
    assert c.source == "shipped" and c.path.endswith("nvidia-h200.json") and c.for_this_card
    # the H100 itself: its own
    c = tuned.choose_table(H100, (9, 0))
    assert c.for_this_card and "tuned on this card" in c.describe(H100)
    # another architecture: none (cuBLAS, fla autotunes)
    c = tuned.choose_table("NVIDIA A100-SXM4-80GB", (8, 0))
    assert c.path is None and tuned.fla_configs(c, (8, 0)) is None
    assert "run `tnl tune`" in c.describe("NVIDIA A100-SXM4-80GB")
    # what tnl tune wrote for this card comes first, with its fla configs
    pins = {"chunk_fwd_kernel_h": {"BK": 32, "BV": 64, "num_warps": 2, "num_stages": 2}}
    mine = write_table(tuned.user_table_path("NVIDIA H200"), "NVIDIA H200", pins)
    assert mine == str(tmp_path / "tuned" / "nvidia-h200.json")
    c = tuned.choose_table("NVIDIA H200", (9, 0))
    assert (c.path, c.source, c.for_this_card) == (mine, "tnl tune", True)
    assert tuned.fla_configs(c, (9, 0)) == pins
    # a table without fla configs: tnl's sm_90 defaults there, none elsewhere
    plain = write_table(tmp_path / "plain.json", "NVIDIA H200")
    c = tuned.choose_table("NVIDIA H200", (9, 0), given=plain)
    assert c.source == "given" and tuned.fla_configs(c, (9, 0)) == tuned.FLA_SM90
    assert tuned.fla_configs(c, (8, 9)) is None


def test_unreadable_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("TNL_CACHE_DIR", str(tmp_path))
    bad = tmp_path / "tuned" / "nvidia-h200.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    c = tuned.choose_table("NVIDIA H200", (9, 0))      # a broken cache file is skipped, not fatal
    assert c.source == "shipped" and c.for_this_card
    with pytest.raises(ValueError, match="cannot read it"):
        tuned.choose_table("NVIDIA H200", (9, 0), given=str(bad))
    (tmp_path / "nolist.json").write_text('{"device": "x"}')
    with pytest.raises(ValueError, match="no 'tuned' list"):
        tuned.choose_table("x", (9, 0), given=str(tmp_path / "nolist.json"))


def test_default_tune_dir(monkeypatch):
    monkeypatch.delenv("TNL_CACHE_DIR", raising=False)
    assert tuned.tune_dir() == os.path.join(os.path.expanduser("~"), ".cache", "tnl", "tuned")


@pytest.mark.parametrize("lens", [[1], [64], [65], [128, 1, 200, 63], [16384], [0, 5]])
def test_varlen_meta_matches_the_chunk_definition(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    offsets, ns, pairs = varlen_meta(cu)
    want_pairs = []
    for i, n in enumerate(lens):
        assert offsets[i + 1] - offsets[i] == (n + CHUNK - 1) // CHUNK
        want_pairs += [(i, j) for j in range((n + CHUNK - 1) // CHUNK)]
    assert offsets[0] == 0 and ns == offsets[-1] == len(want_pairs)
    assert list(zip(pairs[::2], pairs[1::2])) == want_pairs


def test_attn_batch_sends_aligned_indices_in_one_tensor():
    decode = [(3, 10), (5, 7), (0, 99)]
    prefill = [(1, 0, 130), (2, 40, 3)]
    b = AttnBatch.build(decode, prefill, "cpu")
    assert b.positions.tolist() == [10, 7, 99] + list(range(130)) + [40, 41, 42]
    assert b.decode_slots.tolist() == [3, 5, 0] and b.prefill_slots.tolist() == [1, 2]
    assert b.cu_seqlens.tolist() == b.cu_seqlens_list == [0, 130, 133]
    offsets, chunk_indices, ns = b.chunk_meta
    assert offsets.tolist() == [0, 3, 4] and ns == 4
    assert chunk_indices.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    views = [b.positions, b.decode_slots, b.prefill_slots, b.cu_seqlens, offsets, chunk_indices]
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1            # one host-to-device copy
    assert all(v.data_ptr() % 16 == 0 for v in views)                           # Triton's alignment
    assert AttnBatch.build(decode, [], "cpu").chunk_meta is None


def test_tune_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = subprocess.run([sys.executable, "-m", "tnl.cli", "tune", "--quick"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "tnl tune: error: needs a CUDA GPU" in r.stderr, r.stderr
