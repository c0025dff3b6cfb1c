"""Per-layer density budgets: spend a requested mean density where the layers need it.

At density 0.1 on SmolLM2 the first ~10 layers keep only 50-75% of their attention mass even with
the oracle's blocks, while most later layers keep 90-98% (`docs/results/final9/*/recall.json`): the
same density everywhere wastes budget on layers that do not need it.

A model calibrated once (`python -m seer_attn.evaluation.layer_budgets`, on calibration text) stores
per layer a *benefit curve* at a few `nz_ratio` values (`seerattn_layer_budget_curves`): minus the
LM-loss rise when only that layer is sparse (the default), or its attention recall. For any
requested `nz_ratio`, :func:`layer_nz_ratios` then water-fills the layers' concave curves so that the
mean per-layer `nz_ratio` equals the request and the summed benefit is as high as the curves allow.
The request keeps its meaning (the mean density), so a user still asks for 0.1 and gets about 0.1.

Only requests up to `seerattn_layer_budget_max_nz` (default 0.2) are redistributed. Above it the
curves' differences are at the calibration's noise level (one layer alone at density 0.3 moves the
loss by < 1e-3 nats on SmolLM2), and the allocation they produced lost PPL against the same density
in every layer (docs/RESULTS.md, "Gate quality"); at 0.1 it gained on both validation sets.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = [
    "concave_envelope", "allocate_layer_densities", "layer_nz_ratios", "check_layer_budget_curves", "layer_token_budgets",
    "check_decode_budget_curves",
]


def concave_envelope(points) -> list[tuple[float, float]]:
    """Upper concave hull of `(density, benefit)` points, sorted by density (the curve greedy filling needs)."""
    pts = sorted((float(x), float(y)) for x, y in points)
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the chord from hull[-2] to p
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate_layer_densities(curves, target: float) -> list[float]:
    """Per-layer densities with mean `target` that maximise the summed benefit (recall, or minus a loss rise).

    Args:
        curves: per layer, `(density, benefit)` points (at least one; densities > 0: an `nz_ratio`, or
            a decode token budget for :func:`layer_token_budgets`).
        target (float): the mean density to spend, between the mean smallest and the mean largest
            measured density of the layers.

    Returns:
        one density per layer. Every layer starts at its smallest measured density; the remaining
        budget goes segment by segment to the steepest rise of any layer's concave envelope.
    """
    if not curves or any(not c for c in curves):
        raise ValueError("allocate_layer_densities: every layer needs at least one (density, recall) point")
    hulls = [concave_envelope(c) for c in curves]
    lo = sum(h[0][0] for h in hulls) / len(hulls)
    hi = sum(h[-1][0] for h in hulls) / len(hulls)
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise ValueError(f"allocate_layer_densities: target {target} outside the measured range [{lo:.4g}, {hi:.4g}]")
    dens = [h[0][0] for h in hulls]
    budget = (target - lo) * len(hulls)
    segments = []
    for layer, h in enumerate(hulls):
        for (x1, y1), (x2, y2) in zip(h, h[1:]):
            segments.append(((y2 - y1) / (x2 - x1), layer, x2 - x1))
    # concave hulls: each layer's slopes fall, so the global order by slope fills each layer in order
    # (ties: the earlier layer first, so the result does not depend on the sort's stability)
    for _, layer, width in sorted(segments, key=lambda s: (-s[0], s[1])):
        if budget <= 0:
            break
        step = min(width, budget)
        dens[layer] += step
        budget -= step
    return dens


def _spread(curves: tuple, target: float) -> list[float]:
    """Per-layer budgets with mean `target` (water-filling inside the measured range; outside it the
    nearest end's proportions, scaled)."""
    hulls = [concave_envelope(c) for c in curves]
    lo = sum(h[0][0] for h in hulls) / len(hulls)
    hi = sum(h[-1][0] for h in hulls) / len(hulls)
    if target >= hi:
        return [h[-1][0] * target / hi for h in hulls]
    if target <= lo:
        return [h[0][0] * target / lo for h in hulls]
    return allocate_layer_densities(hulls, target)


_KEYS: dict[int, tuple] = {}


def _curves_key(curves) -> tuple:
    """The hashable form of `curves`, converted once per curves object: every layer of every forward
    (every decoding step) asks for its budget, and rebuilding the tuple each time costs host time."""
    hit = _KEYS.get(id(curves))
    if hit is not None and hit[0] is curves:
        return hit[1]
    key = tuple(tuple((float(x), float(y)) for x, y in c) for c in curves)
    if len(_KEYS) > 64:
        _KEYS.clear()
    _KEYS[id(curves)] = (curves, key)  # holds the object, so its id is not reused while the entry lives
    return key


@lru_cache(maxsize=64)
def _layer_nz_ratios(curves: tuple, nz_ratio: float) -> tuple[float, ...]:
    return tuple(min(1.0, d) for d in _spread(curves, nz_ratio))


def layer_nz_ratios(curves, nz_ratio: float, max_nz: float = 1.0) -> list[float]:
    """Per-layer `nz_ratio` whose mean is `nz_ratio` (see the module docstring); cached per request.

    Args:
        curves: `seerattn_layer_budget_curves`: per layer, a list of `[nz_ratio, benefit]` points.
        nz_ratio (float): the requested mean density in (0, 1]; outside the measured range the
            nearest end's proportions are scaled.
        max_nz (float): requests above it get `nz_ratio` in every layer.
    """
    if nz_ratio > max_nz:
        return [float(nz_ratio)] * len(curves)
    return list(_layer_nz_ratios(_curves_key(curves), float(nz_ratio)))


def _check_curves(curves, name: str, x_ok, x_desc: str, n_layers: int | None) -> None:
    if curves is None:
        return
    if not isinstance(curves, (list, tuple)) or not curves:
        raise ValueError(f"{name} must be None or a non-empty list (one curve per layer), got {type(curves).__name__}")
    for i, c in enumerate(curves):
        ok = isinstance(c, (list, tuple)) and len(c) > 0
        ok = ok and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            and x_ok(p[0]) for p in c
        )
        if not ok:
            raise ValueError(f"{name}[{i}] must be a non-empty list of [{x_desc}, benefit] pairs, got {c!r}")
    if n_layers is not None and len(curves) != n_layers:
        raise ValueError(f"{name} has {len(curves)} curves for {n_layers} layers")


def check_layer_budget_curves(curves, n_layers: int | None = None) -> None:
    """Raise ValueError unless `curves` is None or one non-empty list of `[nz_ratio in (0, 1], benefit]` per layer."""
    _check_curves(curves, "seerattn_layer_budget_curves", lambda x: 0.0 < x <= 1.0, "nz_ratio in (0, 1]", n_layers)


def check_decode_budget_curves(curves, n_layers: int | None = None) -> None:
    """Raise ValueError unless `curves` is None or one non-empty list of `[token_budget > 0, benefit]` per layer."""
    _check_curves(curves, "seerattn_decode_layer_budget_curves", lambda x: x > 0, "token_budget > 0", n_layers)


@lru_cache(maxsize=64)
def _layer_token_budgets(curves: tuple, budget: int, block_size: int) -> tuple[int, ...]:
    raw = _spread(curves, float(budget))
    # whole blocks (a layer keeps budget // block_size - 1 completed blocks); at least its own block
    return tuple(max(block_size, int(round(b / block_size)) * block_size) for b in raw)


def layer_token_budgets(curves, budget: int, block_size: int = 64) -> list[int]:
    """Per-layer decode token budgets whose mean is about `budget` (whole blocks), water-filling the
    layers' decode benefit curves (`seerattn_decode_layer_budget_curves`: per layer `[token_budget,
    benefit]` points, minus the decode-mode loss rise with only that layer sparse) as
    :func:`layer_nz_ratios` does for prefill densities; cached per request. Outside the measured
    range the nearest end's proportions are scaled."""
    return list(_layer_token_budgets(_curves_key(curves), int(budget), int(block_size)))
