"""Document sources: hub datasets, local files, folders of shards, globs, built-in texts.

A *source* is one of:

- a local file: `.jsonl`, `.json`, `.jsonl.gz`, `.json.gz` (one document per record, text in
  `text_field`) or `.txt` (the whole file is one document);
- a local folder: its data files (not recursive), e.g. a folder of `train-00000-of-00002.jsonl.gz`
  shards;
- a glob of such files (`data/*.jsonl.gz`, `shards/**/*.jsonl`);
- a hub dataset name (`emozilla/pg19-test`), read with `datasets.load_dataset(name, subset, split=split)`;
- a built-in text that exists wherever Python does, so the default job needs no network:
  `builtin:python-stdlib` (the standard library's `.py` sources, without `site-packages`, test
  suites and `pydoc_data`) and `builtin:pydoc-topics` (the help texts in `pydoc_data.topics`). The
  two are disjoint: one is calibration text, the other evaluation text.

Local data is checked before anything is read: a path or glob that matches nothing, a folder or
glob that lacks one of its `NAME-iiiii-of-nnnnn.EXT` shards, and an empty (or, gzip-compressed,
empty after decompression) file are named errors.

`streaming=True` returns a `datasets.IterableDataset` that reads shards lazily (no Arrow cache,
constant memory): for corpora larger than memory or disk cache. Without it, `datasets` writes an
Arrow cache (memory-mapped, about the size of the text) on first use and reuses it.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import random
import re
import sysconfig
import zlib
from collections import defaultdict
from pathlib import Path

import datasets

__all__ = [
    "BUILTIN_SOURCES",
    "DATA_SUFFIXES",
    "resolve_data_files",
    "load_documents",
    "source_label",
    "read_records",
    "find_overlap",
    "check_disjoint",
]

logger = logging.getLogger(__name__)
BUILTIN_SOURCES = ("builtin:python-stdlib", "builtin:pydoc-topics")
JSON_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json")
DATA_SUFFIXES = JSON_SUFFIXES + (".txt",)
_SHARD = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})$")
_GLOB_CHARS = ("*", "?", "[")


def _data_suffix(path: Path) -> str | None:
    return next((s for s in DATA_SUFFIXES if path.name.endswith(s)), None)


def _python_stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return [t for t in texts if t.strip()]


def _pydoc_topics_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [f"{name}\n\n{text}" for name, text in sorted(topics.items()) if text.strip()]


def _is_glob(source: str) -> bool:
    return any(c in source for c in _GLOB_CHARS)


def _looks_local(source: str) -> bool:
    # hub names are exactly `owner/name`; anything else that is not a built-in is a path
    path = Path(source).expanduser()
    return _is_glob(source) or _data_suffix(path) is not None or source.startswith((".", "/", "~")) or source.count("/") != 1


def _check_shard_sets(files: list[Path], where: str) -> None:
    """Raise if `NAME-iiiii-of-nnnnn.EXT` shards of one set are missing (a partly copied corpus)."""
    sets: dict[tuple, set[int]] = defaultdict(set)
    for f in files:
        suffix = _data_suffix(f)
        m = _SHARD.match(f.name[: -len(suffix)])
        if m:
            sets[(f.parent, m["prefix"], int(m["count"]), suffix)].add(int(m["index"]))
    for (parent, prefix, count, suffix), found in sets.items():
        missing = sorted(set(range(count)) - found)
        if missing:
            names = ", ".join(f"{prefix}-{i:05d}-of-{count:05d}{suffix}" for i in missing[:3])
            raise FileNotFoundError(
                f"{where}: shard {names}{' ...' if len(missing) > 3 else ''} missing from {parent} "
                f"({len(found)} of {count} present)"
            )


def _check_not_empty(path: Path) -> None:
    """Raise ValueError for an empty file, or a gzip file holding only whitespace (reads a few bytes)."""
    if path.stat().st_size == 0:
        raise ValueError(f"dataset shard {path} is empty (0 bytes)")
    if not path.name.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"dataset shard {path} is not a readable gzip file: {e}") from e
    raise ValueError(f"dataset shard {path} is empty (no data after decompression)")


def resolve_data_files(source: str) -> list[Path]:
    """The data files of a local source (file, folder or glob), sorted, each checked to be non-empty.

    Raises:
        FileNotFoundError: nothing at the path, a glob or folder with no data file, or a missing
            shard of a `NAME-iiiii-of-nnnnn` set in a folder or glob.
        ValueError: an empty shard, an unreadable gzip file, or a file of another type.
    """
    exts = "/".join(DATA_SUFFIXES)
    if _is_glob(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [f for f in files if f.is_file() and _data_suffix(f)]
        if not files:
            raise FileNotFoundError(f"dataset glob {source!r} matches no {exts} file")
        _check_shard_sets(files, f"dataset glob {source!r}")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and _data_suffix(p))
            if not files:
                raise FileNotFoundError(f"dataset folder {path} holds no {exts} files")
            _check_shard_sets(files, f"dataset folder {path}")
        elif path.exists():
            if _data_suffix(path) is None:
                raise ValueError(f"dataset file {path} must end in {', '.join(DATA_SUFFIXES)}")
            files = [path]
        else:
            raise FileNotFoundError(f"dataset {source!r} not found (looked at {path.resolve()})")
    for f in files:
        _check_not_empty(f)
    return files


def _text_column(ds, text_field: str, where: str):
    names = ds.column_names
    if names is not None and text_field not in names:
        raise ValueError(f"{where} has no field {text_field!r}; its fields are {names}")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _from_texts(texts: list[str], streaming: bool):
    ds = datasets.Dataset.from_dict({"text": texts})
    return ds.to_iterable_dataset() if streaming else ds


def _load_file(path: Path, text_field: str, streaming: bool):
    if _data_suffix(path) == ".txt":
        return _from_texts([path.read_text(encoding="utf-8", errors="replace")], streaming)
    # one load per file: shards may carry different extra fields, which one `json` load cannot unify
    ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=streaming)
    return _text_column(ds, text_field, str(path))


def load_documents(
    source: str,
    split: str = "train",
    text_field: str = "text",
    subset: str | None = None,
    max_documents: int | None = None,
    seed: int | None = None,
    streaming: bool = False,
):
    """Documents of a source (see the module docstring) with one column, `text`.

    Args:
        source (str): local file, folder or glob, hub name, or one of `BUILTIN_SOURCES`.
        split (str): hub split. Default: `"train"`.
        text_field (str): field holding the text (hub and JSON). Default: `"text"`.
        subset (str, Optional): hub config name.
        max_documents (int, Optional): keep this many documents (after shuffling, if `seed` is set).
        seed (int, Optional): shuffle the documents with this seed; None keeps the source order.
            Streaming shuffles the order of the files and then documents in a buffer of 64.
        streaming (bool): return a lazily read `datasets.IterableDataset`. Default: `False`.

    Returns:
        `datasets.Dataset` (or `IterableDataset` when streaming) with a `text` column and no empty
        documents.

    Raises:
        FileNotFoundError: a local path, folder, glob or shard that does not exist (a name that
            looks like a path is never sent to the hub).
        ValueError: an empty shard or source, or a missing text field.
    """
    if source == "builtin:python-stdlib":
        ds = _from_texts(_python_stdlib_texts(), streaming)
    elif source == "builtin:pydoc-topics":
        ds = _from_texts(_pydoc_topics_texts(), streaming)
    elif source.startswith("builtin:"):
        raise ValueError(f"unknown built-in source {source!r}; choose from {BUILTIN_SOURCES}")
    elif Path(source).expanduser().exists() or _looks_local(source):
        files = resolve_data_files(source)
        if streaming and seed is not None:
            random.Random(seed).shuffle(files)  # the shuffle buffer below only mixes nearby documents
        parts = [_load_file(f, text_field, streaming) for f in files]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    else:
        ds = datasets.load_dataset(source, subset, split=split, streaming=streaming)
        ds = _text_column(ds, text_field, f"hub dataset {source}")
    ds = ds.filter(lambda t: bool(t and t.strip()), input_columns="text")
    if streaming:
        if seed is not None:
            ds = ds.shuffle(seed=seed, buffer_size=64)
        return ds.take(max_documents) if max_documents is not None else ds
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} holds no non-empty documents")
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if max_documents is not None:
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds


def source_label(source: str) -> str:
    """A short name for tables and plots.

    `../shared/data/pg19-mini/test.jsonl` -> `pg19-mini`, `calib-large/` and `calib-large/*.jsonl.gz`
    -> `calib-large`, `builtin:pydoc-topics` -> `pydoc-topics`; hub names stay as they are.
    """
    if source.startswith("builtin:"):
        return source.split(":", 1)[1]
    path = Path(source.rstrip("/"))
    if _is_glob(source):
        fixed = [p for p in path.parts if not _is_glob(p)]
        return fixed[-1] if fixed else source
    suffix = _data_suffix(path)
    if suffix:
        stem = path.name[: -len(suffix)]
        generic = stem in ("train", "test", "validation", "data") or _SHARD.match(stem)
        return path.parent.name if generic and path.parent.name else stem
    return path.name if Path(source).expanduser().is_dir() else source


def read_records(source: str) -> list[dict]:
    """Every record of a local source as plain dicts (`.txt` files become `{"text", "source": path}`).

    For checks over whole files (e.g. :func:`check_disjoint`), not for training input.
    """
    records = []
    for f in resolve_data_files(source):
        if _data_suffix(f) == ".txt":
            records.append({"text": f.read_text(encoding="utf-8", errors="replace"), "source": str(f)})
            continue
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            if _data_suffix(f) in (".json", ".json.gz"):
                data = json.load(fh)
                records.extend(data if isinstance(data, list) else [data])
            else:
                records.extend(json.loads(line) for line in fh if line.strip())
    return records


def _keys(record: dict) -> dict[str, str]:
    keys = {}
    if record.get("text"):
        keys["text"] = hashlib.sha256(record["text"].encode("utf-8")).hexdigest()
    if record.get("source"):
        keys["source"] = record["source"]
    if record.get("title"):
        keys["title"] = " ".join(record["title"].lower().split())
    return keys


def find_overlap(train: list[dict], test: list[dict], fields=("text", "source", "title")) -> list[tuple[str, str]]:
    """`(field, value)` pairs that a record of `train` and a record of `test` share.

    Compared per field: the SHA-256 of `text`, `source` (repository + path), and `title`
    (lowercased, whitespace collapsed); a record without a field is not compared on it.
    """
    seen = defaultdict(set)
    for r in train:
        for k, v in _keys(r).items():
            seen[k].add(v)
    hits = []
    for r in test:
        keys = _keys(r)
        for k in fields:
            if k in keys and keys[k] in seen[k]:
                hits.append((k, r.get(k, keys[k]) if k != "text" else r.get("title") or keys[k][:12]))
    return hits


def check_disjoint(train_sources: list[str], test_sources: list[str]) -> None:
    """Raise ValueError when a training document is also an evaluation document (see :func:`find_overlap`).

    Local sources (files, folders, globs) are compared on every key, built-in ones on their text;
    hub datasets are skipped with a warning (checking them would download them). Reads every
    record, so it costs one pass over the files (a few seconds for `calib-large`).
    """

    def records(src: str) -> list[dict] | None:
        if src.startswith("builtin:"):
            return [{"text": t} for t in load_documents(src)["text"]]
        if Path(src).expanduser().exists() or _looks_local(src):
            return read_records(src)
        logger.warning("%s is a hub dataset: not checked for overlap", src)
        return None

    train = [r for s in train_sources for r in records(s) or []]
    for src in test_sources:
        if (test := records(src)) is None:
            continue
        hits = find_overlap(train, test)
        if hits:
            shown = "; ".join(f"{k} {v!r}" for k, v in hits[:5])
            raise ValueError(f"evaluation set {src!r} shares {len(hits)} document key(s) with the training data: {shown}")
