"""The serving engine: requests and sampling params, scheduler, runner, sampler, the token
engine (core), the output processor, LLMEngine (both, synchronous) and AsyncEngine (a thread).

Names are imported lazily, so the torch-free parts (sampling params, requests, scheduler,
errors) import without torch: `import tnl.engine.scheduler` loads no tensor library.
"""
import importlib

_WHERE = {
    "AsyncEngine": "tnl.engine.async_engine",
    "EngineClient": "tnl.engine.async_engine",
    "LLMEngine": "tnl.engine.llm_engine",
    "CompletionOutput": "tnl.engine.request",
    "RequestOutput": "tnl.engine.request",
    "SamplingParams": "tnl.engine.sampling_params",
    "StructuredOutputs": "tnl.engine.sampling_params",
    "InvalidRequest": "tnl.engine.errors",
    "QueueFullError": "tnl.engine.errors",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
