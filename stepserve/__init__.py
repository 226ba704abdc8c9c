"""stepserve: an LLM server for Hugging Face models with its own engine."""

from stepserve.sampling import SamplingParams
from stepserve.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":  # torch loads only when the engine is wanted
        from stepserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
