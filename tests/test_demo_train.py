"""The demo model's pipeline end to end on a tiny corpus: demo/prepare_data.py over a fake fortune
directory laid out as Debian's, then demo/train.py for a few steps of a tiny config into a tmp dir.

Runs the real scripts as a user would (subprocesses, real files), then reads what they wrote with
tnl's own config parser and safetensors.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jinja2
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from tnl.config import ModelConfig
from tnl.model.transnormer import expected_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "demo")

EN_WORDS = ("the quick brown fox jumps over lazy dog while wise old owls watch quietly and "
            "every good program deserves a careful test before it ships to users who wonder").split()
ZH_CHARS = "春眠不觉晓处闻啼鸟夜来风雨声花落知多少床前明月光疑是地上霜举头望低思故乡白日依山尽黄河入海流"


def load_demo_module(name: str):
    if DEMO not in sys.path:
        sys.path.insert(0, DEMO)  # train.py imports prepare_data as the script would
    spec = importlib.util.spec_from_file_location(f"demo_{name}", os.path.join(DEMO, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_fake_fortunes(root: str) -> None:
    """strfile sources as Debian installs them: '%' lines between records, .dat indexes, .u8 links,
    colour codes in the Chinese files, an off/ directory and an excluded file."""
    en = []
    for i in range(240):
        words = [EN_WORDS[(i * 7 + j * 3) % len(EN_WORDS)] for j in range(6 + i % 9)]
        text = " ".join(words).capitalize() + "."
        if i % 5 == 0:
            text += "\n\t\t-- Author Number %d" % i
        if i % 17 == 0:
            text = "_\bI_\bm_\bp_\bo_\br_\bt_\ba_\bn_\bt: " + text  # underlined by overstrike
        en.append(text)
    en.append(en[3])  # a duplicate, to be dropped
    with open(os.path.join(root, "fortunes"), "w", encoding="utf-8") as f:
        f.write("\n%\n".join(en) + "\n%\n")
    zh = []
    for i in range(120):
        line1 = "".join(ZH_CHARS[(i + 3 * j) % len(ZH_CHARS)] for j in range(5))
        line2 = "".join(ZH_CHARS[(2 * i + 5 * j) % len(ZH_CHARS)] for j in range(5))
        zh.append(f"\x1b[32m《诗{i}》\x1b[m\n\x1b[33m作者：某{i}\x1b[m\n{line1}，{line2}。")
    with open(os.path.join(root, "tang300"), "w", encoding="utf-8") as f:
        f.write("\n%\n".join(zh) + "\n%\n")
    with open(os.path.join(root, "fortunes.dat"), "wb") as f:
        f.write(b"\x00\x00\x00\x02binary index")
    os.symlink("fortunes", os.path.join(root, "fortunes.u8"))
    with open(os.path.join(root, "ascii-art"), "w", encoding="utf-8") as f:
        f.write("ASCIIDRAWINGMARKER\n%\n")
    os.makedirs(os.path.join(root, "off"))
    with open(os.path.join(root, "off", "racism"), "w", encoding="utf-8") as f:
        f.write("OFFENSIVEMARKER\n%\n")


def run(args: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    fortunes, data, out = tmp / "fortunes", tmp / "data", tmp / "model"
    fortunes.mkdir()
    write_fake_fortunes(str(fortunes))
    run([os.path.join(DEMO, "prepare_data.py"), "--fortune-dir", str(fortunes), "--out", str(data),
         "--chat-per-lang", "60", "--valid-fraction", "0.05"], timeout=60)
    log = run([os.path.join(DEMO, "train.py"), "--device", "cpu", "--data", str(data), "--out", str(out),
               "--metrics", str(tmp / "metrics.json"), "--steps", "40", "--vocab", "512", "--d-model", "32",
               "--layers", "2", "--heads", "2", "--glu", "64", "--batch", "4", "--seq-len", "64", "--lr", "1e-2",
               "--log-every", "1", "--chat-samples", "1", "--max-new-tokens", "4"], timeout=120)
    with open(tmp / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    return {"data": data, "out": out, "metrics": metrics, "log": log}


def test_prepare_data_cleans_splits_and_excludes(trained):
    prep = load_demo_module("prepare_data")
    data = trained["data"]
    train = prep.read_records_file(str(data / "train.txt"))
    valid = prep.read_records_file(str(data / "valid.txt"))
    text = "\n".join(train + valid)
    assert "OFFENSIVEMARKER" not in text and "ASCIIDRAWINGMARKER" not in text
    assert "%" not in text.split("\n") and "\x1b" not in text and "\b" not in text and "\t" not in text
    assert "Important: " in text                        # overstrike resolved to its letters
    assert "    -- Author Number 0" in text             # attribution normalised
    assert len(train) + len(valid) == 240 + 120         # the duplicate is gone
    assert valid and not set(valid) & set(train)
    with open(data / "chat_train.jsonl", encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == 120
    train_text = "\n".join(train)
    for p in pairs:
        assert p["prompt"] in prep.PROMPTS[p["lang"]]
        assert p["answer"] in train_text and len(p["answer"]) <= 200   # never a held-out record
        if p["lang"] == "zh":
            assert "《" not in p["answer"] and "作者" not in p["answer"]  # a poem line, not its title


def test_outputs_exist_and_config_parses(trained):
    out = trained["out"]
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    cfg = ModelConfig.from_file(str(out))
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.glu_dim) == (32, 2, 2, 64)
    assert cfg.lrpe == (True, False) and cfg.tie_word_embeddings and cfg.eos_token_id == 2
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "unigram" in card and f"{trained['metrics']['perplexity']['model']:.2f}" in card


def test_weights_have_official_names_and_bf16(trained):
    out = trained["out"]
    cfg = ModelConfig.from_file(str(out))
    expected = expected_tensors(cfg)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(expected)
        assert "lm_head.weight" not in keys and "model.layers.0.token_mixer.lrpe.theta" in keys
        assert "model.layers.1.token_mixer.lrpe.theta" not in keys
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[k], k
        assert {"model.embed_tokens.weight", "model.layers.0.token_mixer.qkvu_proj.weight",
                "model.layers.0.token_mixer.out_proj.weight", "model.layers.1.channel_mixer.l1.weight",
                "model.layers.1.channel_mixer.l2.weight", "model.layers.1.channel_mixer.l3.weight"} <= keys


def test_tokenizer_and_chat_files(trained):
    out = trained["out"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    im_start, im_end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    assert sp.encode("<|im_start|>user\nhi<|im_end|>")[0] == im_start
    assert sp.encode("x<|im_end|>")[-1] == im_end
    assert sp.decode(sp.encode("春眠 ✓ never-seen 龘\n  two spaces")) == "春眠 ✓ never-seen 龘\n  two spaces"  # byte fallback
    cfg = ModelConfig.from_file(str(out))
    assert sp.get_piece_size() == cfg.vocab_size
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, im_end]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["add_bos_token"] is True and tok["add_eos_token"] is False

    train = load_demo_module("train")
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好"}]
    rendered = jinja2.Environment().from_string(tok["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    assert rendered == train.render_chat(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_loss_went_down_and_metrics_recorded(trained):
    m = trained["metrics"]
    losses = [loss for _, loss in m["loss"]]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"
    ppl = m["perplexity"]
    assert ppl["model"] > 1 and ppl["unigram"] > 1
    assert m["run"]["steps"] == 40 and set(m["chat"]) == {"你好", "Tell me something", "早安", "Tell me something nice"}


def test_engine_tokenizer_reads_the_demo_files_as_training_did(trained):
    """tnl's own tokenizer, reading the shipped files, builds the same prompt ids that training
    used for the same chat, decodes the answer back, and stops on </s> and <|im_end|>."""
    from tnl.loading import generation_stop_ids
    from tnl.model.tokenizer import Tokenizer

    out, data = trained["out"], trained["data"]
    train = load_demo_module("train")
    tok = Tokenizer.from_dir(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert generation_stop_ids(str(out)) == {2, sp.piece_to_id("<|im_end|>")}
    with open(data / "chat_train.jsonl", encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    for p in pairs:
        msgs = train.chat_messages(p["prompt"], p.get("system"))
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        trained_ids = [sp.bos_id()] + sp.encode(train.chat_text(p)) + [sp.eos_id()]
        assert trained_ids[: len(prompt)] == prompt
        # the answer, then <|im_end|>, the template's "\n" and </s>
        assert trained_ids[-3:] == [sp.piece_to_id("<|im_end|>"), sp.piece_to_id("<0x0A>"), sp.eos_id()]
        assert tok.decode(trained_ids[len(prompt): -3]) == p["answer"]
