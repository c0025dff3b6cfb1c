"""Perplexity of SeerAttention against dense attention and reference selectors, upstream's protocol.

Protocol (method-spec §7, `--truncate` mode):

- documents are tokenised without special tokens; those with fewer than `min_doc_tokens` tokens
  (default: the longest length minus one, so every length scores the same documents) are skipped,
  and the first `max_docs` of the rest are kept, in file order;
- at length `L` each document becomes `[start] + its first L-1 tokens`, where `start` is the
  tokenizer's document-start token (`seer_attn.data.boundary_token_ids`: BOS for Llama;
  `<|endoftext|>` for SmolLM2, whose nominal BOS `<|im_start|>` is a chat token);
- one forward per document with labels and `logits_to_keep=1` (chunked cross-entropy, so no
  `[L, vocab]` logits): the document's NLL is the mean over its L-1 predicted tokens;
- PPL = exp(mean over documents of the per-document NLL).

One loaded model serves every row, switched with `set_seerattn`:

- `dense`: plain attention (one row per dataset and length);
- `seer` (the trained gates) and the reference selectors `oracle` (top blocks of the true 2D
  max-pooled attention map), `oracle_mass` (of the true block mass), `pooled` (the gate's scoring
  with no learned weights: avg-pooled Q against avg-pooled K with RoPE at block positions, the
  floor a trained gate must clear), `static` (sink block + most recent blocks) and `random`, each
  at every `nz_ratio` budget (the same per-row block count for every method, hence about the same
  realised density);
- with `--budget_methods nz_ratio,adaptive` every method also runs `adaptive` selection at each
  `nz_ratio` budget (the per-row top-k budget spent over all rows and heads of a layer);
  `nz_ratio+layers` / `adaptive+layers` do the same with the requested density spread over the
  layers by the calibrated benefit curves (`seerattn_layer_budget_curves` of the checkpoint, or
  `--layer_budgets curves.json` from `seer_attn.evaluation.layer_budgets`); every other row runs
  the same density in every layer, whatever the checkpoint's config says;
- with `--top_ps`, `seer`, `oracle`, `oracle_mass` and `pooled` keep each row's most probable blocks
  up to that cumulative probability;
- with `--thresholds`, `seer`, `oracle`, `oracle_mass` and `pooled` keep blocks whose probability
  exceeds the threshold. `static` and `random` are skipped there: their scores are not
  probabilities, and the figure compares all methods at their realised densities anyway.

Every row reports its realised density over the causal block triangle (all layers and heads).
With `--recall` (default on) every sparse row also measures, in the same forwards, the attention
recall (share of each query's exact attention that the kept blocks hold) and the overlap with
`oracle_mass`'s blocks at the same settings, per layer and head (`seer_attn.evaluation.recall`;
one extra dense attention pass per layer). Outputs in `--output_dir`: `ppl_results.json` (records
`{dataset, context_length, method, sparsity_method, target, density, ppl, num_docs, recall,
overlap}`, the last two means over documents, layers and heads; `recall` is 1.0 for dense),
`ppl_results.csv`, `ppl_results.md`, `ppl_vs_density.png`, and with `--recall` `recall.json` (the
same rows plus `layers`: per layer its density and per-head recall and overlap) and
`recall_per_layer.png`.

Tiny CPU run (a few minutes):

    python -m seer_attn.evaluation.ppl --model smollm2-135m --datasets builtin:pydoc-topics \
        --lengths 512 --nz_ratios 1.0,0.5,0.3 --thresholds 0.02 --max_docs 2 --output_dir outputs/ppl
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from seer_attn.data import boundary_token_ids, check_context_length, load_token_documents, source_label
from seer_attn.evaluation.recall import RecallMeter, recording
from seer_attn.models import AutoSeerForCausalLM, apply_yarn, load_tokenizer
from seer_attn.models.configuration_seer import check_seerattn_field
from seer_attn.models.loading import resolve_model_source

__all__ = [
    "METHODS",
    "PPLArguments",
    "SweepPoint",
    "sweep_points",
    "load_eval_documents",
    "perplexity",
    "evaluate",
    "write_results",
    "plot_results",
    "plot_recall",
    "main",
]

logger = logging.getLogger(__name__)
METHODS = ("dense", "seer", "oracle", "oracle_mass", "pooled", "static", "random")
THRESHOLD_METHODS = ("seer", "oracle", "oracle_mass", "pooled")
_RESET_FIELDS = (
    "seerattn_mode", "seerattn_selector", "seerattn_sparsity_method", "seerattn_nz_ratio", "seerattn_threshold",
    "seerattn_top_p", "seerattn_adaptive_row_floor", "seerattn_min_sparse_length",
    "seerattn_layer_density_scale", "seerattn_layer_budget_curves",
)
BUDGET_METHODS = ("nz_ratio", "adaptive", "nz_ratio+layers", "adaptive+layers")


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.replace(" ", ",").split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(" ", ",").split(",") if x]


def _names(s: str) -> list[str]:
    return [x for x in s.replace(" ", ",").split(",") if x]


@dataclass
class PPLArguments:
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "gate-only checkpoint (from distillation), full Seer folder, or a plain model of a supported family (its gates are then untrained)"},
    )
    datasets: str = field(
        default="builtin:pydoc-topics",
        metadata={"help": "comma-separated sources: local .jsonl/.txt, hub names (emozilla/pg19-test, hoskinson-center/proof-pile) or builtin:*"},
    )
    dataset_split: str = field(default="test", metadata={"help": "split of hub datasets"})
    dataset_subset: str | None = field(default=None, metadata={"help": "config name of hub datasets"})
    text_field: str = field(default="text", metadata={"help": "field holding the document text"})
    lengths: str = field(default="8192", metadata={"help": "comma-separated context lengths L (tokens, BOS included)"})
    nz_ratios: str = field(default="1.0,0.5,0.3,0.1", metadata={"help": "comma-separated nz_ratio budgets (target causal density)"})
    thresholds: str = field(default="", metadata={"help": "comma-separated gate-probability thresholds (seer, oracle, oracle_mass only)"})
    budget_methods: str = field(
        default="nz_ratio",
        metadata={"help": "sparsity methods run at every nz_ratio budget: nz_ratio (per-row top-k), adaptive, and either "
                          "with '+layers' (the density spread over layers by the calibrated curves)"}
    )
    top_ps: str = field(default="", metadata={"help": "comma-separated top-p values (seer, oracle, oracle_mass only)"})
    adaptive_row_floor: float | None = field(
        default=None, metadata={"help": "share of each row's top-k budget that adaptive selection keeps per row (default: the model config's)"}
    )
    gate_precision: str | None = field(
        default=None, metadata={"help": "the fused gate's dot precision on the GPU: tf32x3, tf32, bf16 or ieee (default: the model config's)"}
    )
    layer_budgets: str | None = field(
        default=None,
        metadata={"help": "the layer budget curves of the '+layers' rows: a JSON file from seer_attn.evaluation.layer_budgets "
                          "(its 'curves'; default: the checkpoint's seerattn_layer_budget_curves)"},
    )
    methods: str = field(default=",".join(METHODS), metadata={"help": f"comma-separated subset of {', '.join(METHODS)}"})
    max_docs: int | None = field(default=None, metadata={"help": "score the first n long-enough documents of each dataset"})
    min_doc_tokens: int | None = field(default=None, metadata={"help": "skip shorter documents (default: max(lengths) - 1)"})
    output_dir: str = field(default="outputs/ppl", metadata={"help": "where results, table and figure go"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu"})
    seed: int = field(default=0, metadata={"help": "seed of the random selector (reset before every row)"})
    plot: bool = field(default=True, metadata={"help": "write ppl_vs_density.png (and recall_per_layer.png)"})
    recall: bool = field(
        default=True,
        metadata={"help": "measure attention recall and overlap with oracle_mass per layer and head (recall.json); "
                          "one extra dense attention pass per layer"},
    )
    yarn_factor: float | None = field(
        default=None, metadata={"help": "apply YaRN with this factor before evaluating (a model that was not fine-tuned for it)"}
    )
    share_gqa_blocks: bool | None = field(
        default=None,
        metadata={"help": "every sparse row selects one block set per GQA group (seerattn_share_gqa_blocks; default: the "
                          "model config's)"},
    )


@dataclass
class SweepPoint:
    """One row of the sweep: a method at a budget, and the `seerattn_*` fields that realise it."""

    method: str
    sparsity_method: str  # dense | nz_ratio | adaptive | threshold | top_p
    target: float  # nz_ratio, threshold or top_p; 1.0 for dense
    fields: dict


def sweep_points(
    methods: list[str],
    nz_ratios: list[float],
    thresholds: list[float],
    budget_methods: tuple[str, ...] = ("nz_ratio",),
    top_ps: tuple[float, ...] = (),
    layer_curves=None,
) -> list[SweepPoint]:
    """The rows to evaluate, dense first (see the module docstring for which method runs where).

    `layer_curves` (per layer `[nz_ratio, benefit]` points) are what the `+layers` budget methods
    spread the density with; every other row gets the same density in every layer."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    bad = sorted(set(budget_methods) - set(BUDGET_METHODS))
    if bad:
        raise ValueError(f"budget methods must be among {BUDGET_METHODS}, got {bad}")
    if layer_curves is None and any(bm.endswith("+layers") for bm in budget_methods):
        raise ValueError("the '+layers' budget methods need layer budget curves: calibrate them with "
                         "`python -m seer_attn.evaluation.layer_budgets` and pass --layer_budgets, or use a checkpoint that has them")
    uniform = {"seerattn_layer_density_scale": None, "seerattn_layer_budget_curves": None}
    for p in top_ps:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
    for nz in nz_ratios:
        if not 0.0 < nz <= 1.0:
            raise ValueError(f"nz_ratio must be in (0, 1], got {nz}")
    for t in thresholds:
        if t < 0:
            raise ValueError(f"thresholds must be >= 0, got {t}")
    points = []
    if "dense" in methods:
        points.append(SweepPoint("dense", "dense", 1.0, {"seerattn_mode": "dense"}))
    for bm in budget_methods:
        for nz in nz_ratios:
            for m in methods:
                if m != "dense" and not (bm != "nz_ratio" and nz >= 1.0):
                    selector = "gate" if m == "seer" else m
                    alloc = {**uniform, "seerattn_layer_budget_curves": layer_curves} if bm.endswith("+layers") else uniform
                    points.append(SweepPoint(m, bm, nz, {"seerattn_mode": "sparse", "seerattn_selector": selector,
                                                         "seerattn_sparsity_method": bm.split("+")[0], "seerattn_nz_ratio": nz,
                                                         **alloc}))
    for p in top_ps:
        for m in methods:
            if m in THRESHOLD_METHODS:
                selector = "gate" if m == "seer" else m
                points.append(SweepPoint(m, "top_p", p, {"seerattn_mode": "sparse", "seerattn_selector": selector,
                                                         "seerattn_sparsity_method": "top_p", "seerattn_top_p": p, **uniform}))
    for t in thresholds:
        for m in methods:
            if m in THRESHOLD_METHODS:
                selector = "gate" if m == "seer" else m
                points.append(SweepPoint(m, "threshold", t, {"seerattn_mode": "sparse", "seerattn_selector": selector,
                                                             "seerattn_sparsity_method": "threshold", "seerattn_threshold": t,
                                                             **uniform}))
    return points


# the documents evaluation scores (the "test" split by default; a named error when none is long enough)
load_eval_documents = load_token_documents


@torch.no_grad()
def perplexity(
    model, docs: list[list[int]], length: int, start_id: int, progress=None, meter: RecallMeter | None = None
) -> tuple[float, float, int]:
    """PPL of `model` (as currently configured) on `[start] + doc[:length-1]` for every document.

    With `meter`, each forward's recorded selection diagnostics are added to it (the caller turns
    recording on, see `seer_attn.evaluation.recall.recording`).

    Returns:
        (ppl, realised density averaged over documents (1.0 for dense attention), number of documents).
    """
    device = next(model.parameters()).device
    nlls, densities = [], []
    for doc in docs:
        if len(doc) < length - 1:
            raise ValueError(f"a document has {len(doc)} tokens, fewer than the {length - 1} that length {length} needs")
        ids = torch.tensor([[start_id] + doc[: length - 1]], device=device)
        labels = ids.clone()
        labels[:, 0] = -100
        out = model(input_ids=ids, labels=labels, logits_to_keep=1, use_cache=False)
        nlls.append(float(out.lm_loss))
        densities.append(1.0 if out.density is None else float(out.density))
        if meter is not None:
            meter.update(model, length)
        if progress is not None:
            progress.update(1)
    return math.exp(sum(nlls) / len(nlls)), sum(densities) / len(densities), len(docs)


def evaluate(
    model,
    tokenizer,
    datasets: dict[str, list[list[int]]],
    lengths: list[int],
    points: list[SweepPoint],
    seed: int = 0,
    recall: bool = False,
) -> list[dict]:
    """Every (dataset, length, sweep point) row; the model's `seerattn_*` settings are restored afterwards.

    Args:
        datasets: label -> documents' token ids (from `load_eval_documents`).
        recall (bool): also measure attention recall and overlap with `oracle_mass` (sparse rows);
            rows then carry `recall`, `overlap` (means) and `layers` (per layer and head).
    """
    for length in lengths:
        check_context_length(model.config, length)
    start_id, _ = boundary_token_ids(tokenizer)
    saved = {k: getattr(model.config, k) for k in _RESET_FIELDS}
    was_training = model.training
    model.eval()
    records = []
    total = sum(len(docs) for docs in datasets.values()) * len(lengths) * len(points)
    try:
        with tqdm(total=total, desc="ppl", unit="doc") as bar:
            for label, docs in datasets.items():
                for length in lengths:
                    for p in points:
                        # sparse at every length: this measures quality, not where sparsity pays off in time
                        model.set_seerattn(**{**saved, "seerattn_min_sparse_length": 0, **p.fields})
                        torch.manual_seed(seed)
                        bar.set_postfix_str(f"{label} L={length} {p.method} {p.sparsity_method}={p.target:g}")
                        meter = RecallMeter() if recall and p.method != "dense" else None
                        with recording(model) if meter is not None else contextlib.nullcontext():
                            ppl, density, n = perplexity(model, docs, length, start_id, bar, meter)
                        records.append({
                            "dataset": label, "context_length": length, "method": p.method,
                            "sparsity_method": p.sparsity_method, "target": p.target,
                            "density": round(density, 6), "ppl": ppl, "num_docs": n,
                            "recall": None, "overlap": None,
                        })
                        if meter is not None:
                            records[-1].update(meter.result())
                        elif recall:
                            records[-1]["recall"] = 1.0  # dense attention keeps every block
                        logger.info("%s L=%d %s %s=%g: ppl %.4f density %.4f", label, length, p.method, p.sparsity_method, p.target, ppl, density)
    finally:
        model.set_seerattn(**saved)
        model.train(was_training)
    return records


def _markdown(records: list[dict]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    lines = [
        "PPL (realised density) per dataset, context length and budget; `dense` is the same row for every budget.",
        "",
        "| dataset | L | sparsity | target | " + " | ".join(methods) + " |",
        "|---|---:|---|---:|" + "---:|" * len(methods),
    ]
    dense = {(r["dataset"], r["context_length"]): r for r in records if r["method"] == "dense"}
    keys = list(dict.fromkeys(
        (r["dataset"], r["context_length"], r["sparsity_method"], r["target"]) for r in records if r["method"] != "dense"
    ))
    keys += [(ds, L, "dense", 1.0) for ds, L in dense if not any(k[:2] == (ds, L) for k in keys)]
    cells = {(r["dataset"], r["context_length"], r["sparsity_method"], r["target"], r["method"]): r for r in records}
    for ds, L, sm, t in sorted(keys, key=lambda k: (k[0], k[1], k[2] != "dense", k[2], -k[3])):
        row = []
        for m in methods:
            r = dense.get((ds, L)) if m == "dense" else cells.get((ds, L, sm, t, m))
            row.append(f"{r['ppl']:.4g} ({r['density']:.3f})" if r else "")
        lines.append(f"| {ds} | {L} | {sm} | {t:g} | " + " | ".join(row) + " |")
    if any(r.get("overlap") is not None for r in records):
        sparse = [m for m in methods if m != "dense"]
        lines += [
            "",
            "Mean attention recall (overlap with oracle_mass's blocks) over documents, layers and heads.",
            "",
            "| dataset | L | sparsity | target | " + " | ".join(sparse) + " |",
            "|---|---:|---|---:|" + "---:|" * len(sparse),
        ]
        for ds, L, sm, t in sorted(keys, key=lambda k: (k[0], k[1], k[2], -k[3])):
            if sm == "dense":
                continue
            row = []
            for m in sparse:
                r = cells.get((ds, L, sm, t, m))
                row.append(f"{r['recall']:.3f} ({r['overlap']:.3f})" if r and r.get("overlap") is not None else "")
            lines.append(f"| {ds} | {L} | {sm} | {t:g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_ppl_panels(records: list[dict], path: str | Path, methods, draw, xlabel: str, log2_x: bool = False) -> None:
    """PPL figure shared by the evaluators: one panel per (context length, dataset), dense as a dashed
    line, and `draw(ax, rows, method, color)` for every other method of `methods` (`rows`: the panel's records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    lengths = sorted({r["context_length"] for r in records})
    fig, axes = plt.subplots(len(lengths), len(datasets), figsize=(5 * len(datasets), 3.8 * len(lengths)), squeeze=False)
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, L in enumerate(lengths):
        for j, ds in enumerate(datasets):
            ax = axes[i][j]
            rows = [r for r in records if r["dataset"] == ds and r["context_length"] == L]
            for r in rows:
                if r["method"] == "dense":
                    ax.axhline(r["ppl"], color="k", ls="--", lw=1, label=f"dense ({r['ppl']:.3g})")
            for m in methods:
                if m != "dense":
                    draw(ax, rows, m, colors[m])
            if log2_x:
                ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity")
            ax.set_title(f"{ds}, L={L}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_results(records: list[dict], path: str | Path) -> None:
    """PPL vs realised density: one panel per (length, dataset), one line per method; thresholds as open markers."""

    def draw(ax, rows, m, color):
        def pts(method):
            return [(r["density"], r["ppl"]) for r in rows if r["method"] == m and r["sparsity_method"] == method]

        nz, ad, th, tp = sorted(pts("nz_ratio")), sorted(pts("adaptive")), pts("threshold"), pts("top_p")
        if nz:
            ax.plot(*zip(*nz), marker="o", color=color, label=m)
        if ad:
            ax.plot(*zip(*ad), marker="s", ls=":", color=color, label=f"{m} (adaptive)")
        for bm, marker in (("nz_ratio+layers", "P"), ("adaptive+layers", "X")):
            lp = sorted(pts(bm))
            if lp:
                ax.plot(*zip(*lp), marker=marker, ls="--", color=color, label=f"{m} ({bm})")
        if th:
            ax.scatter(*zip(*th), marker="D", facecolors="none", edgecolors=color, label=f"{m} (threshold)")
        if tp:
            ax.scatter(*zip(*tp), marker="^", facecolors="none", edgecolors=color, label=f"{m} (top-p)")

    plot_ppl_panels(records, path, METHODS, draw, "realised density")


def plot_recall(records: list[dict], path: str | Path) -> None:
    """Attention recall per layer (mean over heads): one panel per (dataset, length, budget below 1), one
    line per method; dashed: overlap with oracle_mass's blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # nz_ratio 1.0 keeps every block (recall 1): no panel
    rows = [r for r in records if r.get("layers") and not (r["sparsity_method"] == "nz_ratio" and r["target"] >= 1.0)]
    if not rows:
        return
    panels = list(dict.fromkeys((r["dataset"], r["context_length"]) for r in rows))
    budgets = list(dict.fromkeys((r["sparsity_method"], r["target"]) for r in rows))
    fig, axes = plt.subplots(len(panels), len(budgets), figsize=(4.2 * len(budgets), 3.4 * len(panels)), squeeze=False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, (ds, L) in enumerate(panels):
        for j, (sm, t) in enumerate(budgets):
            ax = axes[i][j]
            for r in rows:
                if (r["dataset"], r["context_length"], r["sparsity_method"], r["target"]) != (ds, L, sm, t):
                    continue
                x = [layer["layer"] for layer in r["layers"]]
                ax.plot(x, [sum(v["recall"]) / len(v["recall"]) for v in r["layers"]], color=colors[r["method"]],
                        marker=".", label=f"{r['method']} ({r['recall']:.3f})")
                if r["method"] != "oracle_mass":
                    ax.plot(x, [sum(v["overlap"]) / len(v["overlap"]) for v in r["layers"]], color=colors[r["method"]],
                            ls="--", lw=0.8)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("layer")
            ax.set_ylabel("attention recall (dashed: overlap)")
            ax.set_title(f"{ds}, L={L}, {sm}={t:g}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(records: list[dict], output_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write `ppl_results.{json,csv,md}`, `recall.json` (rows with per-layer diagnostics) and the figures.

    `ppl_vs_density.png` and (when rows have per-layer diagnostics) `recall_per_layer.png` are drawn
    with `plot`. Returns the paths written.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ppl_results.json", "csv": out / "ppl_results.csv", "md": out / "ppl_results.md"}
    rows = [{k: v for k, v in r.items() if k != "layers"} for r in records]
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    fields = ["dataset", "context_length", "method", "sparsity_method", "target", "density", "ppl", "num_docs",
              "recall", "overlap"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(_markdown(rows))
    with_layers = [r for r in records if r.get("layers")]
    if with_layers:
        paths["recall_json"] = out / "recall.json"
        paths["recall_json"].write_text(json.dumps(with_layers, indent=1) + "\n")
    if plot:
        paths["png"] = out / "ppl_vs_density.png"
        plot_results(rows, paths["png"])
        if any(not (r["sparsity_method"] == "nz_ratio" and r["target"] >= 1.0) for r in with_layers):
            paths["recall_png"] = out / "recall_per_layer.png"
            plot_recall(with_layers, paths["recall_png"])
    return paths


def _load_model(args: PPLArguments):
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    elif args.dtype in ("bfloat16", "float16", "float32"):
        dtype = getattr(torch, args.dtype)
    else:
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {args.dtype!r}")
    if resolve_model_source(args.model).kind not in ("seer_gates", "seer_full"):
        logger.warning("%s is not a Seer checkpoint: its gates are freshly initialised, so 'seer' rows are untrained", args.model)
    config = AutoSeerForCausalLM.config_from(args.model, seerattn_mode="dense")
    if getattr(args, "adaptive_row_floor", None) is not None:
        config.seerattn_adaptive_row_floor = args.adaptive_row_floor
    if getattr(args, "share_gqa_blocks", None) is not None:
        config.seerattn_share_gqa_blocks = bool(args.share_gqa_blocks)
    if getattr(args, "gate_precision", None) is not None:
        check_seerattn_field("seerattn_gate_precision", args.gate_precision)
        config.seerattn_gate_precision = args.gate_precision
    if getattr(args, "layer_budgets", None):
        config.seerattn_layer_budget_curves = json.loads(Path(args.layer_budgets).read_text())["curves"]
        config.validate_seerattn()
    if args.yarn_factor:
        apply_yarn(config, args.yarn_factor)
    model = AutoSeerForCausalLM.from_pretrained(args.model, config=config, dtype=dtype)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(PPLArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lengths, sources = _ints(args.lengths), _names(args.datasets)
    if not lengths or not sources:
        raise ValueError("give at least one length (--lengths) and one dataset (--datasets)")
    budget_methods = tuple(_names(args.budget_methods))
    bad = sorted(set(budget_methods) - set(BUDGET_METHODS))
    if bad:
        raise ValueError(f"--budget_methods must be among {BUDGET_METHODS}, got {bad}")
    # check every other argument before loading anything (the curves come with the model)
    sweep_points(_names(args.methods), _floats(args.nz_ratios), _floats(args.thresholds),
                 tuple(dict.fromkeys(bm.split("+")[0] for bm in budget_methods)), tuple(_floats(args.top_ps)))
    min_tokens = args.min_doc_tokens if args.min_doc_tokens is not None else max(lengths) - 1
    if min_tokens < max(lengths) - 1:
        raise ValueError(f"--min_doc_tokens {min_tokens} is below max(lengths) - 1 = {max(lengths) - 1}")

    tokenizer = load_tokenizer(args.model)
    model = _load_model(args)
    points = sweep_points(
        _names(args.methods), _floats(args.nz_ratios), _floats(args.thresholds), budget_methods, tuple(_floats(args.top_ps)),
        layer_curves=model.config.seerattn_layer_budget_curves,
    )
    for length in lengths:
        check_context_length(model.config, length)
    docs = {}
    for source in sources:
        label = source_label(source)
        label = label if label not in docs else f"{label}#{len(docs)}"
        docs[label] = load_eval_documents(
            source, tokenizer, min_tokens, args.max_docs, args.dataset_split, args.text_field, args.dataset_subset
        )
    records = evaluate(model, tokenizer, docs, lengths, points, args.seed, recall=args.recall)
    paths = write_results(records, args.output_dir, args.plot)
    with open(Path(args.output_dir) / "ppl_args.json", "w") as f:
        json.dump(asdict(args), f, indent=2)
    print(paths["md"].read_text())
    logger.info("results in %s", ", ".join(str(p) for p in paths.values()))
    return records


if __name__ == "__main__":
    main()
