"""Build the training data of tnl's bundled demo model from Debian's fortune packages.

    apt-get update && apt-get install -y fortunes fortunes-min fortunes-zh
    python demo/prepare_data.py                 # writes demo/data/ (git-ignored)

Sources (all under /usr/share/games/fortunes/):
  fortunes, fortunes-min   English fortune cookies (BSD licence, see /usr/share/doc/fortunes/copyright)
  fortunes-zh              Chinese classical poems (tang300, song100) and sayings (chinese) (GPL-3.0+)

Cleaning: records are split on the `%` lines, terminal colour codes and backspace overstrikes are
removed, tabs expanded, attribution lines normalised to "    -- Name", exact duplicates dropped.
Left out: anything under off/ (Debian's offensive section; bookworm ships none, but a local
install may), ascii-art (drawings), translate-me (not English), the four files closest to the
offensive criteria (drugs, ethnic, men-women, politics), and from `chinese` the excerpts of the
Debian Reference manual (tables, shell commands) and records that are mostly not Chinese.

Outputs in demo/data/:
  train.txt, valid.txt   one record per fortune, records separated by a line holding only RS (0x1E);
                         valid is a fixed 3% per language, chosen by --seed
  chat_train.jsonl       {"lang", "system", "prompt", "answer"}: a greeting or request paired with a
                         random short training fortune of the same language (answers never come
                         from valid)
  stats.json             package versions, per-file counts and sizes: read by train.py for the card
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import unicodedata

FORTUNE_DIR = "/usr/share/games/fortunes"
RS = "\x1e"  # record separator in train.txt / valid.txt: never part of a cleaned fortune
SYSTEM_PROMPT = "You are a helpful assistant."

PACKAGE_OF = {  # which Debian package installs each file we read
    **{f: "fortunes" for f in (
        "art computers cookie debian definitions disclaimer education food goedel humorists kids "
        "knghtbrd law linux linuxcookie love magic medicine miscellaneous news paradoxum people "
        "perl pets platitudes pratchett science songs-poems sports startrek tao wisdom work zippy"
    ).split()},
    **{f: "fortunes-min" for f in ("fortunes", "literature", "riddles")},
    **{f: "fortunes-zh" for f in ("chinese", "tang300", "song100")},
}
EXCLUDED = {
    "ascii-art": "drawings, not text",
    "translate-me": "not English",
    "drugs": "close to the offensive criteria",
    "ethnic": "close to the offensive criteria",
    "men-women": "close to the offensive criteria",
    "politics": "close to the offensive criteria",
}
CHINESE_FILES = ("chinese", "tang300", "song100")

# Requests a user might type; each is paired with a random fortune of the same language.
PROMPTS = {
    "en": [
        "Tell me something", "Tell me something.", "Hello", "Hello!", "Hi", "Hi there", "Hey",
        "Say something wise", "Say something", "Tell me a fortune", "Give me a fortune",
        "Tell me a quote", "Give me a quote", "Any words of wisdom?", "What's my fortune?",
        "Tell me something interesting", "Tell me something funny", "Good morning",
        "Share a saying", "Cheer me up", "Inspire me", "Surprise me", "What do you know?",
        "Got any advice?", "Tell me a joke",
    ],
    "zh": [
        "你好", "你好！", "您好", "嗨", "早上好", "晚上好", "给我一句诗", "说点什么", "来一句诗",
        "念首诗", "讲一句名言", "给我一句名言", "说句古话", "来点智慧", "有什么话送给我？",
        "说一句谚语", "给我一句话", "随便说点什么", "吟一句诗", "请赐教", "给点建议",
        "讲句有道理的话", "你会背诗吗？", "来一句唐诗", "来一句宋词",
    ],
}

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ATTRIBUTION = re.compile(r"^\s*(--|——|－－|―)")


def is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" or "\uf900" <= c <= "\ufaff"


def cjk_share(text: str) -> float:
    """Share of CJK ideographs and CJK punctuation among the non-space characters."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    n = sum(is_cjk(c) or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" for c in chars)
    return n / len(chars)


def read_records(path: str) -> list[str]:
    """The fortunes of one strfile source, split on lines holding only '%'."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    return re.split(r"\n%\n", text.replace("\r\n", "\n"))


def clean(record: str) -> str | None:
    """One fortune as plain text, or None when it is not worth training on."""
    s = ANSI.sub("", record)
    s = re.sub(r".\x08", "", s)             # overstrike / underline: keep the last character
    s = s.replace("\x07", "").replace("\xa0", " ").replace("\u3000", "  ")
    if "\ufffd" in s or any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in s):
        return None                          # undecodable bytes or mojibake (C1 controls)
    lines = []
    for line in s.split("\n"):
        line = line.expandtabs(4).rstrip()
        if ATTRIBUTION.match(line):
            line = "    " + line.strip()
        lines.append(line)
    s = "\n".join(lines).strip("\n")
    s = re.sub(r"\n{3,}", "\n\n", s)
    if s.strip() == "" or s.strip() == "%":
        return None
    return s


def keep_chinese(text: str) -> bool:
    if any("\u2500" <= c <= "\u257f" for c in text):  # box-drawing tables from the Debian manual
        return False
    if "Osamu Aoki" in text or "Debian 参考手册" in text:
        return False
    return cjk_share(text) >= 0.5


def body_lines(text: str, lang: str) -> list[str]:
    """The lines that carry the content: no attribution, no poem title or author line."""
    out = []
    for line in text.split("\n"):
        t = line.strip()
        if not t or ATTRIBUTION.match(line):
            continue
        if lang == "zh" and (t.startswith(("题目", "《", "作者")) or re.fullmatch(r".{0,20}[》]", t)):
            continue
        out.append(t if lang == "zh" else line.rstrip())
    return out


def short_answer(text: str, lang: str, max_chars: int, max_chars_zh: int = 64) -> str | None:
    """A chat answer from one fortune: the whole fortune if short, else its first 1-2 content lines.

    English answers keep the attribution line when the whole fortune fits; a cut English answer must
    end a sentence so it reads as complete. Chinese answers are one poem line or saying (at most
    max_chars_zh characters), without title or author.
    """
    if lang == "en":
        if len(text) <= max_chars:
            return text
        lines = body_lines(text, lang)
        for n in (2, 1):
            cut = "\n".join(lines[:n])
            if len(cut) <= max_chars and cut.rstrip().endswith((".", "!", "?", '"')):
                return cut
        return None
    lines = [l for l in body_lines(text, lang) if cjk_share(l) >= 0.8]
    if not lines:
        return None
    # One poem line or saying; a very short first line (a four-character phrase) takes the next one along.
    cut = "\n".join(lines[:2]) if len(lines[0]) < 12 and len(lines) > 1 else lines[0]
    if len(cut) > max_chars_zh or not re.search(r"[。！？」”]$", cut) or cut.count("“") != cut.count("”"):
        return None  # a cut that ends mid-sentence or leaves a quote open
    return cut


def package_versions(packages: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["dpkg-query", "-W", *packages], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    return dict(line.split("\t", 1) for line in out.strip().split("\n") if "\t" in line)


def collect(fortune_dir: str) -> tuple[dict[str, list[str]], dict]:
    """Cleaned, deduplicated records per language, and per-file statistics."""
    if not os.path.isdir(fortune_dir):
        raise SystemExit(f"no fortune files at {fortune_dir}: run "
                         f"'apt-get install -y fortunes fortunes-min fortunes-zh' first")
    seen: set[str] = set()
    by_lang: dict[str, list[str]] = {"en": [], "zh": []}
    files = {}
    for name in sorted(os.listdir(fortune_dir)):
        path = os.path.join(fortune_dir, name)
        # off/ is a directory (skipped by isfile); .dat are strfile indexes; .u8 are symlinks.
        if not os.path.isfile(path) or os.path.islink(path) or name.endswith(".dat"):
            continue
        if name in EXCLUDED:
            files[name] = {"package": PACKAGE_OF.get(name, "?"), "excluded": EXCLUDED[name]}
            continue
        lang = "zh" if name in CHINESE_FILES else "en"
        kept = 0
        kept_bytes = 0
        raw = read_records(path)
        for rec in raw:
            text = clean(rec)
            if text is None or (lang == "zh" and not keep_chinese(text)):
                continue
            key = re.sub(r"\s+", " ", text).strip().lower()
            if key in seen:
                continue
            seen.add(key)
            by_lang[lang].append(text)
            kept += 1
            kept_bytes += len(text.encode("utf-8"))
        files[name] = {"package": PACKAGE_OF.get(name, "?"), "lang": lang, "records": len(raw),
                       "kept": kept, "kept_bytes": kept_bytes}
    return by_lang, files


def chat_pairs(train: dict[str, list[str]], n_per_lang: int, max_chars: int,
               rng: random.Random) -> tuple[list[dict], dict[str, int]]:
    """Greeting/request -> random short fortune of the same language. One in five has no system turn.
    Returns the pairs and the number of distinct answers each language draws from."""
    pairs = []
    pool_sizes = {}
    for lang in ("en", "zh"):
        pool = [a for a in (short_answer(t, lang, max_chars) for t in train[lang]) if a]
        pool_sizes[lang] = len(pool)
        if not pool:
            raise SystemExit(f"no {lang} fortune is short enough for a chat answer")
        for _ in range(n_per_lang):
            pairs.append({"lang": lang,
                          "system": SYSTEM_PROMPT if rng.random() < 0.8 else None,
                          "prompt": rng.choice(PROMPTS[lang]),
                          "answer": rng.choice(pool)})
    rng.shuffle(pairs)
    return pairs, pool_sizes


def write_records(path: str, records: list[str]) -> int:
    text = f"\n{RS}\n".join(records) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return len(text.encode("utf-8"))


def read_records_file(path: str) -> list[str]:
    """Inverse of write_records (train.py reads the data with this)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [r for r in text.rstrip("\n").split(f"\n{RS}\n") if r]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fortune-dir", default=FORTUNE_DIR)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--valid-fraction", type=float, default=0.03)
    ap.add_argument("--chat-per-lang", type=int, default=8000, help="chat pairs per language")
    ap.add_argument("--max-answer-chars", type=int, default=200)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    by_lang, files = collect(args.fortune_dir)
    train: dict[str, list[str]] = {}
    valid: dict[str, list[str]] = {}
    for lang, records in by_lang.items():
        order = list(range(len(records)))
        rng.shuffle(order)
        n_valid = max(1, round(args.valid_fraction * len(records)))
        valid[lang] = [records[i] for i in sorted(order[:n_valid])]
        train[lang] = [records[i] for i in sorted(order[n_valid:])]

    os.makedirs(args.out, exist_ok=True)
    train_all = train["en"] + train["zh"]
    valid_all = valid["en"] + valid["zh"]
    rng.shuffle(train_all)
    sizes = {"train.txt": write_records(os.path.join(args.out, "train.txt"), train_all),
             "valid.txt": write_records(os.path.join(args.out, "valid.txt"), valid_all)}
    pairs, pool_sizes = chat_pairs(train, args.chat_per_lang, args.max_answer_chars, rng)
    with open(os.path.join(args.out, "chat_train.jsonl"), "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    sizes["chat_train.jsonl"] = os.path.getsize(os.path.join(args.out, "chat_train.jsonl"))

    stats = {
        "seed": args.seed,
        "valid_fraction": args.valid_fraction,
        "packages": package_versions(["fortunes", "fortunes-min", "fortunes-zh"]),
        "files": files,
        "records": {"train": {k: len(v) for k, v in train.items()},
                    "valid": {k: len(v) for k, v in valid.items()}},
        "chars": {"train": {k: sum(map(len, v)) for k, v in train.items()},
                  "valid": {k: sum(map(len, v)) for k, v in valid.items()}},
        "chat_pairs": {lang: sum(p["lang"] == lang for p in pairs) for lang in ("en", "zh")},
        "chat_answer_pool": pool_sizes,
        "bytes": sizes,
    }
    with open(os.path.join(args.out, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False, indent=1)
    print(f"train: {len(train['en'])} en + {len(train['zh'])} zh records, {sizes['train.txt'] / 1e6:.2f} MB; "
          f"valid: {len(valid['en'])} en + {len(valid['zh'])} zh, {sizes['valid.txt'] / 1e6:.2f} MB; "
          f"chat: {len(pairs)} pairs, {sizes['chat_train.jsonl'] / 1e6:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()
