"""SamplingParams: how one request is decoded (vLLM's names, so users know them)."""
from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field

from tnl.engine.errors import InvalidRequest

MAX_TOKENS_CAP = 1_000_000   # a request asking for more than this is a mistake, not a plan
MAX_LOGPROBS = 20
# Stop strings: every step feeds each request's new text through each of its stop strings
# (tnl.engine.output), and holds back up to the longest one's length of text from a stream.
MAX_STOPS = 16
MAX_STOP_CHARS = 1000
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputs:
    """A constraint on the output's text (vLLM's StructuredOutputsParams): exactly one of

    Args:
        json: a JSON Schema (a dict, or its JSON text): the output is one JSON value valid against it
        regex: the output matches this regular expression in full
        choice: the output is exactly one of these strings
        grammar: an EBNF / GBNF grammar (xgrammar's dialect, llama.cpp's GBNF; the rule `root` starts)
        json_object: True: the output is any JSON object (OpenAI's response_format json_object)
        disable_any_whitespace: JSON without whitespace between its tokens (compact; small models
            otherwise may spend their tokens on whitespace)

    Checked here for its shape only; whether the grammar compiles is known when the engine
    compiles it (tnl.engine.structured), which raises InvalidRequest naming the field too.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    # the compiled grammar, once an engine compiled it: (that engine's compiler, CompiledGrammar)
    compiled: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = "none was" if not given else f"{len(given)} were ({', '.join(given)})"
            raise InvalidRequest("structured_outputs", f"structured_outputs: give exactly one constraint of "
                                                       f"{', '.join(STRUCTURED_KINDS)}; {what} given")
        kind = given[0]

        def bad(why: str):
            raise InvalidRequest(f"structured_outputs.{kind}", f"structured_outputs.{kind} {why}")

        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = _json.loads(value)
                except ValueError as e:
                    bad(f"is not JSON text: {e}")
                except RecursionError:
                    bad("is nested too deeply")
            if not isinstance(value, dict):
                bad(f"must be a JSON Schema object, got {type(value).__name__}")
            try:   # the key order stays: xgrammar writes properties in the schema's order
                text = _json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError, RecursionError) as e:
                bad(f"is not a JSON value: {e}")
        elif kind == "choice":
            if not isinstance(value, list) or not value:
                bad("must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in value):
                bad("must hold strings only")
            text = _json.dumps(value, ensure_ascii=False)
        elif kind == "json_object":
            if value is not True:
                bad(f"must be true, got {value!r}")
            text = ""
        else:
            if not isinstance(value, str) or not value:
                bad("must be a non-empty string")
            text = value
        if not isinstance(self.disable_any_whitespace, bool):
            raise InvalidRequest("structured_outputs.disable_any_whitespace",
                                 "structured_outputs.disable_any_whitespace must be true or false")
        self.kind = kind
        # what the engine compiles and caches by: equal keys give the same grammar
        self.key = (kind, text, self.disable_any_whitespace)


@dataclass
class SamplingParams:
    """Args:
        max_tokens: tokens to generate (0 only makes sense with prompt_logprobs: scoring)
        temperature: 0 means greedy
        top_p, top_k (0 or -1: off), min_p: nucleus / top-k / min-p filtering
        repetition_penalty (HF style, 1 = off), presence_penalty, frequency_penalty (OpenAI style)
        seed: per-request generator; the same seed gives the same tokens whatever the batch
        stop: strings that end generation (not included in the text); at most MAX_STOPS of
            them, each of at most MAX_STOP_CHARS characters
        stop_token_ids: extra ids that end generation (included in token_ids, not in text)
        ignore_eos: keep going past the end-of-sequence token
        logprobs: number of top logprobs per generated token (the sampled token always included)
        prompt_logprobs: the same for each prompt token (0: only the prompt token itself)
        structured_outputs: a constraint on the text (StructuredOutputs: a JSON Schema, a regex, a
            choice, a grammar); EOS only where it may end, finish_reason "length" if max_tokens
            cuts it. ignore_eos is ignored with one unless stop_token_ids give the output another end
            (a grammar that is complete has nothing to write but a stop token).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str):
            raise InvalidRequest(name, f"{name} {why}, got {getattr(self, name)!r}")

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or not 0 <= self.max_tokens <= MAX_TOKENS_CAP:
            bad("max_tokens", f"must be an integer in [0, {MAX_TOKENS_CAP}]")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or math.isnan(v) or math.isinf(v):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (0 or -1 disables it)")
        if self.top_k == -1:
            self.top_k = 0
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of them")
        if len(self.stop) > MAX_STOPS:   # (no bad(): the value may be megabytes)
            raise InvalidRequest("stop", f"stop: at most {MAX_STOPS} strings, got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise InvalidRequest("stop", f"stop: a stop string may have at most {MAX_STOP_CHARS} characters, got "
                                         f"one of {longest}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise InvalidRequest("structured_outputs", f"structured_outputs must be a StructuredOutputs, got "
                                                       f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
