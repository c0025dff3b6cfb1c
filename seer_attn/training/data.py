"""Text sources and token packing shared by distillation and PPL evaluation.

A *source* is one of:

- a hub dataset name (`togethercomputer/RedPajama-Data-1T-Sample`, `emozilla/pg19-test`), read with
  `datasets.load_dataset(name, subset, split=split)`;
- a local `.jsonl` / `.json` file (one document per record, text in `text_field`) or a `.txt` file
  (the whole file is one document), or a folder of such files;
- a built-in text that exists wherever Python does, so the default job needs no network:
  `builtin:python-stdlib` (the standard library's `.py` sources, without `site-packages`, test
  suites and `pydoc_data`) and `builtin:pydoc-topics` (the help texts in `pydoc_data.topics`). The
  two are disjoint: one is calibration text, the other evaluation text.

Token conventions (the same for training and evaluation, see `boundary_token_ids`):

- documents are tokenised *without* special tokens;
- every sequence fed to the model starts with the document-start token, as upstream's evaluation
  does (BOS + L-1 tokens), so the gates are trained on the position-0 sink they are evaluated on;
- training streams join documents with the document-end token and are cut into sequences of
  exactly `length` tokens; the remainder is dropped, so no pad token ever goes through the model
  (upstream padded with `[PAD]` and fed it unmasked).
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import datasets

__all__ = [
    "BUILTIN_SOURCES",
    "load_documents",
    "source_label",
    "boundary_token_ids",
    "tokenize_documents",
    "filter_min_tokens",
    "pack_sequences",
    "check_context_length",
]

logger = logging.getLogger(__name__)
BUILTIN_SOURCES = ("builtin:python-stdlib", "builtin:pydoc-topics")
_TEXT_SUFFIXES = (".jsonl", ".json", ".txt")


def _python_stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return [t for t in texts if t.strip()]


def _pydoc_topics_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [f"{name}\n\n{text}" for name, text in sorted(topics.items()) if text.strip()]


def _text_column(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise ValueError(f"{where} has no field {text_field!r}; its fields are {ds.column_names}")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _load_local(path: Path, text_field: str) -> datasets.Dataset:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"dataset folder {path} holds no {'/'.join(_TEXT_SUFFIXES)} files")
        return datasets.concatenate_datasets([_load_local(f, text_field) for f in files])
    if path.stat().st_size == 0:
        raise ValueError(f"dataset file {path} is empty")
    if path.suffix == ".txt":
        return datasets.Dataset.from_dict({"text": [path.read_text(encoding="utf-8", errors="replace")]})
    if path.suffix in (".jsonl", ".json"):
        return _text_column(datasets.load_dataset("json", data_files=str(path), split="train"), text_field, str(path))
    raise ValueError(f"dataset file {path} must end in {', '.join(_TEXT_SUFFIXES)}")


def load_documents(
    source: str,
    split: str = "train",
    text_field: str = "text",
    subset: str | None = None,
    max_documents: int | None = None,
    seed: int | None = None,
) -> datasets.Dataset:
    """Documents of a source (see the module docstring) as a `datasets.Dataset` with one column, `text`.

    Args:
        source (str): hub name, local file or folder, or one of `BUILTIN_SOURCES`.
        split (str): hub split. Default: `"train"`.
        text_field (str): field holding the text (hub and `.jsonl`). Default: `"text"`.
        subset (str, Optional): hub config name.
        max_documents (int, Optional): keep this many documents (after shuffling, if `seed` is set).
        seed (int, Optional): shuffle the documents with this seed; None keeps the source order.

    Raises:
        FileNotFoundError: a local path that does not exist (a name that looks like a path is never
            sent to the hub).
        ValueError: an empty file or source, or a missing text field.
    """
    if source == "builtin:python-stdlib":
        ds = datasets.Dataset.from_dict({"text": _python_stdlib_texts()})
    elif source == "builtin:pydoc-topics":
        ds = datasets.Dataset.from_dict({"text": _pydoc_topics_texts()})
    elif source.startswith("builtin:"):
        raise ValueError(f"unknown built-in source {source!r}; choose from {BUILTIN_SOURCES}")
    else:
        path = Path(source).expanduser()
        looks_local = path.suffix in _TEXT_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") != 1
        if path.exists():
            ds = _load_local(path, text_field)
        elif looks_local:
            raise FileNotFoundError(f"dataset {source!r} not found (looked at {path.resolve()})")
        else:
            ds = _text_column(datasets.load_dataset(source, subset, split=split), text_field, f"hub dataset {source}")
    ds = ds.filter(lambda t: bool(t and t.strip()), input_columns="text")
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} holds no non-empty documents")
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds


def source_label(source: str) -> str:
    """A short name for tables and plots: `../shared/data/pg19-mini/test.jsonl` -> `pg19-mini`."""
    if source.startswith("builtin:"):
        return source.split(":", 1)[1]
    path = Path(source)
    if path.suffix in _TEXT_SUFFIXES:
        return path.parent.name if path.stem in ("train", "test", "validation", "data") and path.parent.name else path.stem
    return source


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


def tokenize_documents(docs: datasets.Dataset, tokenizer, num_proc: int | None = None) -> datasets.Dataset:
    """Add `input_ids` (no special tokens) and `num_tokens` columns; drops `text`."""

    def tok(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "num_tokens": [len(x) for x in ids]}

    return docs.map(tok, batched=True, num_proc=num_proc, remove_columns=docs.column_names, desc="tokenising")


def filter_min_tokens(tokens: datasets.Dataset, min_tokens: int, source: str, why: str) -> datasets.Dataset:
    """Keep documents with at least `min_tokens` tokens; raise if none is left, saying how many were skipped."""
    if min_tokens <= 0:
        return tokens
    kept = tokens.filter(lambda n: n >= min_tokens, input_columns="num_tokens")
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


def pack_sequences(tokens: datasets.Dataset, length: int, start_id: int, end_id: int, num_proc: int | None = None) -> datasets.Dataset:
    """Cut the document stream into training sequences of exactly `length` tokens.

    Each sequence is `[start_id] + (length - 1)` stream tokens; the stream is the documents, each
    followed by `end_id` (one token only when `end_id == start_id`), in dataset order. Documents
    are packed in batches of 1000 and each batch's incomplete tail is dropped.

    Returns:
        a Dataset with one column, `input_ids`, every row of `length` ints.
    """
    if length < 2:
        raise ValueError(f"training length must be at least 2, got {length}")
    body = length - 1

    def pack(batch):
        stream: list[int] = []
        for ids in batch["input_ids"]:
            stream.extend(ids)
            stream.append(end_id)
        n = len(stream) // body
        return {"input_ids": [[start_id] + stream[i * body : (i + 1) * body] for i in range(n)]}

    packed = tokens.map(pack, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=tokens.column_names, desc="packing")
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
