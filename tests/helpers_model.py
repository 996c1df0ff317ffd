"""Tiny random checkpoints with the official names and layout, written on the fly."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def tiny_config(**over) -> dict:
    """An official-style config.json dict for a tiny model (overridable)."""
    cfg = {
        "model_type": "transnormer",
        "architectures": ["TransnormerForCausalLM"],
        "vocab_size": 400,
        "decoder_embed_dim": 48,
        "hidden_dim": 48,
        "decoder_layers": 3,
        "decoder_attention_heads": 4,
        "glu_dim": 80,
        "linear_use_lrpe_list": [1, 0, 0],
        "no_scale_embedding": False,
        "bias": False,
        "norm_type": "simplermsnorm",
        "linear_act_fun": "silu",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "init_std": 0.02,
        "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.08, theta_scale: float = 1.0) -> dict:
    """Random weights under the official names. std is larger than the official init so that
    random tiny models have peaked, non-tied distributions (greedy tests are meaningful).
    theta_scale != 1 gives a non-default LRPE theta (it is a trained parameter)."""
    g = torch.Generator().manual_seed(seed)
    d, L, H = cfg["decoder_embed_dim"], cfg["decoder_layers"], cfg["decoder_attention_heads"]
    hid = cfg.get("hidden_dim", d)
    glu = cfg.get("glu_dim", -1)
    glu = d if glu == -1 else glu
    V = cfg["vocab_size"]
    bias = cfg.get("bias", False)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    sd = {"model.embed_tokens.weight": torch.randn(V, d, generator=g) * 0.5}
    lrpe = cfg.get("linear_use_lrpe_list") or [0] * L
    for i in range(L):
        p = f"model.layers.{i}."
        shapes = {
            "token_mixer.qkvu_proj": (4 * hid, d),
            "token_mixer.out_proj": (d, hid),
            "channel_mixer.l1": (glu, d),
            "channel_mixer.l2": (glu, d),
            "channel_mixer.l3": (d, glu),
        }
        for name, shape in shapes.items():
            sd[p + name + ".weight"] = r(*shape) * (3.0 if "qkvu" in name else 1.0)
            if bias:
                sd[p + name + ".bias"] = r(shape[0])
        if lrpe[i]:
            D = H * (hid // H)
            theta = (10000 ** (-2 / D * torch.arange(D))).reshape(H, 1, -1) * theta_scale
            sd[p + "token_mixer.lrpe.theta"] = theta.float()
    if cfg.get("tie_word_embeddings", True) is False:
        sd["lm_head.weight"] = torch.randn(V, d, generator=g) * 0.5
    return sd


def write_checkpoint(directory: str, cfg: dict, sd: dict, fmt: str = "safetensors", shards: int = 1,
                     dtype: torch.dtype | None = None) -> str:
    """Write config.json + weights as model.safetensors, sharded safetensors + index,
    pytorch_model.bin, or sharded .bin + index (fmt 'safetensors' | 'bin')."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}
    names = sorted(sd)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def save(part: dict, fname: str):
        if fmt == "safetensors":
            save_file(part, os.path.join(directory, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(directory, fname))

    if shards == 1:
        save(sd, f"{stem}.{ext}")
        return directory
    weight_map = {}
    per = (len(names) + shards - 1) // shards
    for s in range(shards):
        fname = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in names[s * per:(s + 1) * per]}
        save(part, fname)
        weight_map.update({k: fname for k in part})
    with open(os.path.join(directory, f"{stem}.{ext}.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                   "weight_map": weight_map}, f)
    return directory
