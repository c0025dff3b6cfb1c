"""Tokenising documents and packing them into fixed-length training sequences; weighted mixtures.

Token conventions (the same for training and evaluation, see `boundary_token_ids`):

- documents are tokenised *without* special tokens;
- every sequence fed to the model starts with the document-start token, as upstream's evaluation
  does (BOS + L-1 tokens), so the gates are trained on the position-0 sink they are evaluated on;
- training streams join documents with the document-end token and are cut into sequences of
  exactly `length` tokens; the remainder is dropped, so no pad token ever goes through the model
  (upstream padded with `[PAD]` and fed it unmasked).

Every function takes a `datasets.Dataset` or, for streamed corpora, a `datasets.IterableDataset`
(lazy: nothing is tokenised before the Trainer asks for it, and nothing can be counted).
"""

from __future__ import annotations

import logging

import datasets
import numpy as np

from seer_attn.data.sources import load_documents

__all__ = [
    "boundary_token_ids",
    "tokenize_documents",
    "filter_min_tokens",
    "pack_sequences",
    "check_context_length",
    "parse_weights",
    "build_sequences",
    "load_token_documents",
]

logger = logging.getLogger(__name__)
# documents per tokenising / packing batch when streaming: each batch drops its incomplete last
# sequence (< 1% of the tokens of 16 calib-large documents at 8k), and the shuffle buffer's worth
# of batches is tokenised before the first sequence comes out
STREAM_PACK_BATCH = 16


def _is_stream(ds) -> bool:
    return isinstance(ds, datasets.IterableDataset)


def boundary_token_ids(tokenizer) -> tuple[int, int]:
    """`(start_id, end_id)`: the token that opens every sequence and the one that ends each document.

    - start: the tokenizer's BOS when it adds one by itself (Llama 2/3: `<s>`, `<|begin_of_text|>`);
      otherwise `<|endoftext|>` when the vocabulary has it (GPT-2 / SmolLM style: SmolLM2's
      tokenizer names `<|im_start|>` as BOS, a chat-template token, while its pretraining
      separated documents with `<|endoftext|>`, id 0); otherwise BOS, otherwise EOS.
    - end: `<|endoftext|>` when the vocabulary has it, otherwise EOS (Llama 3 base:
      `<|end_of_text|>`).
    """
    vocab = tokenizer.get_vocab()
    eot = vocab.get("<|endoftext|>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    probe = tokenizer("a").input_ids
    if bos is not None and probe and probe[0] == bos:
        start = bos
    elif eot is not None:
        start = eot
    else:
        start = bos if bos is not None else eos
    end = eot if eot is not None else eos
    if start is None or end is None:
        raise ValueError("the tokenizer has no BOS, EOS or <|endoftext|> token to mark documents with")
    return int(start), int(end)


def tokenize_documents(docs, tokenizer, num_proc: int | None = None, batch_size: int = 64):
    """Add `input_ids` (no special tokens) and `num_tokens` columns; drops `text`.

    `batch_size` documents are tokenised at once: long documents make big Python lists, so a
    small batch bounds the memory (a 300-document, 16M-token shard in one batch peaks at 3.5 GB).
    """

    def tok(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "num_tokens": [len(x) for x in ids]}

    if _is_stream(docs):
        return docs.map(tok, batched=True, batch_size=batch_size, remove_columns=["text"])
    return docs.map(tok, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=docs.column_names,
                    desc="tokenising")


def filter_min_tokens(tokens, min_tokens: int, source: str, why: str):
    """Keep documents with at least `min_tokens` tokens; raise if none is left, saying how many were skipped.

    A stream is filtered lazily (and cannot be checked up front).
    """
    if min_tokens <= 0:
        return tokens
    kept = tokens.filter(lambda n: n >= min_tokens, input_columns="num_tokens")
    if _is_stream(tokens):
        return kept
    skipped = len(tokens) - len(kept)
    if len(kept) == 0:
        longest = max(tokens["num_tokens"]) if len(tokens) else 0
        raise ValueError(
            f"no document of {source!r} is long enough: all {skipped} documents have fewer than {min_tokens} "
            f"tokens ({why}); the longest has {longest}. Use a shorter length or a source with longer documents."
        )
    if skipped:
        logger.info("%s: skipped %d of %d documents shorter than %d tokens (%s)", source, skipped, len(tokens), min_tokens, why)
    return kept


def pack_sequences(tokens, length: int, start_id: int, end_id: int, num_proc: int | None = None, batch_size: int = 1000):
    """Cut the document stream into training sequences of exactly `length` tokens.

    Each sequence is `[start_id] + (length - 1)` stream tokens; the stream is the documents, each
    followed by `end_id` (one token only when `end_id == start_id`), in dataset order. Documents
    are packed in batches of `batch_size` and each batch's incomplete tail is dropped.

    Returns:
        a Dataset (IterableDataset for a stream) with one column, `input_ids`, every row of `length` ints.
    """
    if length < 2:
        raise ValueError(f"training length must be at least 2, got {length}")
    body = length - 1

    sep = np.array([end_id], dtype=np.int64)

    def pack(batch):
        # numpy, not Python lists: a batch of long documents holds millions of tokens
        pieces = [p for ids in batch["input_ids"] for p in (np.asarray(ids, dtype=np.int64), sep)]
        stream = np.concatenate(pieces) if pieces else sep[:0]
        n = len(stream) // body
        rows = np.empty((n, length), dtype=np.int64)
        rows[:, 0] = start_id
        rows[:, 1:] = stream[: n * body].reshape(n, body)
        return {"input_ids": rows}

    if _is_stream(tokens):
        return tokens.map(pack, batched=True, batch_size=batch_size, remove_columns=["input_ids", "num_tokens"])
    packed = tokens.with_format("numpy").map(
        pack, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=tokens.column_names, desc="packing"
    ).with_format(None)
    if len(packed) == 0:
        total = sum(tokens["num_tokens"]) + len(tokens)
        raise ValueError(f"the dataset has {total} tokens in all, not enough for one sequence of {length} tokens")
    return packed


def check_context_length(config, length: int) -> None:
    """Raise when `length` exceeds `max_position_embeddings` and the model has no rope scaling."""
    max_pos = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if max_pos is not None and length > max_pos and rope_type in (None, "default"):
        raise ValueError(
            f"length {length} exceeds the model's max_position_embeddings ({max_pos}) and the model has no "
            f"rope scaling; positions beyond {max_pos} were never trained. Use a length <= {max_pos}, or a "
            f"model with rope scaling (e.g. YaRN or llama3) for longer inputs."
        )


def parse_weights(weights: str | list[float] | None, num_sources: int) -> list[float] | None:
    """`"0.7,0.3"` -> `[0.7, 0.3]` normalised to sum 1; None stays None.

    Raises ValueError when the count differs from the number of sources or a weight is not > 0.
    """
    if weights is None or weights == "":
        return None
    w = [float(x) for x in weights.replace(" ", ",").split(",") if x] if isinstance(weights, str) else list(map(float, weights))
    if len(w) != num_sources:
        raise ValueError(f"got {len(w)} dataset weights for {num_sources} dataset(s); give one weight per dataset")
    if any(not x > 0 for x in w):
        raise ValueError(f"dataset weights must all be > 0, got {w}")
    return [x / sum(w) for x in w]


def build_sequences(
    sources: str | list[str],
    tokenizer,
    length: int,
    weights: str | list[float] | None = None,
    split: str = "train",
    text_field: str = "text",
    subset: str | None = None,
    max_documents: int | None = None,
    min_doc_tokens: int = 0,
    seed: int = 0,
    streaming: bool = False,
    num_proc: int | None = None,
    shuffle_buffer: int = 256,
):
    """Training sequences of `length` tokens from one source or a weighted mixture of several.

    Each source is loaded (documents shuffled with `seed`), tokenised, filtered by `min_doc_tokens`
    and packed on its own, so a sequence never mixes sources. Several sources are then:

    - without `weights`: concatenated (each contributes all its sequences);
    - with `weights`: interleaved at random (`datasets.interleave_datasets`, `seed`), each sequence
      drawn from source `i` with probability `weights[i]`. Sequences have equal length, so the
      weights are shares of *tokens*. Sampling continues until every source has been used up once
      (`all_exhausted`): smaller sources repeat rather than the larger ones being cut.

    Args:
        sources (str | list[str]): one source or several (a comma-separated string is split), see
            `seer_attn.data.sources`.
        weights (str | list[float], Optional): one positive weight per source (normalised).
        max_documents, min_doc_tokens: per source.
        streaming (bool): read lazily (`IterableDataset`): no Arrow cache and no up-front
            tokenisation, for corpora larger than memory. The result has no length, so a Trainer
            needs `max_steps`; sequences are shuffled in a buffer of `shuffle_buffer` (and files
            and documents in smaller ones) instead of globally.
        num_proc (int, Optional): tokenising / packing processes (not streamed).

    Returns:
        `input_ids` rows of `length` ints, torch-formatted (`Dataset` or `IterableDataset`).
    """
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s]
    if not sources:
        raise ValueError("give at least one dataset")
    w = parse_weights(weights, len(sources))
    start, end = boundary_token_ids(tokenizer)
    parts = []
    for source in sources:
        docs = load_documents(source, split, text_field, subset, max_documents, seed=seed, streaming=streaming)
        if streaming and next(iter(docs), None) is None:
            raise ValueError(f"dataset {source!r} holds no non-empty documents")
        tokens = tokenize_documents(docs, tokenizer, num_proc, STREAM_PACK_BATCH if streaming else 64)
        tokens = filter_min_tokens(tokens, min_doc_tokens, source, f"min_doc_tokens {min_doc_tokens}")
        packed = pack_sequences(tokens, length, start, end, num_proc, STREAM_PACK_BATCH if streaming else 1000)
        if not streaming:
            logger.info("%s: %d documents -> %d sequences of %d tokens", source, len(tokens), len(packed), length)
        parts.append(packed)
    if len(parts) == 1:
        out = parts[0]
    elif w is None:
        out = datasets.concatenate_datasets(parts)
    else:
        out = datasets.interleave_datasets(parts, probabilities=w, seed=seed, stopping_strategy="all_exhausted")
        if not streaming:
            logger.info(
                "mixture of %s with weights %s: %d sequences (sources had %s)",
                sources, [round(x, 4) for x in w], len(out), [len(p) for p in parts],
            )
    if streaming:
        out = out.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return out.with_format("torch")


def load_token_documents(
    source: str,
    tokenizer,
    min_tokens: int,
    max_docs: int | None = None,
    split: str = "test",
    text_field: str = "text",
    subset: str | None = None,
) -> list[list[int]]:
    """Token ids of the first `max_docs` documents of `source` with at least `min_tokens` tokens
    (no special tokens), in the source's order; what evaluation and calibration score.

    With `max_docs`, documents are read and tokenised one at a time until enough are found (a few
    calibration documents from a 100M-character corpus need not tokenise all of it).

    Raises ValueError saying how many documents were skipped when none is long enough.
    """
    docs = load_documents(source, split, text_field, subset)
    if max_docs is None:
        tokens = filter_min_tokens(tokenize_documents(docs, tokenizer), min_tokens, source,
                                   f"each scored document needs {min_tokens} tokens")
        return [list(ids) for ids in tokens["input_ids"]]
    found, longest = [], 0
    for text in docs["text"] if len(docs) <= max_docs else (docs[i]["text"] for i in range(len(docs))):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) >= min_tokens:
            found.append(list(ids))
            if len(found) == max_docs:
                break
    if not found:
        raise ValueError(
            f"no document of {source!r} is long enough: all {len(docs)} documents have fewer than {min_tokens} "
            f"tokens (each scored document needs them); the longest has {longest}. Use a shorter length or a source "
            "with longer documents."
        )
    return found
