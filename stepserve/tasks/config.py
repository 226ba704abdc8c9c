"""The task flags: KServe huggingfaceserver's names and meanings."""

from __future__ import annotations

from dataclasses import dataclass, field

from stepserve.config import ConfigError


@dataclass(frozen=True)
class TaskConfig:
    task: str | None = field(
        default=None,
        metadata={
            "help": (
                "text_generation, text2text_generation, text_embedding, sequence_classification, "
                "token_classification or fill_mask; default: inferred from the architecture as KServe does"
            )
        },
    )
    return_probabilities: bool = field(
        default=False,
        metadata={"help": "KServe routes: {class: probability} instead of the class index (classification, fill_mask)"},
    )
    return_raw_logits: bool = field(
        default=False,
        metadata={"help": "KServe routes: {class: logit} instead of the class index (classification, fill_mask)"},
    )
    return_token_type_ids: bool = field(
        default=False,
        metadata={"help": "always hand token_type_ids to the model, even where its tokenizer leaves them out"},
    )
    return_offsets_mapping: bool = field(
        default=False,
        metadata={"help": "token_classification: add each token's character offsets (an offset_mapping output)"},
    )
    disable_lower_case: bool = field(
        default=False, metadata={"help": "do not lower-case the input, whatever the tokenizer's config says"}
    )
    disable_special_tokens: bool = field(
        default=False, metadata={"help": "encode without the model's special tokens ([CLS], [SEP], </s>, ...)"}
    )

    def __post_init__(self) -> None:
        if self.return_probabilities and self.return_raw_logits:
            raise ConfigError("--return_probabilities and --return_raw_logits exclude each other; choose one")
