"""tnl.kernels.triton_gemm.skinny_linear against a float64 reference.

Runs on a CUDA GPU, or on CPU under the Triton interpreter:
    TRITON_INTERPRET=1 pytest tests/test_triton_gemm.py
Skipped when triton is not installed, or when there is neither a GPU nor TRITON_INTERPRET=1.
The interpreter's tl.dot is wrong for bfloat16 inputs, so there the dot configs run in float16
(bfloat16 still covers the FMA configs)."""
from __future__ import annotations

import json
import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    DEV = "cpu"
elif torch.cuda.is_available():
    DEV = "cuda"
else:
    pytest.skip("needs a CUDA GPU, or TRITON_INTERPRET=1 for the Triton interpreter", allow_module_level=True)

from tnl.kernels import triton_gemm as tg  # noqa: E402  (needs triton)
from tnl.kernels.triton_gemm import Config, skinny_linear  # noqa: E402


def _interpreter_numpy_shim():
    """Triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them for
    range() bounds, which numpy >= 2.4 refuses; index the element instead."""
    try:
        from triton.runtime import interpreter as ti
        orig = ti._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_tnl_shim", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tnl_shim = True
    ti._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_numpy_shim()

# (name, config): every code path of the kernel; N=100, K=200 are multiples of none of the blocks
CONFIGS = [
    ("dot", Config(16, 32, 64, 1)),
    ("dot-split3", Config(16, 32, 64, 3)),
    ("dot-m32-split2", Config(32, 64, 32, 2, num_stages=3)),
    ("dot-m64", Config(64, 16, 128, 1, num_stages=2)),
    ("fma-gemv", Config(1, 16, 64, 1, USE_DOT=False)),
    ("fma-gemv-split2", Config(1, 32, 128, 2, USE_DOT=False)),
    ("fma-m4-split3", Config(4, 16, 64, 3, USE_DOT=False)),
    ("fma-m2", Config(2, 8, 64, 1, USE_DOT=False, num_stages=2)),
]


def _dtype(cfg: Config) -> torch.dtype:
    return torch.float16 if (INTERPRET and cfg.USE_DOT) else torch.bfloat16


def _inputs(M, N, K, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(DEV)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(DEV)
    b = torch.randn(N, generator=g).to(dtype).to(DEV) if bias else None
    return x, w, b


def _ref(x, w, b):
    out = x.double() @ w.double().T
    return out + b.double() if b is not None else out


def _err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _tol(dtype):
    # output rounding dominates: half an ulp relative to the largest element, with room
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}[dtype]


@pytest.mark.parametrize("M", [1, 3, 16, 64])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference_ragged(name, cfg, M):
    if INTERPRET and not cfg.USE_DOT and M > 16:
        pytest.skip("slow in the interpreter (M / BLOCK_M tiles); FMA configs are for M <= 4")
    dtype = _dtype(cfg)
    x, w, b = _inputs(M, 100, 200, dtype)
    out = skinny_linear(x, w, b, config=cfg)
    assert out.shape == (M, 100) and out.dtype == dtype
    assert _err(out, _ref(x, w, b)) < _tol(dtype)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_gated_multiplies_the_two_halves_while_loading(name, cfg, M):
    """gated=True: x = [a | b] [M, 2K] gives F.linear(a * b) with a * b rounded to the input
    dtype as the unfused product is (the GLU's gate fused into the down projection)."""
    if INTERPRET and not cfg.USE_DOT and M > 4:
        pytest.skip("slow in the interpreter")
    dtype = _dtype(cfg)
    x, w, b = _inputs(M, 100, 400, dtype, seed=2)
    a, bb = x[:, :200], x[:, 200:]
    w = w[:, :200].contiguous()
    out = skinny_linear(x, w, b, config=cfg, gated=True)
    assert out.shape == (M, 100) and out.dtype == dtype
    assert _err(out, _ref(a * bb, w, b)) < _tol(dtype)


@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("fusion", ["norm", "norm+gate+residual", "gated+residual"])
def test_fused_norm_gate_residual(fusion, name, cfg, M):
    """The decode layer's fusions: norm=True is F.linear(srms(x)) (srms's per-row scale summed
    over K inside the kernel, across K splits too), gate multiplies a separate strided tensor in,
    residual=r returns r + out written into r in place."""
    if INTERPRET and not cfg.USE_DOT and M > 4:
        pytest.skip("slow in the interpreter")
    dtype = _dtype(cfg)
    K, N = 200, 100
    x, w, b = _inputs(M, N, K, dtype, seed=6)
    x = x * 3 + 1                          # a row scale far from 1: the norm must matter
    ref_in = x.double()
    kwargs = {}
    if "norm" in fusion:
        kwargs["norm"] = True
        ref_in = ref_in / (ref_in.norm(dim=-1, keepdim=True) / K ** 0.5 + 1e-8)
    if "+gate" in fusion:
        wide = torch.randn(M, 3 * K, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEV)
        kwargs["gate"] = wide[:, K:2 * K]  # a strided view, like u inside the qkvu output
        ref_in = ref_in * kwargs["gate"].double()
    if fusion.startswith("gated"):
        ab = torch.randn(M, 2 * K, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEV)
        x, ref_in = ab, ab[:, :K].double() * ab[:, K:].double()
        kwargs["gated"] = True
    ref = ref_in @ w.double().T + b.double()
    if "residual" in fusion:
        r = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(dtype).to(DEV)
        ref = ref + r.double()
        kwargs["residual"] = r
    out = skinny_linear(x, w, b, config=cfg, **kwargs)
    assert out.shape == (M, N) and out.dtype == dtype
    assert _err(out, ref) < _tol(dtype), _err(out, ref)
    if "residual" in fusion:
        assert out.data_ptr() == r.data_ptr() and torch.equal(out, r)


@pytest.mark.parametrize("name,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fp32_out_even_shape_no_bias(name, cfg):
    # N, K multiples of every block (the unmasked EVEN_N / EVEN_K loads); float32 logits
    dtype = _dtype(cfg)
    x, w, _ = _inputs(3, 128, 256, dtype, bias=False, seed=1)
    out = skinny_linear(x, w, config=cfg, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert _err(out, _ref(x, w, None)) < _tol(torch.float32)


def test_split_k_is_deterministic_and_leaves_counters_zero():
    cfg = Config(16, 32, 32, 4)
    x, w, b = _inputs(5, 100, 200, _dtype(cfg), seed=2)
    first = skinny_linear(x, w, b, config=cfg)
    for _ in range(2):      # a counter left non-zero would skip the reduction of a later call
        assert torch.equal(skinny_linear(x, w, b, config=cfg), first)
    assert tg.split_k_counters() and all(int(buf.count_nonzero()) == 0 for buf in tg.split_k_counters())


def test_default_config_and_leading_dims():
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    x, w, b = _inputs(6, 100, 200, dtype, seed=3)
    out = skinny_linear(x.reshape(2, 3, 200), w, b)       # no config: heuristic_config
    assert out.shape == (2, 3, 100)
    assert _err(out.reshape(6, 100), _ref(x, w, b)) < _tol(dtype)
    assert skinny_linear(x[:0], w).shape == (0, 100)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_split_k():
    cfg = Config(16, 32, 64, 3)
    x, w, b = _inputs(7, 100, 200, torch.bfloat16, seed=4)
    ref = _ref(x, w, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        skinny_linear(x, w, b, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = skinny_linear(x, w, b, config=cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        ref = _ref(x, w, b)
        g.replay()
        torch.cuda.synchronize()
        assert _err(out, ref) < _tol(torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="precompile needs the CUDA driver")
def test_precompile_then_call():
    cfgs = [Config(16, 32, 64, 2, num_stages=3), Config(2, 16, 64, 1, USE_DOT=False, num_stages=3)]
    jobs = [(2, 100, 200, c, torch.bfloat16, od, True) for c in cfgs for od in (torch.bfloat16, torch.float32)]
    n, failed = tg.precompile(jobs, max_workers=2)
    assert n >= 1 and failed == 0
    x, w, b = _inputs(2, 100, 200, torch.bfloat16, seed=5)
    for c in cfgs:
        assert _err(skinny_linear(x, w, b, config=c, out_dtype=torch.float32), _ref(x, w, b)) < 1e-4


def test_candidates_heuristic_and_tuned_table(tmp_path):
    shapes = [(16384, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (64000, 4096)]
    for M in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for N, K in shapes:
            cands = tg.candidate_configs(M, N, K, num_sms=132)
            quick = tg.candidate_configs(M, N, K, quick=True, num_sms=132)
            assert 0 < len(quick) <= len(cands) <= 48
            assert len(set(cands)) == len(cands)
            for c in cands:
                assert c.smem_bytes() <= tg._SMEM_LIMIT
                assert c.USE_DOT or (M <= 4 and c.BLOCK_M == tg.m_bucket(M))
                assert c.SPLIT_K == 1 or K // c.BLOCK_K // c.SPLIT_K >= 4
            h = tg.heuristic_config(M, N, K, num_sms=132)
            assert h.USE_DOT and h.smem_bytes() <= tg._SMEM_LIMIT

    assert [tg.m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    best = Config(16, 128, 128, 2, 8, 4, True)
    gemv = Config(1, 16, 256, 1, USE_DOT=False)
    rows = [tg.tuned_entry(16, 4096, 11008, best, 1.07), tg.tuned_entry(1, 4096, 4096, gemv, 0.98)]
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"ceilings": {}, "rows": [], "tuned": rows}))
    table = tg.TunedTable.load(str(path))
    assert len(table) == 2
    assert table.choose_config(9, 4096, 11008) == best          # 9 -> bucket 16
    assert table.prefer_triton(16, 4096, 11008) and not table.prefer_triton(1, 4096, 4096)
    assert table.has_tuned(1, 4096, 4096) and not table.has_tuned(2, 4096, 4096)
    assert not table.prefer_triton(2, 4096, 4096)               # not measured
    assert table.choose_config(2, 4096, 4096) == tg.heuristic_config(2, 4096, 4096)
    assert tg.TunedTable.load(rows).configs == table.configs    # the bare list works too


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda" or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs sm_90+")
@pytest.mark.parametrize("prefetch", [0, 32768])
def test_programmatic_dependent_launch_chain(prefetch):
    """With PDL each kernel lets the next start early and waits (griddepcontrol.wait) before
    touching memory; with prefetch > 0 it first asks L2 for its W rows. A chain of dependent
    calls (each reads the previous output; split-K, fused norm/gate/residual; K = 200 with
    16-byte aligned rows and K = 100 without), eagerly and replayed from a CUDA graph."""
    g = torch.Generator().manual_seed(11)
    ws = [(torch.randn(200, 200, generator=g) * 200 ** -0.5).to(torch.bfloat16).to(DEV),
          (torch.randn(100, 200, generator=g) * 200 ** -0.5).to(torch.bfloat16).to(DEV),
          (torch.randn(200, 100, generator=g) * 100 ** -0.5).to(torch.bfloat16).to(DEV)]
    cfgs = [Config(16, 32, 64, 3), Config(1, 16, 64, 2, USE_DOT=False), Config(2, 8, 64, 1, USE_DOT=False)]
    x0 = torch.randn(2, 200, generator=g).to(torch.bfloat16).to(DEV)

    def chain(x, fast):
        r = x.clone()
        for i in range(6):
            w, cfg = ws[i % 3], cfgs[i % 3]
            if fast:
                y = skinny_linear(x, w, config=cfg, norm=True, pdl=True, prefetch=prefetch)
            else:
                xd = x.double()
                y = ((xd / (xd.norm(dim=-1, keepdim=True) / xd.shape[-1] ** 0.5 + 1e-8)) @ w.double().T)
                y = y.to(torch.bfloat16)
            x = y if y.shape[-1] != 200 else y + r     # every step depends on the previous one
        return x

    want = chain(x0, False).double()
    assert _err(chain(x0, True), want) < 3e-2
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(x0, True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    xs = x0.clone()
    with torch.cuda.graph(graph):
        out = chain(xs, True)
    for seed in range(3):
        xs.copy_(torch.randn(2, 200, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert _err(out, chain(xs, False).double()) < 3e-2
