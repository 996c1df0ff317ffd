"""8-bit weights (--quantization) and a 16-bit state (--state-dtype) on the CPU: the quantizer,
the PyTorch 8-bit matmul, a quantized model and 16-bit state decode against the float64
reference, and the errors for what cannot run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from reference import reference_logits, rel_err
from tnl.config import EngineConfig, ModelConfig
from tnl.kernels.backend import Backend
from tnl.kernels.config import KernelConfig
from tnl.kernels.quant import QuantLinear, QuantWeight, dequantize, linear_torch, quantize, quantize_model
from tnl.model.transnormer import AttnBatch, TransnormerForCausalLM

CFG = tiny_config()
SD = random_state_dict(CFG, seed=1)
IDS = torch.randint(3, CFG["vocab_size"], (600,), generator=torch.Generator().manual_seed(0)).tolist()


def build(quantization: str = "none", backend: Backend | None = None) -> TransnormerForCausalLM:
    m = TransnormerForCausalLM(ModelConfig.from_dict(CFG), backend=backend)
    m.load_state_dict(SD, strict=True)
    return quantize_model(m.eval(), quantization)


@pytest.fixture(scope="module")
def ref() -> torch.Tensor:
    return reference_logits(SD, CFG, IDS)      # [600, V] float64


# ---- the quantizer --------------------------------------------------------------------------
def test_int8_round_trip_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 33, generator=g) * torch.logspace(-3, 1, 70).view(-1, 1)   # rows of very different scales
    w[5] = 0.0
    q, s = quantize(w, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (70,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[torch.arange(70) != 5] == 127).all()   # each row's max hits 127
    back = dequantize(q, s)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(back[5], torch.zeros(33))                                     # an all-zero row stays zero
    assert torch.equal(quantize(back, "int8")[0], q)                                   # idempotent on its own grid


def test_fp8_round_trip_keeps_three_mantissa_bits():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    q, s = quantize(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    back = dequantize(q, s)
    amax = w.abs().amax(dim=1, keepdim=True)
    # e4m3: relative spacing 2^-3 (half of it as rounding error) above its smallest normal (2^-6 of 448 / 448 ~ amax/2^15)
    assert ((back - w).abs() <= w.abs() / 16 + amax * 2 ** -15).all()
    assert (back.abs().amax(dim=1, keepdim=True) - amax).abs().max() <= 1e-6 * amax.max()


@pytest.mark.parametrize("rows", [4096, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_torch_equals_linear_of_the_dequantized_matrix(rows, bias):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(30, 16, generator=g), torch.randn(5, 16, generator=g)
    b = torch.randn(30, generator=g) if bias else None
    q, s = quantize(w, "int8")
    out = linear_torch(x, QuantWeight(q, s, torch.float32), b, rows=rows)   # rows=7: W in blocks of 7 rows
    assert rel_err(out, F.linear(x.double(), dequantize(q, s).double(), None if b is None else b.double())) < 1e-6


def test_quantize_model_replaces_the_layer_matrices_only():
    m = build("int8")
    for layer in m.model.layers:
        for lin in (layer.token_mixer.qkvu_proj, layer.token_mixer.out_proj, layer.channel_mixer.l12,
                    layer.channel_mixer.l3):
            assert isinstance(lin, QuantLinear) and lin.qweight.dtype == torch.int8
    assert m.model.embed_tokens.weight.dtype == torch.float32 and m.quantization == "int8"


# ---- a quantized model against the float64 reference ----------------------------------------
INT8_BOUND = 1.5e-2      # measured 6.1e-3 (relative error of all 600 positions' logits); float32 is 2e-7


@pytest.mark.parametrize("fused", ["off", "on"])
def test_int8_model_logits_within_bound(ref, fused):
    """Prefill then decode (fused "on" runs every matmul through Backend.fused_linear's 8-bit branch)."""
    m = build("int8", Backend(KernelConfig(fused_decode=fused)))
    pools = m.new_state_pool(2)
    with torch.no_grad():
        pre = m.logits(m(torch.tensor(IDS[:500]), AttnBatch.build([], [(1, 0, 500)], "cpu"), pools))
        dec = [m.logits(m(torch.tensor([t]), AttnBatch.build([(1, 500 + i)], [], "cpu"), pools))
               for i, t in enumerate(IDS[500:])]
    lg = torch.cat([pre] + dec)
    err = rel_err(lg, ref)
    assert 1e-4 < err < INT8_BOUND, err      # above float noise (it is quantized), within the bound
    # greedy choices mostly agree with the float model's
    assert (lg.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


# ---- a 16-bit state against the float64 reference -------------------------------------------
# Relative error of the logits of each position range, decoding token by token (the state rounded
# after every token). Measured: bfloat16 1.1e-3, 2.6e-3, 5.1e-3, 9.8e-3; float16 1.4e-4, 3.4e-4,
# 6.6e-4, 9.7e-4; float32 <= 2e-6. The rounding error grows with length; the bounds are ~3x.
RANGES = [(0, 16), (16, 64), (64, 256), (256, 600)]
STATE_BOUNDS = {torch.float32: [1e-5, 1e-5, 1e-5, 1e-5], torch.bfloat16: [4e-3, 8e-3, 1.5e-2, 3e-2],
                torch.float16: [5e-4, 1e-3, 2e-3, 3e-3]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_16bit_state_decode_against_reference(ref, dtype):
    m = build()
    pools = m.new_state_pool(3, dtype=dtype)
    with torch.no_grad():
        lg = torch.cat([m.logits(m(torch.tensor([t]), AttnBatch.build([(2, i)], [], "cpu"), pools))
                        for i, t in enumerate(IDS)])
    assert all(p.dtype == dtype for p in pools)
    errs = [rel_err(lg[a:b], ref[a:b]) for a, b in RANGES]
    assert all(e < bound for e, bound in zip(errs, STATE_BOUNDS[dtype])), errs
    if dtype != torch.float32:
        assert errs[-1] > 1e-5      # the state really is stored rounded
    assert torch.equal(pools[0][0], torch.zeros_like(pools[0][0]))    # other slots untouched


def test_16bit_state_prefill_rounds_once_per_chunk(ref):
    """Prompt chunks accumulate in float32 and round the state only when they write it back."""
    m = build()
    pools = m.new_state_pool(1, dtype=torch.bfloat16)
    with torch.no_grad():
        lg = torch.cat([m.logits(m(torch.tensor(IDS[a:a + 100]), AttnBatch.build([], [(0, a, 100)], "cpu"), pools))
                        for a in range(0, 600, 100)])
    assert rel_err(lg, ref) < 3e-3      # measured 6e-4 with 6 roundings (vs 9.8e-3 after 600 of them)


def test_state_bytes_and_slots_follow_the_state_dtype():
    mc = ModelConfig.from_dict(CFG)
    assert mc.state_bytes("bfloat16") * 2 == mc.state_bytes() == mc.state_bytes("float32")
    assert mc.state_bytes("float16") == mc.state_bytes("bfloat16")
    with pytest.raises(ValueError, match="state_dtype 'int8'"):
        mc.state_bytes("int8")
    with pytest.raises(ValueError, match="expected one of float32, bfloat16, float16"):
        EngineConfig(state_dtype="float64")


# ---- what cannot run: clear errors --------------------------------------------------------------
def test_llm_refuses_what_it_cannot_run():
    from tnl import LLM
    with pytest.raises(ValueError, match="fp8.*compute capability 8.9.*cpu.*int8"):
        LLM("demo", device="cpu", quantization="fp8", progress=False)
    with pytest.raises(ValueError, match="quantization 'int4': expected one of none, int8, fp8"):
        LLM("demo", device="cpu", quantization="int4", progress=False)
    with pytest.raises(ValueError, match="state_dtype 'int8'"):
        LLM("demo", device="cpu", state_dtype="int8", progress=False)


def _tnl(*args):
    return subprocess.run([sys.executable, "-m", "tnl.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_cli_refuses_what_it_cannot_run():
    r = _tnl("generate", "--device", "cpu", "--quantization", "fp8", "hello")
    assert r.returncode == 1 and "error: quantization 'fp8' needs a CUDA GPU" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _tnl("generate", "--quantization", "int4", "hello")
    assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr, r.stderr
    r = _tnl("bench", "--state-dtype", "float64")
    assert r.returncode == 2 and "invalid choice: 'float64'" in r.stderr, r.stderr


def test_cli_generates_with_int8_and_a_16bit_state(tmp_path):
    """The flags reach the engine and it generates (-v logs the engine's state dtype)."""
    import json
    args = ["-v", "generate", "--device", "cpu", "--temperature", "0", "--max-tokens", "12", "--ignore-eos",
            "--json", "Hello", "--quantization", "int8", "--state-dtype", "bfloat16"]
    r = _tnl(*args)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 12
    assert "quantized the layer matrices to int8" in r.stderr and "bfloat16), token budget" in r.stderr


def test_loaded_checkpoint_quantizes_at_load(tmp_path, ref):
    from tnl.model.weights import load_model
    path = write_checkpoint(str(tmp_path / "ckpt"), CFG, SD)
    m = load_model(path, device="cpu", quantization="int8", progress=False)
    assert isinstance(m.model.layers[0].channel_mixer.l12, QuantLinear)
    with torch.no_grad():
        lg = m.logits(m(torch.tensor(IDS), AttnBatch.build([], [(0, 0, len(IDS))], "cpu"), m.new_state_pool(1)))
    assert rel_err(lg, ref) < INT8_BOUND
