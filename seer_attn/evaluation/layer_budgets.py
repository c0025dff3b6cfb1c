"""Calibrate per-layer density budgets: measure each layer's benefit curve on calibration text.

The allocation itself lives in :mod:`seer_attn.modules.layer_budget` (a model with
`seerattn_layer_budget_curves` spreads every requested `nz_ratio` over its layers, maximising the
summed benefit). This module measures the curves, per layer at a grid of `nz_ratio` values, with the
`oracle_mass` selector and the model's own sparsity method (`adaptive` by default), averaged over a
few calibration documents, for one of two objectives:

- `loss` (default): minus the rise of the LM loss when *only* that layer is sparse at that density
  (:func:`measure_loss_curves`, `L x grid` forwards);
- `recall`: the layer's attention recall (:func:`measure_curves`, one recorded forward per grid
  point). Measured on SmolLM2 (docs/RESULTS.md), recall-optimal budgets move density into the first
  layers, raise the mean recall and still *lose* PPL: a layer's missed mass is not what the loss feels.

The CLI writes the curves as JSON and, with `--write_config`, into the checkpoint's `config.json`:

    python -m seer_attn.evaluation.layer_budgets --model runs/gates \\
        --dataset ../shared/data/calib-large/ --length 8192 --max_docs 4 --write_config

The oracle needs no trained gate, so the curves can be measured before or after distillation
(`python -m seer_attn.training.distill --layer_budget_docs 4` does it after training). Never
calibrate on evaluation documents.

`--stage decode` measures the same for decoding (:func:`measure_decode_loss_curves`): per layer and
token budget, minus the rise of the decode-mode loss (teacher forcing, every token attending only to
its selected blocks, `seerattn_mode="decode_eval"`) with only that layer sparse, the oracle picking
the blocks; `--write_config` stores them as `seerattn_decode_layer_budget_curves`, and every
requested `seerattn_decode_token_budget` is then spread over the layers
(:func:`seer_attn.modules.layer_budget.layer_token_budgets`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from seer_attn.modules.layer_budget import allocate_layer_densities, concave_envelope, layer_nz_ratios, layer_token_budgets

__all__ = [
    "allocate_layer_densities", "concave_envelope", "measure_curves", "measure_loss_curves", "measure_decode_loss_curves",
    "calibrate_layer_budgets", "main",
]
OBJECTIVES = ("loss", "recall")
STAGES = ("prefill", "decode")

logger = logging.getLogger(__name__)

DEFAULT_GRID = (0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
DEFAULT_DECODE_GRID = (128, 256, 512, 1024, 2048, 4096)  # token budgets


def measure_curves(model, docs, grid=DEFAULT_GRID, sparsity_method: str | None = None) -> list[list[list[float]]]:
    """Per layer, `[nz_ratio, recall]` of `oracle_mass` at each `nz_ratio` of `grid`, averaged over `docs`.

    Args:
        model: a Seer model; its own per-layer budgets are switched off while measuring (and restored).
        docs: token-id tensors `[S]` (start token first, as evaluation feeds them).
        grid: `nz_ratio` values in (0, 1].
        sparsity_method (str): `nz_ratio` or `adaptive` (default: the model's, or `nz_ratio` if it
            uses neither), so the curves describe the selection the model will make.

    The x axis is the requested `nz_ratio`, not the realised density, because the allocation sets
    `nz_ratio` (at 8k the two agree within 10%; at a few blocks per row they do not).
    """
    from seer_attn.evaluation.recall import attention_recall

    if sparsity_method is None:
        sparsity_method = model.config.seerattn_sparsity_method
        sparsity_method = sparsity_method if sparsity_method in ("nz_ratio", "adaptive") else "nz_ratio"
    saved = {k: getattr(model.config, k) for k in ("seerattn_layer_density_scale", "seerattn_layer_budget_curves")}
    model.set_seerattn(seerattn_layer_density_scale=None, seerattn_layer_budget_curves=None)
    sums: dict[tuple[int, float], list[float]] = {}
    try:
        for ids in docs:
            for row in attention_recall(model, ids, methods=("oracle_mass",), budgets=grid, sparsity_method=sparsity_method):
                for lay in row["layers"]:
                    rec = lay["recall"]
                    acc = sums.setdefault((lay["layer"], float(row["target"])), [0.0, 0])
                    acc[0] += sum(rec) / len(rec) if isinstance(rec, list) else rec
                    acc[1] += 1
    finally:
        model.set_seerattn(**saved)
    layers = sorted({k[0] for k in sums})
    return [[[nz, round(r / n, 6)] for (lay, nz), (r, n) in sorted(sums.items()) if lay == layer] for layer in layers]


def measure_loss_curves(model, docs, grid=DEFAULT_GRID, sparsity_method: str | None = None, selector: str = "oracle_mass",
                        progress: bool = True) -> list[list[list[float]]]:
    """Per layer, `[nz_ratio, -(loss rise)]`: the mean LM loss over `docs` with only that layer sparse at
    `nz_ratio` (every other layer exact), minus the all-dense loss, negated (0 at density 1).

    Args:
        model: a Seer model (its settings are restored afterwards).
        docs: token-id tensors `[S]` of one length (start token first); they run as one batch.
        grid: `nz_ratio` values in (0, 1]; 1.0 is added (no rise).
        sparsity_method (str): `nz_ratio` or `adaptive` (default: the model's, as in `measure_curves`).
        selector (str): who picks the blocks (`oracle_mass`: no trained gate needed; `gate`: the gates).
    """
    import torch
    from tqdm.auto import tqdm

    if sparsity_method is None:
        sparsity_method = model.config.seerattn_sparsity_method
        sparsity_method = sparsity_method if sparsity_method in ("nz_ratio", "adaptive") else "nz_ratio"
    n_layers = model.config.num_hidden_layers
    ids = torch.stack([d for d in docs])
    labels = ids.clone()
    labels[:, 0] = -100
    keys = ("seerattn_mode", "seerattn_selector", "seerattn_sparsity_method", "seerattn_nz_ratio", "seerattn_min_sparse_length",
            "seerattn_layer_density_scale", "seerattn_layer_budget_curves")
    saved = {k: getattr(model.config, k) for k in keys}
    was_training = model.training
    model.eval()

    def loss(**fields) -> float:
        model.set_seerattn(seerattn_mode="sparse", seerattn_selector=selector, seerattn_sparsity_method=sparsity_method,
                           seerattn_min_sparse_length=0, seerattn_layer_budget_curves=None, **fields)
        with torch.no_grad():
            return float(model(input_ids=ids, labels=labels, logits_to_keep=1, use_cache=False).lm_loss)

    grid = sorted({float(x) for x in grid if float(x) < 1.0})
    curves = [[] for _ in range(n_layers)]
    try:
        base = loss(seerattn_nz_ratio=1.0, seerattn_layer_density_scale=None)
        with tqdm(total=n_layers * len(grid), desc="layer loss curves", disable=not progress) as bar:
            for layer in range(n_layers):
                for nz in grid:
                    # every other layer asks for 2/nz times the density: min(1, 2) = exactly dense
                    scale = [1.0 if i == layer else 2.0 / nz for i in range(n_layers)]
                    rise = loss(seerattn_nz_ratio=nz, seerattn_layer_density_scale=scale) - base
                    curves[layer].append([nz, round(-rise, 7)])
                    bar.update(1)
                curves[layer].append([1.0, 0.0])
    finally:
        model.set_seerattn(**saved)
        model.train(was_training)
    return curves


def measure_decode_loss_curves(model, docs, grid=DEFAULT_DECODE_GRID, selector: str = "oracle",
                               progress: bool = True) -> list[list[list[float]]]:
    """Per layer, `[token_budget, -(loss rise)]`: the mean decode-mode LM loss over `docs` with only that
    layer decoding sparsely at `token_budget` (every other layer with a budget covering the whole
    context, i.e. exact), minus the same with every layer exact, negated; the point at the context
    length is 0.

    Args:
        model: a Seer model (its settings are restored afterwards); `selector` `oracle` needs no decode gate.
        docs: token-id tensors `[S]` of one length (start token first); they run as one batch.
        grid: token budgets > 0; budgets at or above the context length are dropped (they are exact).
        selector (str): `oracle`, `gate` (the decode gates), `quest` or `static`.
    """
    import torch
    from tqdm.auto import tqdm

    n_layers = model.config.num_hidden_layers
    ids = torch.stack([d for d in docs])
    S = ids.shape[1]
    labels = ids.clone()
    labels[:, 0] = -100
    keys = ("seerattn_mode", "seerattn_decode_selector", "seerattn_decode_token_budget", "seerattn_decode_threshold",
            "seerattn_decode_start_layer", "seerattn_decode_min_context", "seerattn_decode_layer_budget_scale",
            "seerattn_decode_layer_budget_curves")
    saved = {k: getattr(model.config, k) for k in keys}
    was_training = model.training
    model.eval()
    full = 2 * S  # a budget that covers every block of the context: the layer is exact

    def loss(budget: int, scale) -> float:
        model.set_seerattn(seerattn_mode="decode_eval", seerattn_decode_selector=selector, seerattn_decode_token_budget=int(budget),
                           seerattn_decode_threshold=None, seerattn_decode_start_layer=0, seerattn_decode_min_context=0,
                           seerattn_decode_layer_budget_curves=None, seerattn_decode_layer_budget_scale=scale)
        with torch.no_grad():
            return float(model(input_ids=ids, labels=labels, logits_to_keep=1, use_cache=False).lm_loss)

    grid = sorted({int(b) for b in grid if 0 < int(b) < S})
    curves = [[] for _ in range(n_layers)]
    try:
        base = loss(full, None)
        with tqdm(total=n_layers * len(grid), desc="decode layer loss curves", disable=not progress) as bar:
            for layer in range(n_layers):
                for b in grid:
                    scale = [1.0 if i == layer else full / b for i in range(n_layers)]
                    rise = loss(b, scale) - base
                    curves[layer].append([b, round(-rise, 7)])
                    bar.update(1)
                curves[layer].append([S, 0.0])
    finally:
        model.set_seerattn(**saved)
        model.train(was_training)
    return curves


def calibrate_layer_budgets(model, tokenizer, source: str, length: int = 8192, max_docs: int = 4,
                            grid=None, split: str = "train", objective: str = "loss",
                            selector: str | None = None, stage: str = "prefill") -> list[list[list[float]]]:
    """Measure the curves (`objective` "loss" or "recall"; `stage` "prefill" or "decode") on the first
    `max_docs` documents of `source` with >= `length` - 1 tokens and store them in the model's config
    (`seerattn_layer_budget_curves`, or `seerattn_decode_layer_budget_curves` for decode; saved with
    the next `save_pretrained`). `grid` defaults to the stage's (densities, or token budgets);
    `selector` to the stage's oracle."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "decode" and objective != "loss":
        raise ValueError("decode layer curves are measured with the loss objective only")
    import torch

    from seer_attn.data import boundary_token_ids, load_token_documents

    start_id, _ = boundary_token_ids(tokenizer)
    device = next(model.parameters()).device
    # as evaluation feeds documents: the start token, then the first length - 1 tokens
    docs = [torch.tensor([start_id] + d[: length - 1], device=device)
            for d in load_token_documents(source, tokenizer, length - 1, max_docs, split=split)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if stage == "decode":
            curves = measure_decode_loss_curves(model, docs, grid or DEFAULT_DECODE_GRID, selector=selector or "oracle")
        elif objective == "loss":
            curves = measure_loss_curves(model, docs, grid or DEFAULT_GRID, selector=selector or "oracle_mass")
        else:
            curves = measure_curves(model, docs, grid or DEFAULT_GRID)
    model.train(was_training)
    field = "seerattn_decode_layer_budget_curves" if stage == "decode" else "seerattn_layer_budget_curves"
    model.set_seerattn(**{field: curves})
    logger.info("%s layer budget curves (%s) from %d documents of %s (%d layers)", stage, objective, len(docs), source, len(curves))
    return curves


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a Seer model or gate-only checkpoint (the oracle needs no trained gate)")
    p.add_argument("--dataset", required=True, help="calibration text (a .jsonl/.jsonl.gz/folder/glob as for training); never evaluation documents")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--max_docs", type=int, default=4)
    p.add_argument("--stage", default="prefill", choices=STAGES, help="prefill densities, or decode token budgets")
    p.add_argument("--grid", default=None, help="nz_ratio values (prefill) or token budgets (decode); default: the stage's grid")
    p.add_argument("--objective", default="loss", choices=OBJECTIVES, help="what the allocation maximises (see the module docstring)")
    p.add_argument("--selector", default=None, choices=("oracle_mass", "oracle", "gate", "quest", "static"),
                   help="loss objective: whose blocks the single-layer sparse forwards keep (default and measured recipe: "
                        "oracle_mass for prefill, oracle for decode)")
    p.add_argument("--show", default=None, help="requests whose per-layer allocation is logged and written "
                                                "(default: 0.5,0.3,0.1 for prefill, 512,1024,2048 for decode)")
    p.add_argument("--output", default=None, help="JSON with the curves and the allocations (default: <model>/layer_budgets.json)")
    p.add_argument("--write_config", action="store_true", help="also store the curves in <model>/config.json (a local checkpoint)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from seer_attn.models import AutoSeerForCausalLM, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoSeerForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tok = load_tokenizer(args.model)
    decode = args.stage == "decode"
    prefill_sel, decode_sel = ("oracle_mass", "gate"), ("oracle", "gate", "quest", "static")
    if args.selector is not None and args.selector not in (decode_sel if decode else prefill_sel):
        raise ValueError(f"--selector {args.selector!r} is not a {args.stage} selector: choose from {decode_sel if decode else prefill_sel}")
    grid = [(int if decode else float)(x) for x in args.grid.split(",")] if args.grid else None
    curves = calibrate_layer_budgets(model, tok, args.dataset, args.length, args.max_docs, grid, objective=args.objective,
                                     selector=args.selector, stage=args.stage)
    show = args.show or ("512,1024,2048" if decode else "0.5,0.3,0.1")
    bs = model.config.seerattn_gate_block_size
    shown = {t: (layer_token_budgets(curves, int(t), bs) if decode else [round(x, 4) for x in layer_nz_ratios(curves, float(t))])
             for t in show.split(",") if t}
    for t, d in shown.items():
        logger.info("%s %s -> per layer %s", "token budget" if decode else "nz_ratio", t, d)
    result = {"dataset": args.dataset, "length": args.length, "max_docs": args.max_docs, "objective": args.objective,
              "stage": args.stage, "selector": args.selector or ("oracle" if decode else "oracle_mass"),
              "curves": curves, "allocations": shown}
    out = Path(args.output) if args.output else Path(args.model) / "layer_budgets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.write_config:
        cfg_path = Path(args.model) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--write_config needs a local checkpoint folder with config.json, not {args.model!r}")
        cfg = json.loads(cfg_path.read_text())
        cfg["seerattn_decode_layer_budget_curves" if decode else "seerattn_layer_budget_curves"] = curves
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        logger.info("curves written into %s", cfg_path)
    logger.info("layer budgets -> %s", out)
    return result


if __name__ == "__main__":
    main()
