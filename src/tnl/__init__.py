"""tnl: a serving engine for TransNormerLLM.

    from tnl import LLM, SamplingParams
"""
__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):  # lazy: `tnl --help` should not pay for importing torch
    if name == "LLM":
        from tnl.llm import LLM
        return LLM
    if name == "SamplingParams":
        from tnl.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
