"""SentencePiece tokenizer, chat template, and an incremental UTF-8-safe detokenizer.

The official TransNormerLLM checkpoints ship the Baichuan-7B SentencePiece model: 64000
pieces, byte fallback, <unk>=0, <s>=1, </s>=2. This module reads that file directly (no
transformers) and reproduces what a Hugging Face slow tokenizer does with it, with the
`legacy=False` handling of special tokens:

- "Special" pieces are the control pieces (<s>, </s>), <unk>, the user-defined pieces (for
  example ChatML's <|im_start|> / <|im_end|> when a vocabulary defines them), and whatever
  ids bos / eos / pad resolve to. In text passed to `encode` their strings map to their ids.
- The text is encoded as one document: SentencePiece's dummy-prefix space goes before the
  first text chunk only, and only when nothing but control tokens (<s>, </s>) precede it;
  `decode` applies the mirror rule. So `decode(encode(s), skip_special_tokens=False)` is
  "<s>" + s whenever the model's normalizer keeps `s` unchanged, and text without special
  strings gets exactly SentencePiece's ids.
- `decode(skip_special_tokens=True)` drops the special ids and decodes the rest as one
  sequence (like Hugging Face: filter, then decode).

Decoding a stream one token at a time is `IncrementalDetokenizer`'s job: it never emits half
a character and its pieces concatenate to exactly `Tokenizer.decode` of the same ids.
"""
from __future__ import annotations

import codecs
import json
import logging
import operator
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece as spm

logger = logging.getLogger(__name__)

# ChatML, the template transformers 4.37 fell back to for checkpoints without one
# (TransNormerLLM has none): "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# SentencePiece.Type values in sentencepiece_model.proto.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """A SentencePiece model plus the Hugging Face conventions around it.

    Args:
        model_path: the `tokenizer.model` file.
        add_bos_token / add_eos_token: what `encode(..., add_special_tokens=True)` adds.
        chat_template: Jinja source for `apply_chat_template`; None uses DEFAULT_CHAT_TEMPLATE.
        bos_token_id / eos_token_id / pad_token_id: explicit ids (e.g. from config.json); they
            win over the token strings below, which win over the SentencePiece model's own ids.
        bos_token / eos_token / pad_token: token strings (from tokenizer_config.json); used only
            when they are pieces of the vocabulary.
        template_origin: where the chat template came from, for error messages.
    """

    def __init__(self, model_path: str | os.PathLike, *, add_bos_token: bool = True,
                 add_eos_token: bool = False, chat_template: str | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 template_origin: str = "chat_template argument"):
        self.model_path = os.fspath(model_path)
        with open(self.model_path, "rb") as f:
            proto = f.read()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({e})") from e
        # The same model with the dummy prefix off, to encode text that follows a special token,
        # and with the leading-whitespace rules off too, to decode a continuation on its own.
        self._sp_no_prefix = spm.SentencePieceProcessor(
            model_proto=_override_normalizer(proto, add_dummy_prefix=False))
        self._sp_continue = spm.SentencePieceProcessor(
            model_proto=_override_normalizer(proto, add_dummy_prefix=False,
                                             remove_extra_whitespaces=False))

        n = self._sp.get_piece_size()
        self._pieces: list[str] = [self._sp.id_to_piece(i) for i in range(n)]
        try:
            types = _piece_types(proto)
        except (IndexError, ValueError) as e:
            raise ValueError(f"{self.model_path}: cannot read the piece table ({e})") from e
        if len(types) != n:
            raise ValueError(f"{self.model_path}: {len(types)} pieces parsed, sentencepiece "
                             f"reports {n}")
        # byte value of each byte-fallback piece, -1 for the others
        self._byte_value: list[int] = [-1] * n
        for i, t in enumerate(types):
            if t == _BYTE:
                m = _BYTE_PIECE.fullmatch(self._pieces[i])
                if m:
                    self._byte_value[i] = int(m.group(1), 16)

        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        sp_bos, sp_eos, sp_pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        self._bos_id = self._resolve_id("bos", bos_token_id, bos_token, sp_bos)
        self._eos_id = self._resolve_id("eos", eos_token_id, eos_token, sp_eos)
        self._pad_id = self._resolve_id("pad", pad_token_id, pad_token, sp_pad)

        # Control pieces are invisible to SentencePiece: text after them still starts a line.
        self._control_ids = frozenset(i for i, t in enumerate(types) if t == _CONTROL)
        special = {i for i, t in enumerate(types) if t in (_UNKNOWN, _CONTROL, _USER_DEFINED)}
        special |= {i for i in (self._bos_id, self._eos_id, self._pad_id) if i is not None}
        self._special_ids = frozenset(special)
        # Longest first, so a special string that contains another one wins.
        strings = sorted({self._pieces[i] for i in special if self._pieces[i]}, key=len, reverse=True)
        self._special_by_text = {self._pieces[i]: i for i in sorted(special, reverse=True)}
        self._special_re = re.compile("|".join(map(re.escape, strings))) if strings else None

        self.chat_template = DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template
        self._template_origin = "default ChatML template" if chat_template is None else template_origin
        self._template = _compile_template(self.chat_template, self._template_origin)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, chat_template_file: str | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> Tokenizer | None:
        """Load `path`/tokenizer.model with tokenizer_config.json and special_tokens_map.json.

        Args:
            path: a checkpoint or tokenizer directory.
            chat_template_file: a file holding a Jinja chat template; it overrides the
                `chat_template` of tokenizer_config.json, which overrides DEFAULT_CHAT_TEMPLATE.
            bos_token_id / eos_token_id / pad_token_id: ids from the model's config.json; they
                win over the tokenizer files.

        Returns:
            The tokenizer, or None when `path` has no tokenizer.model (the engine then works
            with token ids only).
        """
        path = os.fspath(path)
        model_path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model_path):
            logger.info("no tokenizer.model in %s: serving token ids only", path)
            return None
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        # tokenizer_config.json first; special_tokens_map.json fills what it lacks.
        tokens = {key: _token_text(config.get(key)) or _token_text(special_map.get(key))
                  for key in ("bos_token", "eos_token", "pad_token")}

        template, origin = _select_template(config.get("chat_template"))
        if template is not None:
            origin = f"{path}/tokenizer_config.json {origin}"
        if chat_template_file is not None:
            try:
                with open(chat_template_file, encoding="utf-8") as f:
                    template = f.read()
            except OSError as e:
                raise ValueError(f"cannot read chat template file {chat_template_file}: {e}") from e
            origin = f"chat template file {chat_template_file}"

        tok = cls(model_path, add_bos_token=config.get("add_bos_token", True),
                  add_eos_token=config.get("add_eos_token", False), chat_template=template,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  template_origin=origin, **tokens)
        logger.info("tokenizer %s: %d pieces, bos=%s eos=%s pad=%s, add_bos=%s add_eos=%s, "
                    "chat template: %s", model_path, tok.vocab_size, tok.bos_token_id,
                    tok.eos_token_id, tok.pad_token_id, tok.add_bos_token, tok.add_eos_token,
                    tok._template_origin)
        return tok

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces; valid ids are 0 .. vocab_size - 1."""
        return len(self._pieces)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def bos_token(self) -> str | None:
        return None if self._bos_id is None else self._pieces[self._bos_id]

    @property
    def eos_token(self) -> str | None:
        return None if self._eos_id is None else self._pieces[self._eos_id]

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Control, unknown and user-defined pieces, plus the bos / eos / pad ids."""
        return self._special_ids

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry itself, e.g. "▁the", "<0xE4>", "</s>"."""
        return self._pieces[self._check_id(token_id)]

    def token_bytes(self, token_id: int) -> list[int]:
        """The UTF-8 bytes one token stands for: the raw byte of a byte-fallback piece, else the
        bytes of token_text (OpenAI's logprob `bytes`)."""
        token_id = self._check_id(token_id)
        b = self._byte_value[token_id]
        return [b] if b >= 0 else list(self.token_text(token_id).encode())

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own, for logprob displays.

        "▁" becomes a space and is kept at the start (" the", unlike `decode([id])`, which
        drops a leading space). Special pieces give their string ("</s>"). A byte-fallback
        piece gives its character when the byte is ASCII ("<0x0A>" -> "\\n"); a byte >= 0x80
        is never valid UTF-8 alone, so it gives the 4-character escape "\\xe4" (backslash,
        x, two lowercase hex digits) rather than U+FFFD, so distinct bytes stay distinct.
        """
        token_id = self._check_id(token_id)
        byte = self._byte_value[token_id]
        if byte >= 0:
            return chr(byte) if byte < 0x80 else f"\\x{byte:02x}"
        piece = self._pieces[token_id]
        if token_id in self._special_ids:
            return piece
        return piece.replace(_SPACE, " ")

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids.

        Special-token strings in `text` ("<s>", "<|im_start|>" where the vocabulary has it)
        become their ids; the text between them goes through SentencePiece. The dummy-prefix
        space goes on the first text chunk only, and only when nothing but control tokens
        (<s>, </s>) precede it: "<|im_start|>user" gives [<|im_start|>, "u", ...], as
        SentencePiece itself tokenizes a user-defined piece inside a document. With
        `add_special_tokens`, bos / eos are added as add_bos_token / add_eos_token say.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self._bos_id is not None:
            ids.append(self._bos_id)
        at_start = True  # the dummy prefix goes on the first text, even after <s>
        for chunk, special_id in self._split_special(text):
            if chunk:
                chunk_ids = (self._sp if at_start else self._sp_no_prefix).encode(chunk)
                ids.extend(chunk_ids)
                at_start = at_start and not chunk_ids
            if special_id is not None:
                ids.append(special_id)
                at_start = at_start and special_id in self._control_ids
        if add_special_tokens and self.add_eos_token and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text. Raises ValueError for an id outside 0 .. vocab_size - 1.

        With skip_special_tokens the special ids are dropped and the rest decoded as one
        sequence. Without, each special id becomes its string and the runs of ordinary ids
        between them are decoded separately (bytes of a character never straddle a special
        token). SentencePiece's leading-space rule (the dummy prefix) applies to the first run
        when only control tokens (<s>, </s>) precede it, the mirror of `encode`, so
        decode(encode(s), skip_special_tokens=False) == "<s>" + s.
        """
        ids = self._check_ids(ids)
        special = self._special_ids
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in special])
        parts: list[str] = []
        run: list[int] = []
        at_start = True
        for i in [*ids, None]:
            if i is not None and i not in special:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_run(run, at_start))
                run, at_start = [], False
            if i is not None:
                parts.append(self._pieces[i])
                at_start = at_start and i in self._control_ids
        return "".join(parts)

    def _decode_run(self, ids: list[int], at_start: bool) -> str:
        """Decode ordinary ids; at_start applies the dummy-prefix / leading-space rule."""
        return (self._sp if at_start else self._sp_continue).decode(ids)

    def _split_special(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Yield (text before, special id or None) pairs covering `text` in order."""
        if self._special_re is None:
            yield text, None
            return
        pos = 0
        for m in self._special_re.finditer(text):
            yield text[pos:m.start()], self._special_by_text[m.group()]
            pos = m.end()
        yield text[pos:], None

    def _check_id(self, token_id: int) -> int:
        try:
            i = operator.index(token_id)
        except TypeError:
            raise ValueError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < len(self._pieces):
            raise ValueError(f"token id {i} is outside the vocabulary (0 .. {len(self._pieces) - 1})")
        return i

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise ValueError(f"token ids must be integers, got {list(ids)[:8]!r}") from None
        n = len(self._pieces)
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (0 .. {n - 1})")
        return ids

    def _resolve_id(self, name: str, explicit: int | None, text: str | None, sp_id: int) -> int | None:
        n = len(self._pieces)
        if explicit is not None:
            if not 0 <= explicit < n:
                raise ValueError(f"{name}_token_id {explicit} is outside the tokenizer's "
                                 f"{n} pieces ({self.model_path})")
            if text is not None and self._pieces[explicit] != text:
                logger.warning("%s_token_id %d is %r in %s, but the tokenizer config says %r; "
                               "using the id", name, explicit, self._pieces[explicit],
                               self.model_path, text)
            return explicit
        if text is not None:
            i = self._sp.piece_to_id(text)
            if self._pieces[i] == text:
                return i
            logger.warning("%s_token %r is not a piece of %s; ignoring it", name, text,
                           self.model_path)
        return sp_id if 0 <= sp_id < n else None

    # ---------------------------------------------------------------- chat template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """Render chat messages into a prompt, with Hugging Face's semantics.

        Args:
            messages: [{"role": str, "content": str | [{"type": "text", "text": str}, ...]}];
                content parts are joined with "\\n". Other keys are passed to the template.
            add_generation_prompt: end with the assistant turn's opening.
            tokenize: return ids instead of text; the bos token is added unless the rendered
                text already starts with it.

        Raises:
            ValueError: a malformed message (the message names its index), or the template
                called raise_exception / failed to render.
        """
        messages = _validate_messages(messages)
        unk_id = self._sp.unk_id()
        try:
            rendered = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                pad_token=self._pieces[self._pad_id] if self._pad_id is not None else "",
                unk_token=self._pieces[unk_id] if 0 <= unk_id < self.vocab_size else "")
        except jinja2.TemplateError as e:  # includes the sandbox's SecurityError
            raise ValueError(f"{self._template_origin} failed to render: {e}") from e
        if not tokenize:
            return rendered
        starts_with_bos = bool(self.bos_token) and rendered.startswith(self.bos_token)
        return self.encode(rendered, add_special_tokens=not starts_with_bos)

    def chat_boundaries(self, messages: list[dict[str, Any]], ids: list[int], limit: int = 64) -> list[int]:
        """Token counts at which each message of `messages` ends within `ids` (the tokenized
        template of the whole chat): the prompt-state cache's snapshot points, so that a chat
        sharing the first messages (a system prompt, earlier turns) starts after them. A message
        end whose tokens are not a prefix of `ids` (a template that renders a message
        differently when more follow) is left out. Only the last `limit` messages are looked at
        (each costs a render and a tokenization of the chat so far)."""
        out = []
        for i in range(max(0, len(messages) - limit), len(messages)):
            prefix = self.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tokenize=True)
            if len(prefix) < len(ids) and ids[:len(prefix)] == prefix:
                out.append(len(prefix))
        return out

    # ---------------------------------------------------------------- detokenizer support

    def _incomplete_utf8(self, ids: list[int]) -> bool:
        """True when `ids` ends in byte pieces that begin, but do not finish, a UTF-8 character."""
        tail = bytearray()
        # A valid unfinished sequence is at most 3 bytes; its lead byte lies within them.
        for i in reversed(ids[-3:]):
            b = self._byte_value[i]
            if b < 0:
                break
            tail.insert(0, b)
        if not tail or tail[-1] < 0x80:
            return False
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(bytes(tail), final=False)
        return bool(decoder.getstate()[0])


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text, never emitting half a character.

    The concatenation of everything `add` and `flush` return is exactly the text of the
    generated tokens:
    - without prompt ids: `tokenizer.decode(generated_ids, skip_special_tokens)`, so the first
      token's dummy-prefix space is dropped, as a standalone decode does;
    - with prompt ids: the text the generated tokens add after the prompt, i.e.
      decode(prompt + generated)[len(decode(prompt)):]. Prompt "Hello" followed by "▁world"
      gives " world", with its space. The one exception is a prompt that ends in the middle of
      a UTF-8 character: those dangling prompt bytes are left out of the context, so the
      generated bytes decode on their own.

    Bytes of one character split over byte-fallback tokens are held until it completes (or
    until `flush`, which renders an unfinished character as U+FFFD, like `decode` does).
    Work per token is bounded: once any text exists, each complete character group is
    decoded on its own as a continuation. Only while the output is still empty (at the start
    of a prompt-less stream) is the current run re-decoded from its start, because
    SentencePiece's leading-space rule may span several tokens.

    Attributes:
        text: everything emitted so far.
        token_ids: the generated ids added so far.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.text = ""
        self.token_ids: list[int] = []
        self._pending: list[int] = []  # ordinary ids whose text is not emitted yet
        # The current run of ordinary ids (between special tokens when they are not skipped).
        # While _at_start, SentencePiece's leading-space rule is live for it, so the run is
        # kept and re-decoded from its start until it yields text.
        self._at_start = True
        self._run: list[int] = []
        self._run_text = ""
        if prompt_ids:
            self._init_from_prompt(tokenizer._check_ids(prompt_ids))

    def _init_from_prompt(self, prompt: list[int]) -> None:
        tok = self._tok
        special = tok.special_token_ids
        if self._skip:
            run = [i for i in prompt if i not in special]
        else:
            last = max((k for k, i in enumerate(prompt) if i in special), default=-1)
            run = prompt[last + 1:]
            # Same rule as Tokenizer.decode: only control tokens before the last run.
            self._at_start = all(i in tok._control_ids for i in prompt[:last + 1])
        # Drop a dangling unfinished character: the generated bytes decode on their own.
        while run and tok._incomplete_utf8(run):
            run = run[:-1]
        if not self._at_start:
            return
        if run and tok._decode_run(run, at_start=True):
            self._at_start = False
        else:
            self._run = run

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text that is now final (maybe "")."""
        tok = self._tok
        token_id = tok._check_id(token_id)
        self.token_ids.append(token_id)
        if token_id in tok.special_token_ids:
            if self._skip:
                return ""  # decode(skip) drops it and joins its neighbours into one run
            # Not skipped: it ends the run (an unfinished character there becomes U+FFFD).
            out = self._emit()
            piece = tok.id_to_piece(token_id)
            self.text += piece
            self._at_start = self._at_start and not self._run and token_id in tok._control_ids
            self._run, self._run_text = [], ""
            return out + piece
        self._pending.append(token_id)
        if tok._incomplete_utf8(self._pending):
            return ""
        return self._emit()

    def flush(self) -> str:
        """End of stream: return what is held back; an unfinished character becomes U+FFFD."""
        return self._emit()

    def _emit(self) -> str:
        if not self._pending:
            return ""
        if not self._at_start:
            out = self._tok._decode_run(self._pending, at_start=False)
        else:
            self._run.extend(self._pending)
            full = self._tok._decode_run(self._run, at_start=True)
            out = full[len(self._run_text):]
            self._run_text = full
            if full:  # the leading-space rule is spent: continue group by group
                self._at_start = False
                self._run, self._run_text = [], ""
        self._pending = []
        self.text += out
        return out


# ---------------------------------------------------------------- helpers


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return copies whose content is a plain str."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}: 'role' must be a non-empty string, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for p, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"{where}: content part {p} has type {kind!r}; only "
                                     "{'type': 'text', 'text': ...} parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}: content part {p} needs a string 'text'")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"{where}: 'content' must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        out.append({**message, "content": content})
    return out


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _compile_template(source: str, origin: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{origin}: not a valid Jinja template (line {e.lineno}: {e.message})") from e


def _select_template(value: Any) -> tuple[str | None, str]:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}."""
    if value is None or isinstance(value, str):
        return value, "chat_template"
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], "chat_template 'default'"
    raise ValueError(f"tokenizer_config.json chat_template must be a string or a list of "
                     f"{{'name', 'template'}} with a 'default' one, got {value!r:.200}")


def _token_text(value: Any) -> str | None:
    """bos_token / eos_token entries are strings or {"content": ...} dicts (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# SentencePiece model files are protobuf (sentencepiece_model.proto). The two things needed
# here, piece types and a normalizer override, take a few lines of wire format, which spares
# a protobuf dependency.

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int, int, Any]]:
    """Yield (field number, wire type, start, end, value) for each field of a message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in tokenizer.model")
        yield number, wire, start, pos, value


def _piece_types(proto: bytes) -> list[int]:
    """ModelProto.pieces (field 1) -> each SentencePiece.type (field 3; NORMAL when absent)."""
    types = []
    for number, wire, _, _, value in _fields(proto):
        if number == 1 and wire == 2:
            t = _NORMAL
            for n, w, _, _, v in _fields(value):
                if n == 3 and w == 0:
                    t = v
            types.append(t)
    return types


def _override_normalizer(proto: bytes, *, add_dummy_prefix: bool,
                         remove_extra_whitespaces: bool | None = None) -> bytes:
    """The model with NormalizerSpec flags replaced.

    Protobuf merges repeated occurrences of a message field, so appending a normalizer_spec
    (field 3) that sets add_dummy_prefix (3) / remove_extra_whitespaces (4) overrides them.
    self_test_data (field 4) is dropped: its samples were made with the original flags.
    """
    kept = b"".join(proto[start:end] for number, _, start, end, _ in _fields(proto) if number != 4)
    spec = bytes([3 << 3, int(add_dummy_prefix)])
    if remove_extra_whitespaces is not None:
        spec += bytes([4 << 3, int(remove_extra_whitespaces)])
    return kept + bytes([3 << 3 | 2, len(spec)]) + spec
