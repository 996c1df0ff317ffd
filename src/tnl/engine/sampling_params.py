"""SamplingParams: how one request is decoded (vLLM's names, so users know them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tnl.engine.errors import InvalidRequest

MAX_TOKENS_CAP = 1_000_000   # a request asking for more than this is a mistake, not a plan
MAX_LOGPROBS = 20
# Stop strings: every step feeds each request's new text through each of its stop strings
# (tnl.engine.output), and holds back up to the longest one's length of text from a stream.
MAX_STOPS = 16
MAX_STOP_CHARS = 1000


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
