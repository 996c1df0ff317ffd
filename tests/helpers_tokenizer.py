"""A tiny SentencePiece tokenizer trained on the fly, for tests that need real token ids.

Import it from any test (pytest puts tests/ on sys.path):

    from helpers_tokenizer import build_test_tokenizer
    tok_dir = build_test_tokenizer(tmp_path)          # tokenizer.model + tokenizer_config.json
    tok = Tokenizer.from_dir(tok_dir)

The model mimics the layout of the Baichuan-7B tokenizer that TransNormerLLM ships: byte
fallback, <unk>=0, <s>=1, </s>=2, no pad piece, split digits, a dummy prefix, whitespace runs
kept. It adds the ChatML markers <|im_start|> / <|im_end|> as user-defined pieces so chat
prompts have real special ids. Rare characters (most emoji, uncommon CJK) are left out of
the vocabulary on purpose, so they go through byte fallback (<0xF0><0x9F>...).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import sentencepiece as spm

logger = logging.getLogger(__name__)

CHATML_MARKERS = ["<|im_start|>", "<|im_end|>"]

# Common characters: repeated many times, so they become pieces of their own.
_EN_WORDS = ("the model reads a long prompt and writes an answer with numbers like "
             "state layer token decay speed memory hello world you are a helpful assistant "
             "linear attention runs in constant memory per sequence").split()
_ZH_WORDS = ["你好", "世界", "模型", "线性", "注意力", "我们", "中文", "今天", "天气", "很好",
             "的", "是", "一个", "测试", "谢谢"]
# Each seen once in the corpus: below the character coverage, so they fall back to bytes.
_RARE = ["🙂", "🚀", "🎉", "𝄞", "龘", "鬱", "é", "ß", "Ω"]


def default_corpus() -> list[str]:
    """A deterministic mixed English / Chinese / emoji corpus of a few hundred lines."""
    lines: list[str] = []
    n_en, n_zh = len(_EN_WORDS), len(_ZH_WORDS)
    for i in range(240):
        # A pseudo-random but fixed walk over the word lists (no RNG state to depend on).
        en = " ".join(_EN_WORDS[(i * 7 + j * 3) % n_en] for j in range(4 + i % 5))
        zh = "".join(_ZH_WORDS[(i * 5 + j * 2) % n_zh] for j in range(2 + i % 4))
        lines.append(f"{en.capitalize()} {i * 37 % 1000}. {zh}，{zh[::-1]}。")
        if i % 4 == 0:
            lines.append(f"    indented code line {i}:  x = {i} + {i % 9}\tdone")
        if i % 6 == 0:
            lines.append(f"Q: what is {i} + {i + 1}? A: {2 * i + 1}! (yes) [ok] \"quoted\" 'single'")
    lines.append(" ".join(_RARE))
    return lines


def train_tokenizer(directory: str | os.PathLike, texts: list[str] | None = None,
                    vocab_size: int = 400, **trainer_options) -> str:
    """Train and write tokenizer.model + tokenizer_config.json; trainer_options override.

    The knobs other tests may want: add_dummy_prefix, remove_extra_whitespaces,
    model_type ("bpe" or "unigram"), user_defined_symbols.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    corpus = default_corpus() if texts is None else list(texts)
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,        # a small custom corpus may not support vocab_size pieces
        byte_fallback=True,
        character_coverage=0.995,      # drops the characters seen once: they go through bytes
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=CHATML_MARKERS,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",  # no NFKC, so round trips are exact
        num_threads=1,                 # deterministic
        minloglevel=2,
    )
    options.update(trainer_options)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as model_file:
        spm.SentencePieceTrainer.train(sentence_iterator=_lines(corpus), model_writer=model_file,
                                       **options)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False}, f)
    logger.debug("trained a %d-piece test tokenizer in %s", vocab_size, directory)
    return directory


def build_test_tokenizer(directory: str | os.PathLike, texts: list[str] | None = None,
                         vocab_size: int = 400) -> str:
    """Train a tiny byte-fallback SentencePiece model into `directory` (well under a second).

    Args:
        directory: where to write tokenizer.model and tokenizer_config.json
            ({"add_bos_token": true, "add_eos_token": false}); created if missing.
        texts: training lines; None uses the built-in mixed English / Chinese / emoji corpus.
            Characters outside the training text (or seen only once) go through byte fallback.
        vocab_size: target number of pieces (256 byte pieces + 5 special ones included); a
            small corpus may give fewer.

    Returns:
        `directory` as a str, ready for `tnl.model.tokenizer.Tokenizer.from_dir`.
        The same arguments always give the same model: ids are stable across runs.
    """
    return train_tokenizer(directory, texts, vocab_size)


def _lines(corpus: list[str]) -> Iterator[str]:
    yield from corpus
