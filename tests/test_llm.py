"""The offline API and `tnl generate` on a tiny checkpoint with a real SentencePiece tokenizer."""
from __future__ import annotations

import codecs
import json
import os
import re
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


def _without_unfinished_character(tok, ids: list[int]) -> list[int]:
    """ids less the byte pieces (<0xNN>) at their end that begin a UTF-8 character but do not
    finish it."""
    tail = b""
    while len(tail) < 3 and len(tail) < len(ids) \
            and re.fullmatch(r"<0x[0-9A-F]{2}>", piece := tok.id_to_piece(ids[-1 - len(tail)])):
        tail = bytes([int(piece[3:5], 16)]) + tail
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(tail, final=False)
    return ids[:len(ids) - len(decoder.getstate()[0])]


def expected_text(tok, prompt: list[int], generated: list[int]) -> str:
    """The text of a completion that no stop string cut: what the generated ids add after the
    prompt, decode(prompt + generated)[len(decode(prompt)):]. It keeps the space of a leading
    "▁" piece, which decode(generated) alone drops (why the old test accepted any text without
    U+FFFD). A prompt ending inside a character is no context for those bytes: the generated
    bytes decode on their own. An unfinished character at the end is U+FFFD, as in decode."""
    prompt = _without_unfinished_character(tok, prompt)
    prefix, full = tok.decode(prompt), tok.decode(prompt + generated)
    assert full.startswith(prefix)
    return full[len(prefix):]


def test_generate_strings_and_ids(llm):
    tok = llm.tokenizer
    e2 = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "<0xE2>")
    mid_character = [1, 50, e2]   # "-", then the first of a 3-byte character's bytes
    prompts = ["你好", "Hello world", [1, 50, 60, 70], mid_character]
    # Greedy, then two seeds whose samples start with "▁" pieces, continue a prompt's unfinished
    # character with stray bytes, and end inside a character.
    runs = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] + \
        [SamplingParams(max_tokens=12, temperature=5.0, seed=s, ignore_eos=True) for s in (8, 28)]
    cases = []
    for sp in runs:
        outs = llm.generate(prompts, sp)
        assert len(outs) == 4
        assert outs[0].prompt == "你好" and outs[0].prompt_token_ids == tok.encode("你好")
        assert outs[2].prompt_token_ids == [1, 50, 60, 70] and outs[2].prompt is None
        for o in outs:
            c = o.outputs[0]
            assert len(c.token_ids) == 12 and c.finish_reason == "length" and c.stop_reason is None
            assert c.text == expected_text(tok, o.prompt_token_ids, c.token_ids)
            cases.append((o.prompt_token_ids, c))
    # The rule's branches are all exercised: a kept leading space, a prompt's unfinished
    # character left out of the context, an unfinished character at the end.
    assert any(c.text == " " + tok.decode(c.token_ids) for _, c in cases)
    assert any(p == mid_character and c.text != tok.decode(p + c.token_ids)[len(tok.decode(p)):]
               for p, c in cases)
    assert any(c.text.endswith("\ufffd") and _without_unfinished_character(tok, c.token_ids) != c.token_ids
               for _, c in cases)


def test_batch_equals_one_at_a_time_and_repeatable(llm):
    prompts = ["你好", "Hello world, this is a longer prompt with several words in it.", "a", "春眠不觉晓"]
    # Hot enough to leave the greedy path: the tiny model is so peaked that at temperature 0.8,
    # top_p 0.9 every sample was the greedy token, and a sampler ignoring seeds passed.
    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=10, temperature=5.0, top_p=0.9, seed=seed, ignore_eos=True)

    sp = [params(i) for i in range(4)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    alone = [llm.generate([p], s)[0].outputs[0].token_ids for p, s in zip(prompts, sp)]
    assert together == alone
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert again == together
    greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    other_seeds = llm.generate(prompts, [params(i + 4) for i in range(4)])
    for t, g, o in zip(together, greedy, other_seeds):
        assert t != g.outputs[0].token_ids and t != o.outputs[0].token_ids


def test_stop_string_cuts_text(llm):
    """The text ends where the stop string first begins, after some text (the greedy text
    repeats one letter, so its stop matched at 0 and a text cut to "" passed), and generation
    ends with the token that completed it."""
    sp = SamplingParams(max_tokens=20, temperature=5.0, seed=1, ignore_eos=True)
    full = llm.generate("Hello", sp)[0].outputs[0]
    stop = full.text[5:7]
    at = full.text.find(stop)
    assert at >= 3 and "\ufffd" not in stop
    out = llm.generate("Hello", SamplingParams(max_tokens=20, temperature=5.0, seed=1, ignore_eos=True, stop=[stop]))[0]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == full.text[:at]
    assert o.token_ids == full.token_ids[:len(o.token_ids)]
    # Its last token completed the stop string.
    assert stop in expected_text(llm.tokenizer, out.prompt_token_ids, o.token_ids)
    assert stop not in expected_text(llm.tokenizer, out.prompt_token_ids, o.token_ids[:-1])


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
