"""Documents and token sequences shared by training and evaluation.

- `seer_attn.data.sources`: where documents come from (local `.jsonl` / `.jsonl.gz` / `.txt` files,
  folders of shards, globs, hub datasets, built-in texts), streamed or cached, plus a check that
  training and evaluation sets share no document (`check_disjoint`).
- `seer_attn.data.sequences`: tokenising, packing into fixed-length training sequences, and
  weighted mixtures of sources (`build_sequences`).

`python -m seer_attn.data --train A[,B] --eval C[,D]` runs `check_disjoint` from the shell.
"""

from seer_attn.data.sequences import (
    boundary_token_ids,
    build_sequences,
    check_context_length,
    filter_min_tokens,
    load_token_documents,
    pack_sequences,
    parse_weights,
    tokenize_documents,
)
from seer_attn.data.sources import (
    BUILTIN_SOURCES,
    DATA_SUFFIXES,
    check_disjoint,
    find_overlap,
    load_documents,
    read_records,
    resolve_data_files,
    source_label,
)

__all__ = [
    "BUILTIN_SOURCES",
    "DATA_SUFFIXES",
    "resolve_data_files",
    "load_documents",
    "source_label",
    "read_records",
    "find_overlap",
    "check_disjoint",
    "boundary_token_ids",
    "tokenize_documents",
    "filter_min_tokens",
    "pack_sequences",
    "check_context_length",
    "parse_weights",
    "build_sequences",
    "load_token_documents",
]
