"""Per-model `seerattn_min_sparse_length`: the length from which the sparse path beats dense SDPA.

Below some length the gate's fixed cost and the sparse kernel's lower efficiency make SeerAttention
slower than dense SDPA (cuDNN); that length depends on the model shape (a narrow model has little
attention work per token to save) and on the density. `seerattn_min_sparse_length="auto"` resolves it
per model from :data:`MEASURED_CROSSOVERS`, filled from `benchmarks/bench_prefill.py --crossover`
(which prints the entry to paste, measured on one GPU kind: see `benchmarks/RESULTS.md`):

1. the model's own shape `(Hq, Hkv, head_dim, hidden_size)` is in the table: its crossovers, one per
   measured density, interpolated geometrically in the configured `nz_ratio` (clamped at the ends);
2. otherwise, with at least two measured shapes: a fit `log S* = a + b log(Hq * head_dim)` per
   measured density over the table (attention work per token grows with `Hq * head_dim`, the gate's
   cost with it too, and the crossover moves accordingly);
3. otherwise :data:`DEFAULT_MIN_SPARSE_LENGTH` (and one log line saying so).

The result is rounded up to a multiple of 1024.
"""

from __future__ import annotations

import functools
import logging
import math

__all__ = ["DEFAULT_MIN_SPARSE_LENGTH", "MEASURED_CROSSOVERS", "crossover_length", "resolve_min_sparse_length"]

logger = logging.getLogger(__name__)

DEFAULT_MIN_SPARSE_LENGTH = 16384

# (Hq, Hkv, head_dim, hidden_size) -> {nz_ratio: shortest length from which sparse beats dense SDPA}
# H100 80GB, torch 2.11 + triton 3.6, eager (no CUDA graphs), random weights; `python
# benchmarks/bench_prefill.py --suite` (benchmarks/RESULTS.md, session 3). Measured with a one-summary
# gate and per-row top-k; the benchmark now uses the model's own gate design and sparsity method (the
# default 4/2 summaries + adaptive costs more at 32k+, so these lengths are a lower bound): re-measure.
# Below these lengths the sparse path's ~0.8-1 ms of fixed per-layer cost (host-side launches of the
# gate, selection and kernel) exceeds what it saves.
MEASURED_CROSSOVERS: dict[tuple[int, int, int, int], dict[float, int]] = {
    (9, 3, 64, 576): {0.5: 24576, 0.1: 24576},  # SmolLM2-135M
    (32, 8, 128, 4096): {0.5: 12288, 0.1: 12288},  # Llama-3-8B shape
}


def _interp(points: dict[float, float], nz: float) -> float:
    xs = sorted(points)
    if nz <= xs[0]:
        return points[xs[0]]
    if nz >= xs[-1]:
        return points[xs[-1]]
    for a, b in zip(xs, xs[1:]):
        if a <= nz <= b:
            t = (nz - a) / (b - a)
            return math.exp((1 - t) * math.log(points[a]) + t * math.log(points[b]))
    raise AssertionError("unreachable")


def crossover_length(num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int, nz_ratio: float,
                     table: dict | None = None) -> int | None:  # fmt: skip
    """The crossover for this shape and density from `table` (default: the measured one), or None."""
    table = MEASURED_CROSSOVERS if table is None else table
    key = (num_heads, num_kv_heads, head_dim, hidden_size)
    if key in table:
        s = _interp(table[key], nz_ratio)
    else:
        by_d: dict[float, list[tuple[float, float]]] = {}
        for (hq, _, d, _), row in table.items():
            for nz, length in row.items():
                by_d.setdefault(nz, []).append((math.log(hq * d), math.log(length)))
        fits = {}
        for nz, pts in by_d.items():
            xs = {x for x, _ in pts}
            if len(xs) < 2:
                continue
            mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
            b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
            fits[nz] = math.exp(my + b * (math.log(num_heads * head_dim) - mx))
        if not fits:
            return None
        s = _interp(fits, nz_ratio)
    return int(math.ceil(s / 1024) * 1024)


@functools.lru_cache(maxsize=256)
def _resolve(value, num_heads, num_kv_heads, head_dim, hidden_size, nz_ratio) -> int:
    if value != "auto":
        return int(value)
    s = crossover_length(num_heads, num_kv_heads, head_dim, hidden_size, nz_ratio)
    if s is None:
        logger.warning(
            "seerattn_min_sparse_length='auto': no measured crossover for (Hq, Hkv, D, hidden) = (%d, %d, %d, %d); "
            "using %d (run benchmarks/bench_prefill.py --crossover to measure it)",
            num_heads, num_kv_heads, head_dim, hidden_size, DEFAULT_MIN_SPARSE_LENGTH,
        )  # fmt: skip
        return DEFAULT_MIN_SPARSE_LENGTH
    return s


def resolve_min_sparse_length(config) -> int:
    """`config.seerattn_min_sparse_length` as a number of tokens (`"auto"` resolved for the config's shape)."""
    value = getattr(config, "seerattn_min_sparse_length", DEFAULT_MIN_SPARSE_LENGTH)
    if value != "auto":
        return int(value)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return _resolve(value, config.num_attention_heads, kv, head_dim, config.hidden_size, float(config.seerattn_nz_ratio))
