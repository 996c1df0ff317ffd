"""The serving engine: requests, state pool, scheduler, runner, sampler, engine loop."""
from tnl.engine.engine import AsyncEngine, LLMEngine
from tnl.engine.request import CompletionOutput, RequestOutput
from tnl.engine.sampling_params import SamplingParams
from tnl.engine.scheduler import QueueFullError

__all__ = ["AsyncEngine", "LLMEngine", "CompletionOutput", "RequestOutput", "SamplingParams", "QueueFullError"]
