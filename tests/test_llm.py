"""The offline API and `tnl generate` on a tiny checkpoint with a real SentencePiece tokenizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers_model import random_state_dict, tiny_config
from helpers_tokenizer import build_test_tokenizer
from tnl import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    from helpers_model import write_checkpoint
    cfg = tiny_config(vocab_size=400)
    write_checkpoint(d, cfg, random_state_dict(cfg, seed=21, theta_scale=0.6))
    build_test_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, device="cpu", max_num_seqs=4, max_num_batched_tokens=32)


def test_generate_strings_and_ids(llm):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(["你好", "Hello world", [1, 50, 60, 70]], sp)
    assert len(outs) == 3
    assert outs[0].prompt == "你好" and outs[0].prompt_token_ids == llm.tokenizer.encode("你好")
    assert outs[2].prompt_token_ids == [1, 50, 60, 70]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 12 and c.finish_reason == "length"
        assert c.text == llm.tokenizer.decode(c.token_ids) or "\ufffd" not in c.text


def test_batch_equals_one_at_a_time_and_repeatable(llm):
    prompts = ["你好", "Hello world, this is a longer prompt with several words in it.", "a", "春眠不觉晓"]
    sp = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True) for i in range(4)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    alone = [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, sp)]
    assert together == alone
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert again == together


def test_stop_string_cuts_text(llm):
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = llm.generate("Hello", sp)[0].outputs[0].text
    assert len(full) > 4
    stop = full[2:4]
    o = llm.generate("Hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == full[:full.find(stop)]


def test_chat_applies_template(llm):
    out = llm.chat([{"role": "user", "content": "你好"}], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, tokenize=True)


def test_string_prompt_without_tokenizer_is_clear_error(tmp_path):
    from helpers_model import write_checkpoint
    cfg = tiny_config()
    write_checkpoint(str(tmp_path), cfg, random_state_dict(cfg))
    llm = LLM(str(tmp_path), device="cpu")
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="token ids"):
        llm.generate("hello")


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "tnl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, **kw)


def test_cli_generate_json_matches_offline_api(ckpt, llm):
    r = _cli("generate", "--model", ckpt, "--device", "cpu", "--temperature", "0", "--max-tokens", "8",
             "--ignore-eos", "--json", "你好")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = llm.generate("你好", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0]
    assert got["token_ids"] == want.token_ids and got["text"] == want.text


def test_cli_generate_streams_text(ckpt, llm):
    r = _cli("generate", "--model", ckpt, "--device", "cpu", "--temperature", "0", "--max-tokens", "8",
             "--ignore-eos", "Hello")
    assert r.returncode == 0, r.stderr
    want = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].outputs[0].text
    assert r.stdout == want + "\n"


@pytest.mark.parametrize("args,msg", [
    (["generate", "--model", "/nonexistent/dir", "hi"], "nonexistent"),
    (["generate", "--temperature", "-1", "--model", "{ckpt}", "hi"], "temperature"),
    (["generate", "--model", "{ckpt}"], "PROMPT"),
])
def test_cli_errors_are_clear(ckpt, args, msg):
    r = _cli(*[a.replace("{ckpt}", ckpt) for a in args])
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for c in ("serve", "generate", "chat", "download", "bench"):
        assert c in r.stdout


def test_cli_chat_multi_turn_with_demo_model():
    """`tnl chat` on the bundled demo: two turns, streamed answers, history kept, clean exit."""
    r = _cli("chat", "--device", "cpu", "--temperature", "0", "--max-tokens", "40",
             input="你好\nTell me something\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    first, second = r.stdout.split(">>> ")[1:3]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in first)
    assert any(ch.isascii() and ch.isalpha() for ch in second)


def test_cli_download_without_network_says_how_to_use_a_local_path(tmp_path):
    env_extra = {"HF_HUB_OFFLINE": "1", "TNL_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "tnl.cli", "download", "OpenNLPLab/TransNormerLLM-7B",
                        "--source", "huggingface"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env_extra})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--model" in r.stderr
