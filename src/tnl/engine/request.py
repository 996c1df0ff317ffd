"""A request's life in the engine, and what the engine hands back. Torch-free."""
from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field

from tnl.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """Generated text. From `LLM.generate`: the whole output. From `AsyncEngine.generate`:
    the delta since the previous yield (text, token_ids, logprobs), plus finish_reason."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # None while running, then "stop" | "length" | "abort"
    cumulative_logprob: float | None = None   # None unless logprobs were asked for
    stop_reason: str | int | None = None  # the stop string or token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0     # prompt tokens taken from the prompt-state cache (not computed)


@dataclass
class Request:
    """Mutable engine-side state. `num_computed` counts tokens whose effect is in the state."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    prompt: str | None = None
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: object | None = None   # torch.Generator of a seeded request (the sampler's)
    grammar: object | None = None     # xgrammar.GrammarMatcher of a structured-output request (tnl.engine.structured)
    num_in_flight: int = 0       # launched steps whose token for it is still on the device (async scheduling)
    # prompt-state cache: prompt lengths where a snapshot is wanted (chat message ends, the
    # prompt's end), the prompt tokens a hit skipped, and the hit itself until the runner
    # copies it into the slot
    boundaries: list[int] = field(default_factory=list)
    num_cached: int = 0
    cache_hit: object | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    @functools.cached_property
    def prompt_key(self) -> tuple[int, ...]:
        """The prompt as a dict key (the scheduler's duplicate-prompt check), built once."""
        return tuple(self.prompt_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= self.num_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def reported_cumulative_logprob(self) -> float | None:
        """As vLLM reports it: only for requests that asked for logprobs."""
        return self.cumulative_logprob if self.params.logprobs is not None else None

    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
