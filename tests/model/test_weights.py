"""Checkpoint loading on real files: every layout, tied and untied heads, dtypes, and each way a
checkpoint can be broken (one error that names the problem)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from helpers_model import random_state_dict, tiny_config, write_checkpoint
from reference import reference_logits, rel_err
from tnl.config import ConfigError, ModelConfig
from tnl.model.transnormer import AttnBatch, TransnormerForCausalLM
from tnl.model.weights import (CheckpointError, find_weight_files, load_model, make_random_checkpoint,
                               resolve_device, resolve_dtype, save_checkpoint)

LAYOUTS = {"safetensors": ("safetensors", 1), "safetensors-sharded": ("safetensors", 3),
           "bin": ("bin", 1), "bin-sharded": ("bin", 3)}
VARIANTS = {"tied": {}, "untied": {"tie_word_embeddings": False}, "bias": {"bias": True}}


def assert_params_equal(model: TransnormerForCausalLM, sd: dict, dtype: torch.dtype = torch.float32):
    """The model holds exactly the official-layout tensors `sd` (its state_dict() splits l12 back
    into l1 and l2; l12 itself is checked against them)."""
    params = model.state_dict()
    assert set(params) == set(sd) - {"decoder.version"} - ({"lm_head.weight"} if model.lm_head is None else set())
    for name, p in params.items():
        want = sd[name].float() if name.endswith("lrpe.theta") else sd[name].to(dtype)
        assert p.dtype == want.dtype, name
        assert torch.equal(p, want), name
    for i, layer in enumerate(model.model.layers):
        l12 = layer.channel_mixer.l12.weight
        assert torch.equal(l12, torch.cat([sd[f"model.layers.{i}.channel_mixer.l{j}.weight"] for j in (1, 2)]).to(dtype))
    assert not any(p.requires_grad for p in model.parameters())


def logits_of(model: TransnormerForCausalLM, ids: list[int]) -> torch.Tensor:
    pools = model.new_state_pool(1)
    with torch.no_grad():
        return model.logits(model(torch.tensor(ids), AttnBatch.build([], [(0, 0, len(ids))], "cpu"), pools))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_loads_the_exact_tensors(tmp_path, layout, variant):
    fmt, shards = LAYOUTS[layout]
    cfg = tiny_config(**VARIANTS[variant])
    sd = random_state_dict(cfg, seed=1, theta_scale=0.37)
    write_checkpoint(str(tmp_path), cfg, sd, fmt=fmt, shards=shards)
    if shards > 1:
        assert os.path.exists(tmp_path / f"{'model' if fmt == 'safetensors' else 'pytorch_model'}.{fmt}.index.json")
    m = load_model(str(tmp_path), device="cpu", progress=False)
    assert_params_equal(m, sd)
    assert (m.lm_head is None) == (variant != "untied")
    assert not m.training
    # the computed (non-persistent) decay buffers equal those of a model built normally
    ref = TransnormerForCausalLM(ModelConfig.from_dict(cfg))
    for got, want in zip(m.model.layers, ref.model.layers):
        assert torch.equal(got.token_mixer.slope, want.token_mixer.slope)
        assert torch.equal(got.token_mixer.decay, want.token_mixer.decay)
    assert all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))


def test_loaded_model_matches_float64_reference(tmp_path):
    cfg = tiny_config(tie_word_embeddings=False)
    sd = random_state_dict(cfg, seed=7, theta_scale=1.7)
    write_checkpoint(str(tmp_path), cfg, sd, shards=2)
    ids = torch.randint(0, cfg["vocab_size"], (70,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference_logits(sd, cfg, ids)
    assert rel_err(logits_of(load_model(str(tmp_path), "cpu", progress=False), ids), want) < 2e-5
    # bf16 weights: rounding only (a wrong or misplaced tensor gives an error of order 1)
    assert rel_err(logits_of(load_model(str(tmp_path), "cpu", "bf16", progress=False), ids), want) < 5e-2


def test_safetensors_preferred_over_bin(tmp_path):
    cfg = tiny_config()
    good = random_state_dict(cfg, seed=1)
    write_checkpoint(str(tmp_path), cfg, random_state_dict(cfg, seed=2), fmt="bin", shards=2)
    write_checkpoint(str(tmp_path), cfg, good, fmt="safetensors")
    assert find_weight_files(str(tmp_path)).fmt == "safetensors"
    assert_params_equal(load_model(str(tmp_path), "cpu", progress=False), good)


def test_decoder_version_is_ignored(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg) | {"decoder.version": torch.tensor([3.0])}
    write_checkpoint(str(tmp_path), cfg, sd)
    assert_params_equal(load_model(str(tmp_path), "cpu", progress=False), sd)


def test_tied_checkpoint_with_saved_head(tmp_path, caplog):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    write_checkpoint(str(tmp_path / "same"), cfg, sd)
    with caplog.at_level(logging.DEBUG, logger="tnl.model.weights"):
        m = load_model(str(tmp_path / "same"), "cpu", progress=False)
    assert m.lm_head is None and m.head_weight is m.model.embed_tokens.weight
    assert_params_equal(m, sd)
    assert "lm_head.weight equals the embedding" in caplog.text
    load_model(str(tmp_path / "same"), "cpu", "bf16", progress=True)  # compared after rounding alike
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # a head that differs is still ignored (tied means tied, as in Hugging Face) but warned about
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    write_checkpoint(str(tmp_path / "differs"), cfg, sd, fmt="bin")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tnl.model.weights"):
        m = load_model(str(tmp_path / "differs"), "cpu", progress=False)
    assert m.lm_head is None
    assert any("lm_head.weight differs" in r.getMessage() for r in caplog.records)


def test_dtypes(tmp_path, caplog):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    write_checkpoint(str(tmp_path), cfg, sd)
    assert_params_equal(load_model(str(tmp_path), "cpu", "auto", progress=False), sd, torch.float32)
    m = load_model(str(tmp_path), "cpu", "bfloat16", progress=False)
    assert_params_equal(m, sd, torch.bfloat16)
    assert m.model.layers[0].token_mixer.lrpe.theta.dtype == torch.float32  # angles keep their precision
    with caplog.at_level(logging.WARNING, logger="tnl.model.weights"):
        assert_params_equal(load_model(str(tmp_path), "cpu", "float16", progress=False), sd, torch.float16)
    assert any("fp16" in r.getMessage() and "bfloat16" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="choose one of.*bfloat16"):
        load_model(str(tmp_path), "cpu", "int8", progress=False)


def test_resolve_dtype_and_device(caplog):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_dtype("fp32", "cpu") == resolve_dtype("float", "cpu") == torch.float32
    with caplog.at_level(logging.WARNING, logger="tnl.model.weights"):
        assert resolve_dtype("half", "cpu") == torch.float16
    assert "overflows" in caplog.text
    for bad in ("float64", "", "bf8", torch.int8, 16):
        with pytest.raises(ValueError, match="choose one of"):
            resolve_dtype(bad, "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="bad device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_bad_device_string(tmp_path):
    write_checkpoint(str(tmp_path), tiny_config(), random_state_dict(tiny_config()))
    with pytest.raises(ValueError, match="bad device"):
        load_model(str(tmp_path), device="nonsense", progress=False)


# ---- broken checkpoints -------------------------------------------------------------------------------
def broken(tmp_path, edit=None, cfg_over=None, **write_kw):
    cfg = tiny_config(**(cfg_over or {}))
    sd = random_state_dict(tiny_config())
    if edit:
        edit(sd)
    write_checkpoint(str(tmp_path), cfg, sd, **write_kw)
    return str(tmp_path)


def load_error(path, kind=CheckpointError) -> str:
    with pytest.raises(kind) as e:
        load_model(path, "cpu", progress=False)
    return str(e.value)


def test_missing_tensor(tmp_path):
    msg = load_error(broken(tmp_path, lambda sd: sd.pop("model.layers.1.channel_mixer.l2.weight")))
    assert "missing tensors (1)" in msg and "model.layers.1.channel_mixer.l2.weight [80, 48]" in msg


def test_unexpected_tensor(tmp_path):
    msg = load_error(broken(tmp_path, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)})))
    assert "unexpected tensors (1)" in msg and "model.layers.0.extra.weight [2]" in msg


def test_wrong_shape(tmp_path):
    msg = load_error(broken(tmp_path, lambda sd: sd.update({"model.layers.2.token_mixer.out_proj.weight":
                                                            torch.zeros(48, 40)})))
    assert "wrong shapes (1)" in msg
    assert "model.layers.2.token_mixer.out_proj.weight: expected [48, 48], found [48, 40]" in msg


def test_all_problems_in_one_error(tmp_path):
    def edit(sd):
        sd.pop("model.embed_tokens.weight")
        sd["bogus"] = torch.zeros(1)
        sd["model.layers.0.token_mixer.lrpe.theta"] = torch.zeros(4, 1, 6)
    msg = load_error(broken(tmp_path, edit, shards=2))
    for part in ("missing tensors", "model.embed_tokens.weight", "unexpected tensors", "bogus",
                 "wrong shapes", "lrpe.theta: expected [4, 1, 12], found [4, 1, 6]"):
        assert part in msg


def test_untied_config_without_head(tmp_path):
    msg = load_error(broken(tmp_path, cfg_over={"tie_word_embeddings": False}))
    assert "lm_head.weight [400, 48]" in msg and '"tie_word_embeddings": false' in msg


def test_bias_checkpoint_with_bias_false_config(tmp_path):
    path = str(tmp_path)
    write_checkpoint(path, tiny_config(), random_state_dict(tiny_config(bias=True)))
    msg = load_error(path)
    assert "unexpected tensors (15)" in msg and "model.layers.0.token_mixer.qkvu_proj.bias" in msg


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_names_a_missing_shard(tmp_path, fmt):
    path = broken(tmp_path, fmt=fmt, shards=3)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    os.remove(os.path.join(path, f"{stem}-00002-of-00003.{fmt}"))
    msg = load_error(path)
    assert f"{stem}.{fmt}.index.json" in msg and f"{stem}-00002-of-00003.{fmt}" in msg and "not in" in msg


def test_shards_without_index(tmp_path):
    path = broken(tmp_path, shards=3)
    os.remove(os.path.join(path, "model.safetensors.index.json"))
    assert_params_equal(load_model(path, "cpu", progress=False), random_state_dict(tiny_config()))
    os.remove(os.path.join(path, "model-00003-of-00003.safetensors"))
    assert "model-00003-of-00003.safetensors" in load_error(path)


def test_corrupt_index(tmp_path):
    path = broken(tmp_path, shards=2)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write('{"metadata": {}, "weight_')
    assert "model.safetensors.index.json: not a valid index file" in load_error(path)


@pytest.mark.parametrize("fmt,keep", [("safetensors", 0.6), ("safetensors", 0.0001), ("bin", 0.5)])
def test_truncated_file(tmp_path, fmt, keep):
    path = broken(tmp_path, fmt=fmt)
    name = os.path.join(path, "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = open(name, "rb").read()
    with open(name, "wb") as f:
        f.write(data[:max(1, int(len(data) * keep))])
    msg = load_error(path)
    assert name in msg and "truncated" in msg


def test_no_weight_files(tmp_path):
    path = broken(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    (tmp_path / "README.md").write_text("hi")
    msg = load_error(path)
    assert "no weight files" in msg and "model.safetensors" in msg and "README.md" in msg


def test_not_a_directory(tmp_path):
    assert "not a directory" in load_error(str(tmp_path / "nowhere"))


def test_config_missing(tmp_path):
    path = broken(tmp_path)
    os.remove(os.path.join(path, "config.json"))
    assert "no config.json" in load_error(path, ConfigError)


def test_config_missing_key(tmp_path):
    path = broken(tmp_path)
    cfg = tiny_config()
    del cfg["decoder_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "'decoder_layers'" in load_error(path, ConfigError)


def test_config_key_of_wrong_type(tmp_path):
    path = broken(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(decoder_attention_heads="4")))
    msg = load_error(path, ConfigError)
    assert "'decoder_attention_heads'" in msg and "int" in msg


# ---- writing checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": False, "bias": True}])
def test_save_checkpoint_round_trip_in_the_official_layout(tmp_path, over):
    cfg = tiny_config(**over)
    sd = random_state_dict(cfg, seed=4, theta_scale=0.5)
    m = TransnormerForCausalLM(ModelConfig.from_dict(cfg))
    m.load_state_dict(sd, strict=True)     # official l1 / l2 stacked into l12
    assert not any(".l1." in n or ".l2." in n for n, _ in m.named_parameters())
    save_checkpoint(m, str(tmp_path))       # and split back into the official names
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(sd)
    assert find_weight_files(str(tmp_path)).files == [str(tmp_path / "model.safetensors")]
    assert_params_equal(load_model(str(tmp_path), "cpu", progress=False), sd)
    save_checkpoint(m, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_params_equal(load_model(str(tmp_path / "bf16"), "cpu", progress=False), {
        k: v if k.endswith("theta") else v.to(torch.bfloat16) for k, v in sd.items()})


@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": False, "bias": True}])
def test_make_random_checkpoint_shards_and_loads(tmp_path, over):
    cfg = tiny_config(**over)
    limit = 40_000
    make_random_checkpoint(str(tmp_path), cfg, dtype=torch.bfloat16, seed=3, max_shard_bytes=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    biggest_tensor = 400 * 48 * 2
    for s in shards:  # each shard holds at most ~limit bytes (or one bigger tensor alone)
        assert os.path.getsize(tmp_path / s) < max(limit, biggest_tensor) + 4096
    m = load_model(str(tmp_path), "cpu", "auto", progress=False)
    mcfg = ModelConfig.from_dict(cfg)
    assert sum(p.numel() for p in m.parameters()) == mcfg.num_params()
    assert index["metadata"]["total_size"] == sum(
        p.numel() * (4 if n.endswith("theta") else 2) for n, p in m.named_parameters())
    w = m.model.layers[1].channel_mixer.l12.weight
    assert w.dtype == torch.float32 and abs(w.std().item() - 0.02) < 0.002
    theta = m.model.layers[0].token_mixer.lrpe.theta
    assert torch.equal(theta, random_state_dict(cfg)["model.layers.0.token_mixer.lrpe.theta"])
    if over.get("bias"):
        assert m.model.layers[0].token_mixer.qkvu_proj.bias.abs().max() == 0
    # deterministic in the seed
    make_random_checkpoint(str(tmp_path / "again"), cfg, dtype=torch.bfloat16, seed=3, max_shard_bytes=limit)
    again = load_model(str(tmp_path / "again"), "cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
