"""Tiny random-weight encoder models for the task tests, built offline from transformers'
config classes: BERT (WordPiece tokenizer), RoBERTa (byte-level BPE), T5 (unigram), saved with
their tokenizers, optionally as sentence-transformers directories."""

from __future__ import annotations

import json
import string
from pathlib import Path

WORDS = (
    "the capital of france is paris a cat dog sat on mat hello world query document relevant about "
    "sky blue green red tree house city river new york based in company name big small fast slow"
).split()

BERT_COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _bert_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase) + list(string.digits)
    tokens += list(".,!?'-") + ["##" + c for c in string.ascii_lowercase] + WORDS
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def save_bert_tokenizer(directory: Path) -> int:
    from transformers import BertTokenizer

    vocab = _bert_vocab()
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(directory)
    return len(vocab)


def write_bert(directory: Path, kind: str = "model", seed: int = 0, **overrides) -> Path:
    """kind: model (BertModel), seq (BertForSequenceClassification), token, masked."""
    import torch
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    vocab = save_bert_tokenizer(directory)
    config = tf.BertConfig(vocab_size=vocab, pad_token_id=0, **(BERT_COMMON | overrides))
    cls = {
        "model": tf.BertModel,
        "seq": tf.BertForSequenceClassification,
        "token": tf.BertForTokenClassification,
        "masked": tf.BertForMaskedLM,
    }[kind]
    torch.manual_seed(seed)
    model = cls(config)
    _randomize(model)
    model.save_pretrained(directory)
    return directory


def _randomize(model) -> None:
    """Wider random weights than the init (and non-zero biases), so that outputs differ visibly."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name:
                p.normal_(0.0, 0.2)


def write_sentence_transformer(directory: Path, pooling: str = "mean", normalize: bool = True, **config_extra) -> Path:
    write_bert(directory, "model", seed=3)
    return add_sentence_transformers_files(directory, pooling, normalize, **config_extra)


def add_sentence_transformers_files(
    directory: Path, pooling: str = "mean", normalize: bool = True, **config_extra
) -> Path:
    """modules.json (Transformer, Pooling, optionally Normalize), the pooling config, a max_seq_length of 64."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    keys = {
        "mean": "pooling_mode_mean_tokens",
        "cls": "pooling_mode_cls_token",
        "max": "pooling_mode_max_tokens",
        "last": "pooling_mode_lasttoken",
    }
    pool_config = {key: key == keys[pooling] for key in keys.values()}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pool_config))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    if config_extra:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | config_extra))
    return directory


def write_roberta(directory: Path, seed: int = 4) -> Path:
    import torch
    import transformers as tf
    from tokenizers import pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tf.RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)
    config = tf.RobertaConfig(
        vocab_size=len(vocab),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **(BERT_COMMON | {"max_position_embeddings": 130, "type_vocab_size": 1}),
    )
    torch.manual_seed(seed)
    model = tf.RobertaModel(config)
    _randomize(model)
    model.save_pretrained(directory)
    return directory


def write_t5(directory: Path, seed: int = 5) -> Path:
    import torch
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in string.ascii_lowercase + "▁"]
    pieces += [("▁" + w, -0.5) for w in WORDS]
    tokenizer = tf.T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(directory)
    config = tf.T5Config(
        vocab_size=len(pieces),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        n_positions=128,
    )
    torch.manual_seed(seed)
    model = tf.T5ForConditionalGeneration(config)
    _randomize(model)
    model.save_pretrained(directory)
    return directory


def write_distilbert(directory: Path, seed: int = 9) -> Path:
    """A model whose forward takes no token_type_ids."""
    import torch
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    vocab = save_bert_tokenizer(directory)
    config = tf.DistilBertConfig(
        vocab_size=vocab,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = tf.DistilBertModel(config)
    _randomize(model)
    model.save_pretrained(directory)
    return directory
