"""Per-layer density budgets: spend a requested overall density where the layers need it.

At density 0.1 on SmolLM2 the first ~10 layers keep only 50-75% of their attention mass even with
the oracle's blocks, while most later layers keep 90-98% (`docs/results/final9/*/recall.json`): the
same density everywhere wastes budget on layers that do not need it. This module turns per-layer
recall-versus-density curves, measured with the `oracle_mass` selector on *calibration* text, into
`seerattn_layer_density_scale` (layer `l` then asks for `nz_ratio * scale[l]`):

- :func:`allocate_layer_densities`: given each layer's curve (recall at a few densities, linear in
  between, made concave), the densities that maximise the summed recall at a mean equal to the
  target, by greedy water-filling over the curves' segments (exact for concave curves);
- the CLI measures the curves with :func:`seer_attn.evaluation.recall.attention_recall` and writes
  `{"target", "densities", "scale", "curves"}` as JSON:

    python -m seer_attn.evaluation.layer_budgets --model runs/gates \\
        --dataset ../shared/data/calib-mini/train.jsonl --length 8192 --max_docs 4 --target 0.1 \\
        --output runs/gates/layer_budgets.json

Never calibrate on evaluation documents.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

__all__ = ["allocate_layer_densities", "concave_envelope", "measure_curves", "main"]

logger = logging.getLogger(__name__)

DEFAULT_GRID = (0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def concave_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper concave hull of `(density, recall)` points, sorted by density (the curve greedy filling needs)."""
    pts = sorted(points)
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


def allocate_layer_densities(curves: list[list[tuple[float, float]]], target: float) -> list[float]:
    """Per-layer densities with mean `target` that maximise the summed recall.

    Args:
        curves: per layer, `(density, recall)` points (at least one; densities in (0, 1]).
        target (float): the mean density to spend, between the smallest and largest measured
            densities of the layers.

    Returns:
        one density per layer. Every layer starts at its smallest measured density; the remaining
        budget goes segment by segment to the steepest rise of any layer's concave envelope.
    """
    if not curves or any(not c for c in curves):
        raise ValueError("allocate_layer_densities: every layer needs at least one (density, recall) point")
    hulls = [concave_envelope(c) for c in curves]
    lo = sum(h[0][0] for h in hulls) / len(hulls)
    hi = sum(h[-1][0] for h in hulls) / len(hulls)
    if not lo <= target <= hi:
        raise ValueError(f"allocate_layer_densities: target {target} outside the measured range [{lo:.4g}, {hi:.4g}]")
    dens = [h[0][0] for h in hulls]
    budget = (target - lo) * len(hulls)
    segments = []
    for layer, h in enumerate(hulls):
        for (x1, y1), (x2, y2) in zip(h, h[1:]):
            segments.append(((y2 - y1) / (x2 - x1), layer, x2 - x1))
    # concave hulls: each layer's slopes fall, so the global order by slope fills each layer in order
    for _, layer, width in sorted(segments, key=lambda s: -s[0]):
        if budget <= 0:
            break
        step = min(width, budget)
        dens[layer] += step
        budget -= step
    return dens


def measure_curves(model, docs, grid=DEFAULT_GRID) -> list[list[tuple[float, float]]]:
    """Per layer, `(nz_ratio, recall)` of `oracle_mass` at each `nz_ratio` of `grid`, averaged over `docs`.

    The x axis is the requested `nz_ratio`, not the realised density, because the scales multiply
    `nz_ratio` (at 8k the two agree within 10%; at a few blocks per row they do not).
    """
    from seer_attn.evaluation.recall import attention_recall

    sums: dict[tuple[int, float], list[float]] = {}
    for ids in docs:
        for row in attention_recall(model, ids, methods=("oracle_mass",), budgets=grid):
            for lay in row["layers"]:
                rec = lay["recall"]
                acc = sums.setdefault((lay["layer"], float(row["target"])), [0.0, 0])
                acc[0] += sum(rec) / len(rec) if isinstance(rec, list) else rec
                acc[1] += 1
    layers = sorted({k[0] for k in sums})
    return [[(nz, r / n) for (lay, nz), (r, n) in sorted(sums.items()) if lay == layer] for layer in layers]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a Seer model or gate-only checkpoint (the oracle needs no trained gate)")
    p.add_argument("--dataset", required=True, help="calibration text (a .jsonl/.txt/folder/glob as for training); never evaluation documents")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--max_docs", type=int, default=4)
    p.add_argument("--target", type=float, default=0.1, help="the nz_ratio the scales are for")
    p.add_argument("--grid", default=",".join(str(x) for x in DEFAULT_GRID))
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from seer_attn.evaluation.ppl import load_eval_documents
    from seer_attn.models import AutoSeerForCausalLM, load_tokenizer
    from seer_attn.training.data import boundary_token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoSeerForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tok = load_tokenizer(args.model)
    start_id, _ = boundary_token_ids(tok)
    # as evaluation feeds documents: the start token, then the first length - 1 tokens
    docs = [torch.tensor([start_id] + d[: args.length - 1]) for d in
            load_eval_documents(args.dataset, tok, args.length - 1, args.max_docs, split="train")]  # fmt: skip
    grid = [float(x) for x in args.grid.split(",")]
    with torch.no_grad():
        curves = measure_curves(model, docs, grid)
    dens = allocate_layer_densities(curves, args.target)
    result = {"target": args.target, "densities": dens, "scale": [d / args.target for d in dens], "curves": curves}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    logger.info("per-layer densities %s -> %s", [round(d, 3) for d in dens], args.output)
    return result


if __name__ == "__main__":
    main()
