"""Task names (KServe's) and how a model's architecture picks one. Pure Python, no torch."""

from __future__ import annotations

from stepserve.config import ConfigError

TEXT_GENERATION = "text_generation"
TEXT2TEXT = "text2text_generation"
EMBEDDING = "text_embedding"
SEQUENCE_CLASSIFICATION = "sequence_classification"
TOKEN_CLASSIFICATION = "token_classification"
FILL_MASK = "fill_mask"

TASKS = (TEXT_GENERATION, TEXT2TEXT, EMBEDDING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, FILL_MASK)

# KServe's suffix table (huggingfaceserver/task.py), first match wins.
_SUFFIXES = (
    ("ForTokenClassification", TOKEN_CLASSIFICATION),
    ("ForSequenceClassification", SEQUENCE_CLASSIFICATION),
    ("ForMaskedLM", FILL_MASK),
    ("ForCausalLM", TEXT_GENERATION),
    ("ForConditionalGeneration", TEXT2TEXT),
    ("MTModel", TEXT2TEXT),
    ("EncoderDecoderModel", TEXT2TEXT),
)
# Heads whose weights a task needs: a checkpoint without them cannot do the task.
_HEAD_OF = {
    SEQUENCE_CLASSIFICATION: ("ForSequenceClassification",),
    TOKEN_CLASSIFICATION: ("ForTokenClassification",),
    FILL_MASK: ("ForMaskedLM",),
    TEXT2TEXT: ("ForConditionalGeneration", "MTModel", "EncoderDecoderModel"),
    TEXT_GENERATION: ("ForCausalLM",),
}


def architecture_task(architecture: str) -> str | None:
    for suffix, task in _SUFFIXES:
        if architecture.endswith(suffix):
            return task
    return None


def resolve_task(requested: str | None, hf_config: dict, sentence_transformers: bool) -> str:
    """The task to serve, or a ``ConfigError`` that says why the model cannot do it.

    Inferred: a sentence-transformers directory is ``text_embedding``; otherwise the
    architecture's suffix decides, as in KServe. Requested: the checkpoint must carry the head
    the task needs; ``text_embedding`` takes an encoder or a decoder, not an encoder-decoder.
    """
    architecture = (hf_config.get("architectures") or ["?"])[0]
    inferred = architecture_task(architecture)
    if requested is None:
        if sentence_transformers:  # an embedding model, also when it is a decoder (Qwen3-Embedding)
            return EMBEDDING
        if inferred is None:
            raise ConfigError(
                f"no task can be inferred from the architecture {architecture}; set --task to one of {', '.join(TASKS)}"
            )
        return inferred
    if requested not in TASKS:
        raise ConfigError(f"--task {requested!r} is not a task; choose one of {', '.join(TASKS)}")
    _check_can_do(requested, architecture, inferred)
    return requested


def _check_can_do(task: str, architecture: str, inferred: str | None) -> None:
    if task == EMBEDDING:
        if inferred == TEXT2TEXT:
            raise ConfigError(
                f"--task {task}: {architecture} is an encoder-decoder model; embeddings are served for encoder models "
                "(BERT, RoBERTa, ...) and decoder models stepserve runs (pooled final hidden states)"
            )
        return
    if not architecture.endswith(_HEAD_OF[task]):
        raise ConfigError(
            f"--task {task}: the model's architecture {architecture} has "
            f"no {' / '.join(_HEAD_OF[task])} head, so it cannot do {task}"
        )
