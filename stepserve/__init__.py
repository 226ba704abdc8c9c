"""stepserve: an LLM server for Hugging Face models with its own engine."""

from stepserve.sampling import SamplingParams
from stepserve.version import __version__

__all__ = ["LLM", "LoRARequest", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "LoRARequest"):  # torch loads only when the engine is wanted
        from stepserve.engine import llm

        return getattr(llm, name)
    raise AttributeError(name)
