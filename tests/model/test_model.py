"""The native model against the naive float64 reference, on random tiny checkpoints."""
from __future__ import annotations

import pytest
import torch

from reference import reference_logits, rel_err
from helpers_model import random_state_dict, tiny_config
from tnl.config import ModelConfig
from tnl.kernels.backend import Backend
from tnl.kernels.config import KernelConfig
from tnl.model.transnormer import AttnBatch, TransnormerForCausalLM

TOL = 2e-5  # float32 against float64


def build(cfg: dict, sd: dict, backend: Backend | None = None) -> TransnormerForCausalLM:
    """A model from an official-layout state dict (l1 / l2 load into l12)."""
    m = TransnormerForCausalLM(ModelConfig.from_dict(cfg), backend=backend)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def prefill(m, pools, slot, ids, start=0):
    b = AttnBatch.build([], [(slot, start, len(ids))], "cpu")
    with torch.no_grad():
        return m.logits(m(torch.tensor(ids), b, pools))


def decode(m, pools, slot, tok, pos):
    b = AttnBatch.build([(slot, pos)], [], "cpu")
    with torch.no_grad():
        return m.logits(m(torch.tensor([tok]), b, pools))


VARIANTS = {
    "lrpe-theta": dict(cfg={}, theta_scale=0.37),
    "untied": dict(cfg={"tie_word_embeddings": False}),
    "bias": dict(cfg={"bias": True}),
    "heads-3": dict(cfg={"decoder_attention_heads": 3, "hidden_dim": 48}),
    "heads-6-lrpe-all": dict(cfg={"decoder_attention_heads": 6, "linear_use_lrpe_list": [1, 1, 1]}),
    "no-scale-hidden-differs": dict(cfg={"no_scale_embedding": True, "hidden_dim": 32, "glu_dim": -1}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("n", [1, 255, 256, 257, 700])
def test_prefill_matches_reference(variant, n):
    v = VARIANTS[variant]
    cfg = tiny_config(**v["cfg"])
    sd = random_state_dict(cfg, seed=n, theta_scale=v.get("theta_scale", 1.0))
    m = build(cfg, sd)
    ids = torch.randint(0, cfg["vocab_size"], (n,), generator=torch.Generator().manual_seed(n)).tolist()
    pools = m.new_state_pool(2)
    # every position's logits: hidden states of the whole chunk
    b = AttnBatch.build([], [(1, 0, n)], "cpu")
    with torch.no_grad():
        got = m.logits(m(torch.tensor(ids), b, pools))
    want = reference_logits(sd, cfg, ids)
    assert rel_err(got, want) < TOL
    assert pools[0][0].abs().max() == 0, "slot 0 must stay untouched"


@pytest.mark.parametrize("split", [1, 17, 256, 300])
def test_prefill_then_decode_equals_one_prefill(split):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=3, theta_scale=2.0)
    m = build(cfg, sd)
    ids = torch.randint(3, cfg["vocab_size"], (320,), generator=torch.Generator().manual_seed(1)).tolist()
    want = reference_logits(sd, cfg, ids)
    pools = m.new_state_pool(1)
    rows = [prefill(m, pools, 0, ids[:split])[-1]]
    for pos in range(split, min(split + 12, len(ids))):
        rows.append(decode(m, pools, 0, ids[pos], pos)[0])
    got = torch.stack(rows)
    assert rel_err(got, want[split - 1:split - 1 + len(rows)]) < TOL


def test_prefill_a_then_b_equals_prefill_ab():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=5, theta_scale=0.5)
    m = build(cfg, sd)
    ids = torch.randint(3, cfg["vocab_size"], (600,), generator=torch.Generator().manual_seed(2)).tolist()
    p1, p2 = m.new_state_pool(1), m.new_state_pool(1)
    whole = prefill(m, p1, 0, ids)
    prefill(m, p2, 0, ids[:333])
    tail = prefill(m, p2, 0, ids[333:], start=333)
    assert rel_err(tail, whole[333:]) < TOL
    for a, b in zip(p1, p2):
        assert rel_err(b, a) < TOL


def test_mixed_batch_decode_and_prefill_equals_separate():
    """One packed step with decode tokens and prompt chunks of several sequences equals running
    each sequence alone: the state pool keeps sequences apart."""
    cfg = tiny_config(decoder_attention_heads=3)
    sd = random_state_dict(cfg, seed=7)
    m = build(cfg, sd)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, 400, (40,), generator=g).tolist()
    b = torch.randint(3, 400, (300,), generator=g).tolist()
    c = torch.randint(3, 400, (7,), generator=g).tolist()
    pools = m.new_state_pool(4)
    prefill(m, pools, 2, a[:-1])           # a is running, next token a[-1]
    batch = AttnBatch.build([(2, len(a) - 1)], [(0, 0, len(b)), (3, 0, len(c))], "cpu")
    with torch.no_grad():
        h = m(torch.tensor([a[-1]] + b + c), batch, pools)
        got = m.logits(h[[0, len(b), len(b) + len(c)]])
    want = torch.stack([reference_logits(sd, cfg, x)[-1] for x in (a, b, c)])
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("variant", ["lrpe-theta", "bias", "heads-3"])
def test_fused_decode_layers_match_reference(variant):
    """The fused decode layer (each norm and residual add inside a matmul: Backend.fused_linear,
    one skinny-GEMM launch each on CUDA, the same math in PyTorch here), forced on with
    fused_decode "on", against the float64 reference: decode steps of two sequences in one
    batch, then a mixed batch with a short prompt chunk."""
    v = VARIANTS[variant]
    cfg = tiny_config(**v["cfg"])
    sd = random_state_dict(cfg, seed=11, theta_scale=v.get("theta_scale", 1.0))
    m = build(cfg, sd, Backend(KernelConfig(fused_decode="on")))
    x = torch.zeros(2, m.config.d_model)
    assert m.backend.block_ops(x, m.model.layers[0].matmul_weights()).fused
    assert not Backend().block_ops(x, m.model.layers[0].matmul_weights()).fused   # auto: no kernel here
    g = torch.Generator().manual_seed(4)
    a = torch.randint(3, cfg["vocab_size"], (30,), generator=g).tolist()
    b = torch.randint(3, cfg["vocab_size"], (25,), generator=g).tolist()
    pools = m.new_state_pool(3)
    prefill(m, pools, 0, a[:20])
    prefill(m, pools, 2, b[:20])
    rows_a, rows_b = [], []
    for pos in range(20, 25):
        batch = AttnBatch.build([(0, pos), (2, pos)], [], "cpu")
        with torch.no_grad():
            lg = m.logits(m(torch.tensor([a[pos], b[pos]]), batch, pools))
        rows_a.append(lg[0])
        rows_b.append(lg[1])
    assert rel_err(torch.stack(rows_a), reference_logits(sd, cfg, a)[20:25]) < TOL
    assert rel_err(torch.stack(rows_b), reference_logits(sd, cfg, b)[20:25]) < TOL
    c = a[25:]     # slot 1: a 5-token prompt next to a decode token of a
    batch = AttnBatch.build([(0, 25)], [(1, 0, len(c))], "cpu")
    with torch.no_grad():
        lg = m.logits(m(torch.tensor([a[25]] + c), batch, pools))
    assert rel_err(lg[0], reference_logits(sd, cfg, a)[25]) < TOL
    assert rel_err(lg[1:], reference_logits(sd, cfg, c)) < TOL


def test_state_shapes_and_size():
    cfg = ModelConfig.from_dict(tiny_config())
    assert cfg.state_shapes()[0] == (4, 24, 12) and cfg.state_shapes()[1] == (4, 12, 12)
    seven_b = ModelConfig.from_dict(tiny_config(vocab_size=64000, decoder_embed_dim=4096, hidden_dim=4096,
                                                decoder_layers=30, decoder_attention_heads=32, glu_dim=11008,
                                                linear_use_lrpe_list=[1] + [0] * 29))
    assert abs(seven_b.state_bytes() / 1e6 - 65.01) < 0.01
    assert abs(seven_b.num_params() / 1e9 - 6.8367) < 0.001


def test_forward_train_matches_reference():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=9, theta_scale=1.3)
    m = build(cfg, sd)
    ids = torch.randint(3, 400, (2, 70), generator=torch.Generator().manual_seed(4))
    got = m.forward_train(ids)
    for b in range(2):
        assert rel_err(got[b].detach(), reference_logits(sd, cfg, ids[b].tolist())) < TOL
