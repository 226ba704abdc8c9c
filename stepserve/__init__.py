"""stepserve: an LLM server for Hugging Face models with its own engine."""

from stepserve.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # torch loads only when the engine is wanted
        from stepserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)
