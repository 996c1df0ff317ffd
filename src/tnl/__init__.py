"""tnl: a serving engine for TransNormerLLM.

    from tnl import LLM, SamplingParams, StructuredOutputs
"""
__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "__version__"]


def __getattr__(name):  # lazy: `tnl --help` should not pay for importing torch
    if name == "LLM":
        from tnl.llm import LLM
        return LLM
    if name in ("SamplingParams", "StructuredOutputs"):
        from tnl.engine import sampling_params
        return getattr(sampling_params, name)
    raise AttributeError(name)
