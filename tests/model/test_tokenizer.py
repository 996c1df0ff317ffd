"""Tokenizer, chat template and incremental detokenizer, on real SentencePiece models trained here."""
from __future__ import annotations

import json
import os
import random
import time

import pytest
import sentencepiece as spm

from helpers_tokenizer import CHATML_MARKERS, build_test_tokenizer, default_corpus, train_tokenizer
from tnl.model.tokenizer import DEFAULT_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"

ROUND_TRIP_TEXTS = [
    "Hello world",
    "the model reads a long prompt",
    "你好世界，今天天气很好。",
    "🙂🚀🎉",
    "你好🙂世界",
    "Mixed 中文 and English 🙂 with numbers 12345!",
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "whitespace   runs \t\t and\n\n\nnewlines",
    "\n",
    "é ß Ω 龘 𝄞",
    "<not a special token> <|endoftext|> <s",
]

SYSTEM_USER = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def english_tok(tmp_path_factory) -> Tokenizer:
    """A tokenizer that never saw CJK or emoji: every such character goes through byte fallback."""
    lines = [f"the model reads prompt number {i} and writes answer {i * 7}." for i in range(200)]
    return Tokenizer.from_dir(build_test_tokenizer(tmp_path_factory.mktemp("en"), texts=lines))


VARIANTS = {
    "default": {},
    "remove_extra_whitespaces": {"remove_extra_whitespaces": True},
    "no_dummy_prefix": {"add_dummy_prefix": False},
    "unigram": {"model_type": "unigram"},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_tok(request, tmp_path_factory) -> Tokenizer:
    directory = tmp_path_factory.mktemp(request.param)
    return Tokenizer.from_dir(train_tokenizer(directory, **VARIANTS[request.param]))


def write_json(directory, name: str, data: dict) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(data, f)


def copy_model(src_dir, dst_dir) -> str:
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(src_dir, "tokenizer.model"), "rb") as f:
        data = f.read()
    with open(os.path.join(dst_dir, "tokenizer.model"), "wb") as f:
        f.write(data)
    return os.fspath(dst_dir)


# ---------------------------------------------------------------- the test helper


def test_helper_is_fast_and_deterministic(tmp_path):
    t0 = time.perf_counter()
    a = build_test_tokenizer(tmp_path / "a")
    elapsed = time.perf_counter() - t0
    b = build_test_tokenizer(tmp_path / "b")
    assert elapsed < 3.0
    with open(os.path.join(a, "tokenizer.model"), "rb") as fa, \
            open(os.path.join(b, "tokenizer.model"), "rb") as fb:
        assert fa.read() == fb.read()
    with open(os.path.join(a, "tokenizer_config.json")) as f:
        assert json.load(f) == {"add_bos_token": True, "add_eos_token": False}
    assert isinstance(a, str)


def test_helper_layout(tok):
    assert tok.vocab_size == 400
    assert [tok.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", *CHATML_MARKERS]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.special_token_ids == frozenset({0, 1, 2, 3, 4})
    # Common CJK is in the vocabulary; the rare characters go through byte fallback.
    pieces = [tok.id_to_piece(i) for i in tok.encode("你好🙂", add_special_tokens=False)]
    assert pieces[:2] == ["▁你", "好"]
    assert pieces[2:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_from_dir_without_model_returns_none(tmp_path):
    write_json(tmp_path, "tokenizer_config.json", {"add_bos_token": True})
    assert Tokenizer.from_dir(tmp_path) is None


def test_from_dir_rejects_garbage_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_through_byte_fallback(english_tok, text):
    ids = english_tok.encode(text, add_special_tokens=False)
    assert english_tok.decode(ids) == text


def test_plain_text_ids_match_sentencepiece(tok, tok_dir):
    """Without special strings, the ids are exactly SentencePiece's (what the model trained on)."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    for text in default_corpus()[:80] + ROUND_TRIP_TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_variants_round_trip(variant_tok):
    for text in ["Hello world", "你好🙂世界", "a</s>b<|im_start|>c", "x  y"]:
        ids = variant_tok.encode(text)
        assert variant_tok.decode(ids, skip_special_tokens=False).startswith("<s>")
        if "  " not in text:  # remove_extra_whitespaces normalizes runs away
            assert variant_tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_special_strings_map_to_ids(tok):
    im_start, im_end = tok.encode("<|im_start|><|im_end|>", add_special_tokens=False)
    assert (im_start, im_end) == (3, 4)
    ids = tok.encode("<s>hi</s><unk>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s><unk>"
    assert tok.decode(ids) == "hi"

    text = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(3) == 2 and ids.count(4) == 1
    # No dummy-prefix space after a special token: "user" follows <|im_start|> directly.
    assert tok.id_to_piece(ids[1])[0] != "▁"
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\n你好\nassistant\n"

    # Only control tokens before it: the text still gets SentencePiece's dummy prefix, so the
    # ids of "<s>hi" are those of "hi" after <s>, and a real space survives the round trip.
    assert tok.encode("<s>hi", add_special_tokens=False) == [1, *tok.encode("hi", False)]
    for text in ["<s> x", "</s>  y", "<s><|im_start|> z"]:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text

    # Strings that look special but are not pieces stay text.
    ids = tok.encode("<|endoftext|>", add_special_tokens=False)
    assert len(ids) > 1 and not set(ids) & tok.special_token_ids


def test_bos_eos_flags(tok_dir, tmp_path):
    tok = Tokenizer.from_dir(tok_dir)
    body = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [1, *body]

    d = copy_model(tok_dir, tmp_path / "eos")
    write_json(d, "tokenizer_config.json", {"add_bos_token": False, "add_eos_token": True})
    both = Tokenizer.from_dir(d)
    assert both.encode("hello") == [*body, 2]
    assert both.encode("hello", add_special_tokens=False) == body

    d = copy_model(tok_dir, tmp_path / "noconfig")  # no tokenizer_config.json: HF defaults
    assert Tokenizer.from_dir(d).encode("hello") == [1, *body]
    assert Tokenizer.from_dir(d).encode("") == [1]


def test_token_ids_from_configs(tok_dir, tmp_path):
    d = copy_model(tok_dir, tmp_path / "cfg")
    write_json(d, "tokenizer_config.json", {"eos_token": {"content": "<|im_end|>", "lstrip": False},
                                            "pad_token": None})
    write_json(d, "special_tokens_map.json", {"pad_token": "<unk>", "eos_token": "</s>",
                                              "bos_token": "<no such piece>"})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_id == 4 and tok.eos_token == "<|im_end|>"  # tokenizer_config wins
    assert tok.pad_token_id == 0
    assert tok.bos_token_id == 1  # unknown string ignored: the model's own id

    # Explicit ids (config.json) win over every file.
    tok = Tokenizer.from_dir(d, bos_token_id=2, eos_token_id=1, pad_token_id=3)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 3)
    assert (tok.bos_token, tok.eos_token) == ("</s>", "<s>")
    assert tok.encode("hi")[0] == 2
    with pytest.raises(ValueError, match="bos_token_id 400"):
        Tokenizer.from_dir(d, bos_token_id=400)


def test_out_of_range_ids(tok):
    for bad in (400, -1, 10**9):
        with pytest.raises(ValueError, match=str(bad)):
            tok.decode([5, bad])
        with pytest.raises(ValueError, match=str(bad)):
            tok.id_to_piece(bad)
        with pytest.raises(ValueError, match=str(bad)):
            tok.token_text(bad)
        with pytest.raises(ValueError, match=str(bad)):
            IncrementalDetokenizer(tok).add(bad)
    with pytest.raises(ValueError, match="integer"):
        tok.decode([1.5])
    assert tok.decode([]) == ""


def test_token_text(tok):
    ids = tok.encode("你好🙂 world\n", add_special_tokens=False)
    texts = [tok.token_text(i) for i in ids]
    assert texts[:2] == [" 你", "好"]
    assert texts[2:6] == ["\\xf0", "\\x9f", "\\x99", "\\x82"]  # not UTF-8 alone: escaped
    assert texts[-1] == "\n"  # an ASCII byte piece is its character
    assert "".join(texts[6:]) == " world\n"
    assert tok.token_text(2) == "</s>" and tok.token_text(3) == "<|im_start|>"
    assert "".join(tok.token_text(i) for i in tok.encode("the model", add_special_tokens=False)) \
        == " the model"
    assert tok.id_to_piece(ids[0]) == "▁你"


# ---------------------------------------------------------------- chat template


def test_default_chat_template_is_chatml(tok):
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template(SYSTEM_USER) == expected
    assert tok.apply_chat_template(SYSTEM_USER, add_generation_prompt=False) == \
        expected[:-len("<|im_start|>assistant\n")]
    ids = tok.apply_chat_template(SYSTEM_USER, tokenize=True)
    assert ids == tok.encode(expected)
    assert ids[:2] == [1, 3] and ids.count(3) == 3 and ids.count(4) == 2


def test_chat_template_from_tokenizer_config(tok_dir, tmp_path):
    d = copy_model(tok_dir, tmp_path / "tpl")
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    write_json(d, "tokenizer_config.json", {"chat_template": template})
    tok = Tokenizer.from_dir(d)
    text = tok.apply_chat_template(SYSTEM_USER)
    assert text == "<s>[system] You are a helpful assistant.\n[user] 你好\n[assistant]"
    ids = tok.apply_chat_template(SYSTEM_USER, tokenize=True)
    assert ids[0] == 1 and ids[1] != 1  # the template's <s> only, not a second one
    assert tok.decode(ids, skip_special_tokens=False) == text

    # A list of named templates (newer tokenizer_config.json files): "default" is used.
    write_json(d, "tokenizer_config.json",
               {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                  {"name": "default", "template": "DEFAULT"}]})
    assert Tokenizer.from_dir(d).apply_chat_template(SYSTEM_USER) == "DEFAULT"


def test_chat_template_file_overrides_config(tok_dir, tmp_path):
    d = copy_model(tok_dir, tmp_path / "tplfile")
    write_json(d, "tokenizer_config.json", {"chat_template": "FROM CONFIG"})
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}\n  {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\n"
                    "{{ eos_token }}", encoding="utf-8")
    tok = Tokenizer.from_dir(d, chat_template_file=str(path))
    # trim_blocks / lstrip_blocks drop the newline after a block tag and the indent before it.
    assert tok.apply_chat_template(SYSTEM_USER) == \
        "  system: You are a helpful assistant.\n  user: 你好\n</s>"
    assert Tokenizer.from_dir(d).apply_chat_template(SYSTEM_USER) == "FROM CONFIG"
    with pytest.raises(ValueError, match="missing.jinja"):
        Tokenizer.from_dir(d, chat_template_file=str(tmp_path / "missing.jinja"))


def test_chat_template_errors(tok_dir, tmp_path):
    d = copy_model(tok_dir, tmp_path / "tplerr")
    write_json(d, "tokenizer_config.json", {"chat_template": "{% for m in messages %}"})
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        Tokenizer.from_dir(d)

    write_json(d, "tokenizer_config.json", {"chat_template": (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{{ messages[0]['content'] }}")})
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ValueError, match="first must be user"):
        tok.apply_chat_template(SYSTEM_USER)

    # The sandbox is immutable: a template cannot change the caller's messages.
    write_json(d, "tokenizer_config.json", {"chat_template": "{{ messages.append(1) }}"})
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="failed to render"):
        Tokenizer.from_dir(d).apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("messages, match", [
    ("hello", "list"),
    ([{"role": "user", "content": "ok"}, "hello"], "message 1: must be a dict"),
    ([{"content": "no role"}], "message 0: 'role'"),
    ([{"role": "user", "content": "ok"}, {"role": 3, "content": "x"}], "message 1: 'role'"),
    ([{"role": "user"}], "message 0: 'content'"),
    ([{"role": "user", "content": None}], "message 0: 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "message 2: content part 0 has type 'image_url'"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "message 0: content part 0"),
])
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_content_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts, add_generation_prompt=False) == \
        "<|im_start|>user\na\nb<|im_end|>\n"


# ---------------------------------------------------------------- incremental detokenizer


def stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None,
           skip_special_tokens: bool = True) -> tuple[list[str], str]:
    """Feed ids one at a time; return the pieces from add() and the flush() remainder."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
    pieces = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(pieces) + tail
    assert detok.token_ids == ids
    return pieces, tail


def assert_clean(pieces: list[str]) -> None:
    for piece in pieces:
        assert REPLACEMENT not in piece, pieces
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in piece), pieces


def test_detokenizer_holds_split_characters(english_tok):
    tok = english_tok
    ids = tok.encode("你好🙂世界", add_special_tokens=False)
    assert all(tok.id_to_piece(i).startswith("<0x") for i in ids[1:])  # all byte fallback
    assert len(ids) >= 16
    pieces, tail = stream(tok, ids)
    assert_clean(pieces)
    assert [p for p in pieces if p] == ["你", "好", "🙂", "世", "界"]
    assert tail == ""


def test_detokenizer_flush_renders_unfinished_character(english_tok):
    tok = english_tok
    ids = tok.encode("ok🙂", add_special_tokens=False)[:-1]  # drop the emoji's last byte
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "ok"
    assert tail and set(tail) == {REPLACEMENT}
    assert "".join(pieces) + tail == tok.decode(ids)


def corpus_ids(tok: Tokenizer, rng: random.Random, n_texts: int) -> list[list[int]]:
    pool = default_corpus() + ROUND_TRIP_TEXTS + ["你好🙂世界", "🎉🎉 龘𝄞 party", "  x\n\ty  "]
    return [tok.encode(" ".join(rng.sample(pool, rng.randint(1, 3))), add_special_tokens=False)
            for _ in range(n_texts)]


@pytest.mark.parametrize("which", ["tok", "english_tok"])
def test_detokenizer_random_splits(request, which):
    """Prompt / generation split at every kind of point: text after the prompt, never broken."""
    tok = request.getfixturevalue(which)
    rng = random.Random(1234)
    for ids in corpus_ids(tok, rng, 150):
        full = tok.decode(ids)
        for k in {0, len(ids), *(rng.randint(0, len(ids)) for _ in range(4))}:
            prompt, gen = ids[:k], ids[k:]
            pieces, tail = stream(tok, gen)  # no prompt: decode(gen) exactly
            assert "".join(pieces) + tail == tok.decode(gen)
            prefix = tok.decode(prompt)
            if REPLACEMENT in prefix:  # split inside a character: see the class docstring
                continue
            assert_clean(pieces)
            pieces, tail = stream(tok, gen, prompt=[1, *prompt])
            assert "".join(pieces) + tail == full[len(prefix):]
            assert tail == ""
            assert_clean(pieces)


def test_detokenizer_prompt_context_keeps_leading_space(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    k = next(k for k in range(len(ids)) if tok.id_to_piece(ids[k]) == "▁w")
    prompt, gen = ids[:k], ids[k:]
    assert tok.decode(gen) == "world"  # standalone decode drops the dummy-prefix space
    assert "".join(stream(tok, gen)[0]) == "world"
    assert "".join(stream(tok, gen, prompt=[1, *prompt])[0]) == " world"
    # After a prompt with no text (just <s>), the first token starts the text: no space.
    assert "".join(stream(tok, gen, prompt=[1])[0]) == "world"
    # After a chat prompt (ending in a special token when not skipped), text continues.
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    for skip in (True, False):
        pieces, _ = stream(tok, gen, prompt=chat, skip_special_tokens=skip)
        want = tok.decode(chat + gen, skip)[len(tok.decode(chat, skip)):]
        assert "".join(pieces) == want == " world"


def valid_random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Random ordinary tokens and random characters, bytes of each character kept together."""
    chars = "你好世界🙂🚀🎉龘𝄞éßΩ\n ab"
    ids: list[int] = []
    for _ in range(rng.randint(0, 25)):
        if rng.random() < 0.5:
            ids += tok.encode(rng.choice(chars), add_special_tokens=False)
        else:
            i = rng.randrange(tok.vocab_size)
            if not tok.id_to_piece(i).startswith("<0x") or len(tok.token_text(i)) == 1:
                ids.append(i)  # ordinary tokens, ASCII bytes, and special tokens
    return ids


@pytest.mark.parametrize("which", ["tok", "english_tok"])
def test_detokenizer_random_valid_sequences(request, which):
    tok = request.getfixturevalue(which)
    rng = random.Random(99)
    for _ in range(600):
        ids = valid_random_ids(tok, rng)
        for skip in (True, False):
            pieces, tail = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(pieces) + tail == tok.decode(ids, skip)
            assert tail == ""
            assert_clean(pieces)


def test_detokenizer_arbitrary_ids_match_decode(variant_tok):
    """Any ids at all (stray bytes, specials, prompts): the stream equals decode exactly."""
    tok = variant_tok
    rng = random.Random(7)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    for _ in range(800):
        def pick() -> int:
            return rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
        gen = [pick() for _ in range(rng.randint(0, 20))]
        prompt = [pick() for _ in range(rng.randint(1, 5))]
        for skip in (True, False):
            pieces, tail = stream(tok, gen, skip_special_tokens=skip)
            assert "".join(pieces) + tail == tok.decode(gen, skip)
            # With a prompt: the text gen adds after it (prompts ending mid-character aside).
            p = prompt
            while tok._incomplete_utf8([i for i in p if not skip or i not in tok.special_token_ids]):
                p = p[:-1]
            prefix, full = tok.decode(p, skip), tok.decode(p + gen, skip)
            assert full.startswith(prefix)
            pieces, tail = stream(tok, gen, prompt=prompt, skip_special_tokens=skip)
            assert "".join(pieces) + tail == full[len(prefix):]


def test_detokenizer_leading_whitespace_pieces(variant_tok):
    """Streams that open with whitespace-only pieces, where SentencePiece's leading-space rule
    (remove_extra_whitespaces strips every leading space) spans several tokens."""
    tok = variant_tok
    space = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "▁")
    word = tok.encode("the model", add_special_tokens=False)
    for ids in ([space, *word], [space, space, *word], [1, space, space, *word],
                [space, 2, space, *word], [space] * 3):
        for skip in (True, False):
            pieces, tail = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(pieces) + tail == tok.decode(ids, skip), (ids, skip)
        pieces, tail = stream(tok, ids, prompt=[1, space])
        assert "".join(pieces) + tail == tok.decode([1, space, *ids])[len(tok.decode([1, space])):]


def test_detokenizer_special_tokens(tok):
    ids = tok.encode("hi", add_special_tokens=False) + [2]
    assert "".join(stream(tok, ids)[0]) == "hi"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "hi</s>"
    # A skipped special token between the bytes of one character does not break it.
    emoji = tok.encode("🙂", add_special_tokens=False)[1:]
    ids = emoji[:2] + [4] + emoji[2:]
    assert stream(tok, ids)[0][-1] == "🙂"
    assert tok.decode(ids) == "🙂"


def test_detokenizer_work_is_bounded(english_tok):
    """After the first text, each step decodes only the tokens of the character in progress."""
    tok = english_tok
    ids = tok.encode("你好🙂 world " * 300, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=[1])
    calls = []
    real = tok._decode_run

    def counting(run, at_start):
        calls.append(len(run))
        return real(run, at_start)

    tok._decode_run = counting
    try:
        for i in ids:
            detok.add(i)
    finally:
        del tok._decode_run
    assert max(calls) <= 4
    assert detok.text == tok.decode(ids)
