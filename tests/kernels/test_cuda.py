"""Fast CUDA paths against the torch path (relative-error ratios on output AND state).
Skipped without a GPU; run on the H100 with `pytest tests/test_cuda.py`."""
from __future__ import annotations

import time

import pytest
import torch

from helpers_model import random_state_dict, tiny_config
from reference import reference_logits, rel_err
from tnl.config import EngineConfig, ModelConfig
from tnl.engine.core import COUNTERS
from tnl.kernels import torch_ops
from tnl.kernels.backend import Backend
from tnl.kernels.config import KernelConfig
from tnl.model.transnormer import TransnormerForCausalLM

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"


@pytest.fixture(scope="module")
def backend() -> Backend:
    """The default kernels on the GPU (fla, Triton, the shipped skinny-GEMM table on sm_90)."""
    return Backend(KernelConfig(), DEV)


def _qkv(T, H, dk, dv, dtype, seed, features=True):
    """q, k, v [T, H, d]; q and k feature-mapped (silu) unless features=False (raw projections)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    fm = torch.nn.functional.silu if features else (lambda t: t)
    q = fm(torch.randn(T, H, dk, device=DEV, generator=g)).to(dtype)
    k = fm(torch.randn(T, H, dk, device=DEV, generator=g)).to(dtype)
    v = torch.randn(T, H, dv, device=DEV, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dk", [128, 256, 24])
@pytest.mark.parametrize("B", [1, 7, 64])
def test_triton_decode_matches_torch(dk, B):
    pytest.importorskip("triton")
    from tnl.kernels.triton_decode import recurrent_step_triton
    H, dv, S = 8, 128 if dk >= 128 else 12, 80
    slope = torch.linspace(0.01, 0.7, H, device=DEV)
    decay = torch.exp(-slope)
    pool = torch.randn(S, H, dk, dv, device=DEV)
    slots = torch.randperm(S, device=DEV)[:B]          # scattered slots: slot reuse in any order
    p1, p2 = pool.clone(), pool.clone()
    for step in range(3):
        q, k, v = _qkv(B, H, dk, dv, torch.bfloat16, step)
        o1 = torch_ops.recurrent_step(q, k, v, decay, p1, slots)
        o2 = recurrent_step_triton(q, k, v, decay, p2, slots)
        assert rel_err(o2.float(), o1.float()) < 1e-2
        assert rel_err(p2, p1) < 1e-5
    untouched = torch.ones(S, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(p2[untouched], pool[untouched])


@pytest.mark.parametrize("lrpe", [False, True])
def test_fused_feature_map_decode_matches_torch(lrpe, backend):
    """The kernel applies silu (and LRPE at each sequence's position) to raw projections."""
    H, dh = 8, 128
    dk = 2 * dh if lrpe else dh
    theta = (torch.rand(H, 1, dh, device=DEV) * 0.5) if lrpe else None
    pool = torch.randn(20, H, dk, dh, device=DEV)
    slots = torch.tensor([3, 17, 0, 9], device=DEV)
    positions = torch.tensor([0, 5, 4000, 70000], device=DEV)
    q, k, v = (torch.randn(4, H, dh, device=DEV).to(torch.bfloat16) for _ in range(3))
    p1, p2 = pool.clone(), pool.clone()
    fq, fk = (torch_ops.feature_map(t, theta, positions) for t in (q, k))
    o1 = torch_ops.recurrent_step(fq, fk, v, torch.exp(-torch.ones(H, device=DEV) * 0.1), p1, slots)
    o2 = backend.decode_attention(q, k, v, torch.exp(-torch.ones(H, device=DEV) * 0.1), p2, slots, theta, positions)
    assert rel_err(o2.float(), o1.float()) < 1e-2
    assert rel_err(p2, p1) < 1e-3


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("dk", [128, 256])
def test_fla_varlen_prefill_matches_torch_with_pool_states(dk, direct):
    """Backend.prefill_attention from raw projections (silu applied there, then fla: its kernels
    launched directly with AttnBatch's host-built indices, or its public chunk_simple_gla) against
    the float64 chunk loop on the same feature-mapped inputs; fla's configs pinned to one."""
    pytest.importorskip("fla")
    from tnl.kernels.fla_prefill import _autotuner
    from tnl.model.transnormer import AttnBatch
    backend = Backend(KernelConfig(fla_direct=direct), DEV)
    assert backend.fla is not None and backend.fla.direct == direct
    if torch.cuda.get_device_capability() == (9, 0):
        assert set(backend.fla.pinned) == {"chunk_fwd_kernel_h", "chunk_fwd_kernel_o"}
        assert all(len(_autotuner(k).configs) == 1 for k in backend.fla.kernels.values())
    H, dv = 4, 128
    lens = [1, 63, 64, 65, 255, 256, 257, 700]
    T = sum(lens)
    raw_q, raw_k, v = _qkv(T, H, dk, dv, torch.bfloat16, 1, features=False)
    q, k = (torch_ops.feature_map(t, None, None) for t in (raw_q, raw_k))
    slope = torch.linspace(0.02, 0.5, H, device=DEV)
    pool = torch.randn(10, H, dk, dv, device=DEV) * 0.1
    slot_list = [6, 0, 3, 5, 1, 9, 2, 7]
    batch = AttnBatch.build([], [(s, 0, n) for s, n in zip(slot_list, lens)], DEV)
    slots, cu = batch.prefill_slots, batch.cu_seqlens_list
    p_ref = pool.clone()
    init = p_ref.index_select(0, slots)
    o_ref, fin = torch_ops.varlen_chunk_attention(q.double(), k.double(), v.double(), slope.double(), init.double(), cu)
    p_ref.index_copy_(0, slots, fin.float())
    p_fast = pool.clone()
    o = backend.prefill_attention(raw_q, raw_k, v, slope, p_fast, slots, batch.cu_seqlens, cu, meta=batch.chunk_meta)
    assert backend.names()["prefill"].startswith("fla")
    assert rel_err(o.float(), o_ref) < 5e-3
    assert rel_err(p_fast, p_ref) < 5e-3


def test_triton_rms_norm_matches_torch():
    pytest.importorskip("triton")
    from tnl.kernels.triton_decode import rms_norm
    x = torch.randn(37, 4096, device=DEV, dtype=torch.bfloat16) * 3
    u = torch.randn(37, 4 * 4096, device=DEV, dtype=torch.bfloat16)[:, -4096:]   # a strided view, as in the model
    xf = x.float()
    ref = (xf / (xf.norm(dim=-1, keepdim=True) / 64 + 1e-8))
    assert rel_err(rms_norm(x).float(), ref) < 5e-3
    assert rel_err(rms_norm(x, gate=u).float(), u.float() * ref) < 8e-3


@pytest.fixture(scope="module")
def small_model():
    cfg = tiny_config(vocab_size=512, decoder_embed_dim=256, hidden_dim=256, decoder_attention_heads=2,
                      decoder_layers=4, glu_dim=512, linear_use_lrpe_list=[1, 0, 0, 0])
    sd = random_state_dict(cfg, seed=4, std=0.04, theta_scale=0.8)
    return cfg, sd


def _build(cfg, sd, device, dtype):
    """The model with the default kernels for `device` (the loader's choice)."""
    m = TransnormerForCausalLM(ModelConfig.from_dict(cfg), backend=Backend(KernelConfig(), device))
    m.load_state_dict(sd)
    m = m.to(device)
    for layer in m.model.layers:
        for name in ("qkvu_proj", "out_proj"):
            getattr(layer.token_mixer, name).to(dtype)
        layer.channel_mixer.to(dtype)
    m.model.embed_tokens.to(dtype)
    return m.eval()


@pytest.mark.parametrize("direct", [True, False])
def test_mixed_step_forward_never_waits_for_the_device(small_model, direct):
    """A forward of decode rows beside prompt chunks queues all its work without one host sync
    (CUDA's sync debug mode raises on any): fla's varlen indices come from AttnBatch.build, not
    from a per-layer .item(). Through fla's public API (direct=False) it does sync: the check bites."""
    pytest.importorskip("fla")
    from tnl.model.transnormer import AttnBatch, to_device
    cfg, sd = small_model
    m = _build(cfg, sd, DEV, torch.bfloat16)
    m.backend = Backend(KernelConfig(fla_direct=direct), DEV)
    for layer in m.modules():
        if hasattr(layer, "backend"):
            layer.backend = m.backend
    pools = m.new_state_pool(8, torch.device(DEV), torch.float32)
    decode, prefill = [(0, 5), (1, 9)], [(2, 0, 70), (3, 12, 5)]
    ids_list = list(range(3, 3 + 2 + 75))
    m(torch.tensor(ids_list, device=DEV), AttnBatch.build(decode, prefill, DEV), pools)   # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if direct:
            batch = AttnBatch.build(decode, prefill, DEV)
            hidden = m(to_device(ids_list, torch.long, DEV), batch, pools)
        else:
            with pytest.raises(RuntimeError, match="synchroniz"):
                batch = AttnBatch.build(decode, prefill, DEV)
                m(to_device(ids_list, torch.long, DEV), batch, pools)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if direct:
        assert torch.isfinite(hidden.float()).all()


def test_cuda_bf16_logits_match_cpu_float32(small_model):
    """The CUDA path (fla prefill, Triton decode and norms, bf16 weights) against the CPU
    float32 path and the float64 reference, as a relative-error ratio on logits."""
    from tnl.engine import LLMEngine, SamplingParams
    cfg, sd = small_model
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 300, 77, 1000)]
    sp = SamplingParams(max_tokens=4, temperature=0, logprobs=20, prompt_logprobs=0, ignore_eos=True)
    outs = {}
    for dev, dtype in (("cpu", torch.float32), (DEV, torch.bfloat16)):
        m = _build(cfg, sd, dev, dtype)
        eng = LLMEngine(m, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=512))
        reqs = [eng.add_request(p, sp) for p in prompts]
        while eng.has_work:
            eng.step()
        outs[dev] = [eng.final_output(r) for r in reqs]
    for p, a, b in zip(prompts, outs["cpu"], outs[DEV]):
        if len(p) > 1:  # prompt logprobs start at the second token
            ref = torch.log_softmax(reference_logits(sd, cfg, p), dim=-1)
            want = torch.tensor([ref[i - 1, p[i]].item() for i in range(1, len(p))])
            cpu = torch.tensor([a.prompt_logprobs[i][p[i]] for i in range(1, len(p))])
            gpu = torch.tensor([b.prompt_logprobs[i][p[i]] for i in range(1, len(p))])
            assert rel_err(cpu, want) < 1e-5
            assert rel_err(gpu, want) < 2e-2, (len(p), rel_err(gpu, want))
        # first generated token: same top-20 set mostly, and close logprobs
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        common = set(la) & set(lb)
        assert len(common) >= 15
        assert max(abs(la[t] - lb[t]) / max(1.0, abs(la[t])) for t in common) < 0.05


def test_cuda_graph_engine_batches_equal_alone(small_model):
    """Decode through CUDA graphs with padded buckets and reused slots: each sequence's tokens do
    not depend on its batch neighbours (greedy; the padded rows write a scratch slot)."""
    from tnl.engine import LLMEngine, SamplingParams
    cfg, sd = small_model
    m = _build(cfg, sd, DEV, torch.bfloat16)
    eng = LLMEngine(m, None, EngineConfig(max_num_seqs=12, max_num_batched_tokens=256))
    assert eng.runner.graphs, "graphs were not captured"
    sp = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 40, 129, 5, 600, 17, 256, 9, 2, 33)]

    def run(ps):
        reqs = [eng.add_request(p, sp) for p in ps]
        while eng.has_work:
            eng.step()
        return [eng.final_output(r).outputs[0] for r in reqs]

    alone = [run([p])[0] for p in prompts]
    together = run(prompts)
    for a, b in zip(alone, together):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        # bf16 rounding differs between batch shapes: allow a divergence only at a near tie
        if n < len(a.token_ids):
            lpa = a.logprobs[n]
            top = sorted(lpa.values(), reverse=True)
            assert len(top) < 2 or top[0] - top[1] < 0.05, f"diverged at {n} without a near tie"
    assert eng.stats()["slots_used"] == 0


def test_cuda_async_scheduling_equals_plain_steps(small_model):
    """CUDA graphs with async scheduling (the default: each decode step queued before the last
    step's tokens are read back, input ids gathered on the device) give the tokens and
    logprobs of plain steps; the token after a stop is dropped and its slot reused."""
    from tnl.engine import LLMEngine, SamplingParams
    cfg, sd = small_model
    m = _build(cfg, sd, DEV, torch.bfloat16)
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 40, 129, 5, 600, 17, 256, 9)]
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0 if i % 2 else 0.9, seed=i, logprobs=2,
                             ignore_eos=True) for i in range(len(prompts))]

    def run(async_scheduling):
        eng = LLMEngine(m, None, EngineConfig(max_num_seqs=6, max_num_batched_tokens=256,
                                              async_scheduling=async_scheduling))
        assert eng.core.async_scheduling == async_scheduling and eng.runner.graphs
        assert eng.core.counters == COUNTERS   # (the warm-up is not counted)
        reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        overlapped = 0
        t0 = time.perf_counter()
        while eng.has_work:
            eng.step()
            overlapped += eng.core._in_flight is not None
        wall = time.perf_counter() - t0
        assert eng.stats()["slots_used"] == 0
        torch.cuda.synchronize()
        c = eng.stats()
        assert c["prefill_tokens"] == sum(len(p) for p in prompts) and 0 < c["prefill_steps"] < c["steps"]
        assert 0 < c["prefill_step_busy_s"] < c["device_busy_s"]
        extra = len(prompts) if async_scheduling else 0   # a row that stopped has run one step more
        assert sum(sp.max_tokens - 1 for sp in params) <= c["decode_tokens"] <= sum(sp.max_tokens - 1 for sp in params) + extra
        assert 0 < c["device_busy_s"] < wall and c["steps"] > max(sp.max_tokens for sp in params)
        return [eng.final_output(r).outputs[0] for r in reqs], overlapped

    plain, none = run(False)
    fast, overlapped = run(True)
    assert none == 0 and overlapped > 10
    for a, b in zip(plain, fast):
        assert len(a.token_ids) == len(b.token_ids) and a.finish_reason == b.finish_reason == "length"
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and max(abs(x[t] - y[t]) for t in x) < 1e-3


SHAPES_7B = {"qkvu": (16384, 4096), "out_proj": (4096, 4096), "l12": (22016, 4096), "l3": (4096, 11008),
             "lm_head": (64000, 4096)}


@pytest.mark.parametrize("M", [1, 3, 48, 64])
def test_skinny_gemm_linear_matches_float64(M, backend):
    """Backend.linear on the 7B decode shapes (where the shipped sm_90 table picks the Triton
    skinny GEMM) against a float64 matmul of the same bf16 operands."""
    g = torch.Generator(device=DEV).manual_seed(M)
    used = 0
    for name, (N, K) in SHAPES_7B.items():
        x = torch.randn(M, K, device=DEV, generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, device=DEV, generator=g) * 0.02).to(torch.bfloat16)
        got = backend.linear(x, w)
        assert got.dtype == torch.bfloat16 and got.shape == (M, N)
        want = x.double() @ w.double().T
        assert rel_err(got.double(), want) < 4e-3, (name, M, rel_err(got.double(), want))
        used += backend.route(M, N, K, "plain") == "skinny"
        if name == "l3":   # the GLU gate fused into l3's loads
            ab = torch.randn(M, 2 * K, device=DEV, generator=g).to(torch.bfloat16)
            gated = backend.gated_linear(ab, w)
            want = (ab[:, :K] * ab[:, K:]).double() @ w.double().T
            assert rel_err(gated.double(), want) < 4e-3, ("gated l3", M, rel_err(gated.double(), want))
    if torch.cuda.get_device_capability() == (9, 0):
        assert used >= 3, "the sm_90 table should route most 7B decode shapes to the skinny GEMM"


@pytest.mark.parametrize("M", [1, 3, 32, 48, 64])
def test_fused_decode_linears_match_float64(M, backend):
    """Backend.fused_linear as the fused decode layer calls it on the 7B shapes (srms inside
    qkvu / l12; u * srms(o) and the residual add inside out_proj; the GLU gate and the residual
    add inside l3 up to 32 rows, cuBLAS adding the residual beyond), with programmatic dependent
    launch on sm_90, against float64."""
    g = torch.Generator(device=DEV).manual_seed(10 + M)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * scale).to(torch.bfloat16)

    def srms(t):
        return t / (t.norm(dim=-1, keepdim=True) / t.shape[-1] ** 0.5 + 1e-8)

    x = rnd(M, 4096, scale=5.0)
    for name, kw in (("qkvu", {}), ("l12", {})):
        w = rnd(*SHAPES_7B[name], scale=0.02)
        got = backend.fused_linear(x, w, norm=True, **kw)
        assert rel_err(got.double(), srms(x.double()) @ w.double().T) < 4e-3, name
    qkvu = rnd(M, 16384)
    o, u = rnd(M, 4096, scale=3.0), qkvu[:, 12288:]
    w, r = rnd(4096, 4096, scale=0.02), rnd(M, 4096)
    want = r.double() + (u.double() * srms(o.double())) @ w.double().T
    got = backend.fused_linear(o, w, norm=True, gate=u, residual=r)
    assert got.data_ptr() == r.data_ptr() and rel_err(got.double(), want) < 4e-3
    ab, w, r = rnd(M, 2 * 11008), rnd(4096, 11008, scale=0.02), rnd(M, 4096)
    want = r.double() + (ab[:, :11008].double() * ab[:, 11008:].double()) @ w.double().T
    got = backend.fused_linear(ab, w, gated=True, residual=r)
    assert rel_err(got.double(), want) < 4e-3
    if torch.cuda.get_device_capability() == (9, 0) and backend.config.fused_decode == "auto":
        used = backend.fused_decode_ok(x, [rnd(16384, 4096), rnd(4096, 4096), rnd(22016, 4096), rnd(4096, 11008)])
        assert used == (M <= backend.config.fused_decode_max_rows), "the sm_90 table covers the 7B layer"


def test_engine_with_skinny_gemm_is_as_accurate_as_cublas(backend):
    """A 7B-wide, 2-layer model through the CUDA-graph engine in bf16, once with the skinny GEMM
    (split-K, the fused GLU gate) and once with cuBLAS only, each against the
    same model in float32 on the CPU: the skinny path's logprob error is no larger than cuBLAS's."""
    import copy
    from tnl.engine import LLMEngine, SamplingParams
    cfg = tiny_config(vocab_size=64000, decoder_embed_dim=4096, hidden_dim=4096, decoder_attention_heads=32,
                      decoder_layers=2, glu_dim=11008, linear_use_lrpe_list=[1, 0])
    with torch.device("meta"):
        m32 = TransnormerForCausalLM(ModelConfig.from_dict(cfg))
    m32 = m32.to_empty(device=DEV)
    for layer in m32.model.layers:
        layer.token_mixer.reset_decay(m32.config, DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    with torch.no_grad():
        for p in m32.parameters():
            p.copy_((torch.randn(p.shape, device=DEV, generator=gen) * 0.02).to(torch.bfloat16))
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    m32 = m32.cpu()          # the float32 reference runs the plain PyTorch path on the CPU
    for m in (m32, m16):
        for layer in m.model.layers:
            layer.token_mixer.reset_decay(m.config, m.head_weight.device)
    prompts = [torch.randint(3, 64000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 70, 1)]
    sp = SamplingParams(max_tokens=8, temperature=0, logprobs=5, ignore_eos=True)

    def run(m):
        eng = LLMEngine(m, None, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
        reqs = [eng.add_request(p, sp) for p in prompts]
        while eng.has_work:
            eng.step()
        return [eng.final_output(r).outputs[0] for r in reqs]

    def error(outs, ref):
        """Largest logprob difference on the reference's tokens, up to the first divergence."""
        worst = 0.0
        for o, r in zip(outs, ref):
            for i, (a, b) in enumerate(zip(o.token_ids, r.token_ids)):
                worst = max(worst, abs(o.logprobs[i].get(b, -1e9) - r.logprobs[i][b]))
                if a != b:
                    break
        return worst

    if backend.gemm is None:
        pytest.skip("no tuned skinny-GEMM table for this GPU")
    ref = run(m32)
    m16.backend = backend
    fast = run(m16)
    m16.backend = Backend(KernelConfig(skinny_gemm="off"), DEV)
    slow = run(m16)
    e_fast, e_slow = error(fast, ref), error(slow, ref)
    assert e_fast <= 1.5 * e_slow + 0.02, (e_fast, e_slow)
    assert all(len(o.token_ids) == 8 for o in fast)
