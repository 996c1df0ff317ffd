"""Configuration: the model's config.json, parsed and validated, plus engine settings.

A leaf module: imports nothing from tnl and no torch.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields


# The system message that every front end puts before a user's first message when none is given:
# POST / (the tutorial's api.py sends it), `tnl chat`, `tnl generate --chat` and the web page.
# The OpenAI routes and LLM.chat send the messages exactly as given, as OpenAI and vLLM do.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# --quantization: the layer matrices' storage at run time, quantized at load time per output
# channel with float32 scales (the embedding and the head keep the model's dtype); see
# tnl.kernels.quant. fp8 is e4m3 and needs a GPU of compute capability 8.9 or newer.
QUANTIZATIONS = ("none", "int8", "fp8")
# --state-dtype: how the state pool stores each sequence's recurrent state (bytes per element);
# the decode and prefill kernels accumulate in float32 whatever it is.
STATE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_quantization(quantization: str) -> str:
    """`quantization` if it is one of QUANTIZATIONS, else a ValueError naming the choices."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    return quantization


def check_state_dtype(state_dtype: str) -> str:
    """`state_dtype` if it is one of STATE_DTYPES, else a ValueError naming the choices."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype {state_dtype!r}: expected one of {', '.join(STATE_DTYPES)}")
    return state_dtype


class ConfigError(ValueError):
    """A config.json that tnl cannot run; the message names the key."""


def _require(cfg: dict, key: str, kind, where: str):
    if key not in cfg:
        raise ConfigError(f"{where}: missing required key '{key}'")
    value = cfg[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: key '{key}' must be {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one TransNormerLLM checkpoint (official config.json keys).

    vocab_size, d_model (decoder_embed_dim), n_layers (decoder_layers), n_heads
    (decoder_attention_heads), hidden_dim (width of the token mixer; = d_model in the
    released models), glu_dim (-1 in the file means d_model), lrpe (one bool per layer).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    glu_dim: int
    lrpe: tuple[bool, ...]
    scale_embedding: bool = True
    bias: bool = False
    tie_word_embeddings: bool = True  # Hugging Face's default when the key is absent
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    def key_dim(self, layer: int) -> int:
        """Key width of one head's state: doubled on LRPE layers (cos and sin halves)."""
        return 2 * self.head_dim if self.lrpe[layer] else self.head_dim

    def state_shapes(self) -> list[tuple[int, int, int]]:
        """Per layer, the recurrent state of one sequence: [H, dk, dv] (float32 unless the
        engine's state_dtype says otherwise)."""
        return [(self.n_heads, self.key_dim(i), self.head_dim) for i in range(self.n_layers)]

    def state_bytes(self, state_dtype: str = "float32") -> int:
        """One sequence's state, all layers, stored as `state_dtype` (a STATE_DTYPES name)."""
        size = STATE_DTYPES[check_state_dtype(state_dtype)]
        return sum(size * h * k * v for h, k, v in self.state_shapes())

    def num_params(self) -> int:
        d, hid, g, V = self.d_model, self.hidden_dim, self.glu_dim, self.vocab_size
        b = 1 if self.bias else 0
        per_layer = (4 * hid * d + 4 * hid * b) + (d * hid + d * b) + 2 * (g * d + g * b) + (d * g + d * b)
        lrpe = sum(self.n_heads * self.head_dim for i in range(self.n_layers) if self.lrpe[i])
        head = 0 if self.tie_word_embeddings else V * d
        return V * d + self.n_layers * per_layer + lrpe + head

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "config.json") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
        mt = cfg.get("model_type", "transnormer")
        if mt != "transnormer":
            raise ConfigError(f"{where}: key 'model_type' is {mt!r}; tnl runs 'transnormer' models only")
        V = _require(cfg, "vocab_size", int, where)
        d = _require(cfg, "decoder_embed_dim", int, where)
        L = _require(cfg, "decoder_layers", int, where)
        H = _require(cfg, "decoder_attention_heads", int, where)
        for key, val in (("vocab_size", V), ("decoder_embed_dim", d), ("decoder_layers", L),
                         ("decoder_attention_heads", H)):
            if val <= 0:
                raise ConfigError(f"{where}: key '{key}' must be positive, got {val}")
        if L < 2:
            # The per-layer decay is slope * (1 - l/(L-1)): L = 1 divides by zero in the official code.
            raise ConfigError(f"{where}: key 'decoder_layers' is {L}; the layer decay formula needs at least 2 layers")
        hid = cfg.get("hidden_dim", d)
        if not isinstance(hid, int) or isinstance(hid, bool) or hid <= 0:
            raise ConfigError(f"{where}: key 'hidden_dim' must be a positive int, got {hid!r}")
        if hid % H:
            raise ConfigError(f"{where}: key 'hidden_dim' ({hid}) must be divisible by "
                              f"'decoder_attention_heads' ({H})")
        glu = cfg.get("glu_dim", -1)
        if not isinstance(glu, int) or isinstance(glu, bool) or (glu <= 0 and glu != -1):
            raise ConfigError(f"{where}: key 'glu_dim' must be a positive int or -1, got {glu!r}")
        glu = d if glu == -1 else glu
        lrpe_list = cfg.get("linear_use_lrpe_list", [])
        if not isinstance(lrpe_list, list):
            raise ConfigError(f"{where}: key 'linear_use_lrpe_list' must be a list of 0/1, got {lrpe_list!r}")
        if len(lrpe_list) == 0:
            lrpe_list = [int(bool(cfg.get("linear_use_lrpe", 0)))] * L
        if len(lrpe_list) != L:
            raise ConfigError(f"{where}: key 'linear_use_lrpe_list' has {len(lrpe_list)} entries; "
                              f"'decoder_layers' is {L}")
        if any(x not in (0, 1, True, False) for x in lrpe_list):
            raise ConfigError(f"{where}: key 'linear_use_lrpe_list' must hold only 0 or 1, got {lrpe_list!r}")
        norm = cfg.get("norm_type", "simplermsnorm")
        if norm != "simplermsnorm":
            raise ConfigError(f"{where}: key 'norm_type' is {norm!r}; only 'simplermsnorm' is supported")
        act = cfg.get("linear_act_fun", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: key 'linear_act_fun' is {act!r}; only 'silu' is supported")
        tie = cfg.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise ConfigError(f"{where}: key 'tie_word_embeddings' must be true or false, got {tie!r}")

        def opt_id(key, default):
            v = cfg.get(key, default)
            if v is None:
                return None
            if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
                v = v[0]
            if not isinstance(v, int) or isinstance(v, bool) or not (0 <= v < V):
                raise ConfigError(f"{where}: key '{key}' must be a token id in [0, {V}), got {v!r}")
            return v

        return cls(
            vocab_size=V, d_model=d, n_layers=L, n_heads=H, hidden_dim=hid, glu_dim=glu,
            lrpe=tuple(bool(x) for x in lrpe_list),
            scale_embedding=not bool(cfg.get("no_scale_embedding", False)),
            bias=bool(cfg.get("bias", False)),
            tie_word_embeddings=tie,
            pad_token_id=opt_id("pad_token_id", 0),
            bos_token_id=opt_id("bos_token_id", 1),
            eos_token_id=opt_id("eos_token_id", 2),
            torch_dtype=cfg.get("torch_dtype"),
        )

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(cfg, where=path)

    def to_dict(self) -> dict:
        """The official config.json form (what `save_pretrained` would write)."""
        return {
            "model_type": "transnormer",
            "architectures": ["TransnormerForCausalLM"],
            "vocab_size": self.vocab_size,
            "decoder_embed_dim": self.d_model,
            "decoder_layers": self.n_layers,
            "decoder_attention_heads": self.n_heads,
            "hidden_dim": self.hidden_dim,
            "glu_dim": self.glu_dim,
            "linear_use_lrpe_list": [int(x) for x in self.lrpe],
            "no_scale_embedding": not self.scale_embedding,
            "bias": self.bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "norm_type": "simplermsnorm",
            "linear_act_fun": "silu",
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype or "bfloat16",
        }


def alibi_slopes(n_heads: int) -> list[float]:
    """The ALiBi head slopes the official model uses as per-head decay rates."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    below = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(below) + alibi_slopes(2 * below)[0::2][: n_heads - below]


def layer_slopes(cfg: ModelConfig, layer: int) -> list[float]:
    """Decay rate per head on one layer: lambda = exp(-slope)."""
    scale = 1 - layer / (cfg.n_layers - 1) + 1e-5
    return [s * scale for s in alibi_slopes(cfg.n_heads)]


PREFILL_WAVE_MS_CUDA = 20.0   # ~ three 7B decode steps at batch 64 on an H200; a prompt step costs ~30 ms


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. None means 'derive from the device' (see Engine)."""

    max_num_seqs: int | None = None          # state-pool slots
    max_num_batched_tokens: int = 2048       # token budget of one step (decode tokens + prefill chunks)
    max_waiting: int = 256                   # bounded waiting queue
    max_prompt_tokens: int | None = None     # None: no limit besides memory
    cuda_graphs: bool = True
    async_scheduling: bool | None = None    # overlap host work with the next decode step; None: on for CUDA
    enable_prefix_caching: bool = True       # the prompt-state cache (snapshots at exact token boundaries)
    prefix_cache_gb: float | None = None     # its budget; None: half the GPU memory free after the slots, 1 GB on CPU
    prefix_cache_dir: str | None = None      # also write the snapshots there as state files, and load them at start
    prefix_cache_dir_gb: float = 10.0        # that directory's cap: this model's oldest files are deleted beyond it
    state_dtype: str = "float32"             # the state pool's storage (STATE_DTYPES); float32 accumulation always
    # while sequences decode, admit new prompts in waves (Scheduler): once they fill the free slots
    # or the budget, or the oldest waited this long; None: PREFILL_WAVE_MS_CUDA on CUDA, 0 elsewhere
    prefill_wave_ms: float | None = None

    def __post_init__(self):
        check_state_dtype(self.state_dtype)
        w = self.prefill_wave_ms
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 10_000):
            raise ValueError(f"prefill_wave_ms = {w!r}; expected a number of milliseconds in [0, 10000] or None")


def engine_config(**options) -> EngineConfig:
    """The EngineConfig for options that may be None (None keeps the default): the one way the
    CLI, `LLM`, the server and `tnl bench` build it."""
    return EngineConfig(**{k: v for k, v in options.items() if v is not None})
