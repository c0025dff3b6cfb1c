"""Decode-mode perplexity: how much the decode gate's block selection costs, against reference selectors.

Teacher forcing in *decode mode* (`seerattn_mode="decode_eval"`): one forward per document, in which
every token attends only to the blocks its selector keeps plus its own (partial) block, exactly as if
it were being generated with that token budget; the NLL is then that of sparse decoding of the
document, without generating it. Documents, the start token and the PPL formula are those of
:mod:`seer_attn.evaluation.ppl` (method-spec §7).

Rows (one loaded model, switched with `set_seerattn`):

- `dense`: plain attention (one row per dataset and length);
- at each token budget (attended tokens per token, own block included: the top
  `budget // block_size - 1` earlier blocks are kept): `seer` (the trained decode gate), `oracle`
  (the blocks with the largest true per-token attention mass: the selection to beat), `quest` (the
  training-free bound from per-block min/max of the post-RoPE keys, as Quest), `static` (the sink
  block, then the most recent blocks); the same budget in every layer;
- `<method>+layers` (e.g. `seer+layers`): the budget spread over the layers by the decode layer
  curves (`--layer_budgets FILE` from `python -m seer_attn.evaluation.layer_budgets --stage decode`,
  or the checkpoint's own `seerattn_decode_layer_budget_curves`), the mean budget unchanged.

Layers below `seerattn_decode_start_layer` stay dense in every row (`--start_layer` overrides it).
`--keep_sink true` / `--keep_recent N` make every `seer`, `oracle` and `quest` row keep the sink block and the N
most recent complete blocks whatever their scores, inside the budget (`seerattn_decode_keep_sink` /
`seerattn_decode_keep_recent`; default: the checkpoint's).
Every row reports its realised density: attended blocks over causal blocks, over the sparse layers.
The markdown table adds, per budget, the PPL change of `seer` against dense and the share of the
oracle's gain over `static` that the gate recovers, `(static - seer) / (static - oracle)`.

`--generation_check N` also decodes N tokens greedily from the first document's first 1024 tokens
with an unlimited budget and dense, and records whether they are identical.

Outputs in `--output_dir`: `decode_ppl_results.{json,csv,md}`, `decode_ppl_vs_budget.png`,
`decode_ppl_args.json` and, with the check, `decode_generation_check.json`.

Tiny CPU run (a distilled gate-only checkpoint with a decode gate in `outputs/distill`):

    python -m seer_attn.evaluation.decode_ppl --model outputs/distill --datasets builtin:pydoc-topics \
        --lengths 512 --budgets 128,256 --max_docs 2 --output_dir outputs/decode_ppl
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from seer_attn.evaluation.ppl import (
    SweepPoint, _ints, _load_model, _names, load_eval_documents, perplexity, plot_ppl_panels,
)
from seer_attn.models import load_tokenizer
from seer_attn.training.data import boundary_token_ids, check_context_length, source_label

__all__ = [
    "METHODS",
    "LAYERED",
    "DecodePPLArguments",
    "sweep_points",
    "evaluate",
    "generation_check",
    "write_results",
    "plot_results",
    "main",
]

logger = logging.getLogger(__name__)
METHODS = ("dense", "seer", "oracle", "quest", "static")
LAYERED = tuple(f"{m}+layers" for m in METHODS if m != "dense")
_RESET_FIELDS = (
    "seerattn_mode", "seerattn_decode_selector", "seerattn_decode_token_budget", "seerattn_decode_threshold",
    "seerattn_decode_start_layer", "seerattn_decode_min_context", "seerattn_decode_layer_budget_scale",
    "seerattn_decode_layer_budget_curves",
)
_CSV_FIELDS = ["dataset", "context_length", "method", "token_budget", "density", "ppl", "num_docs"]


@dataclass
class DecodePPLArguments:
    model: str = field(
        default="smollm2-135m",
        metadata={"help": "gate-only checkpoint with a decode gate (from distillation), full SeerLlama folder, or a plain model (reference selectors only)"},
    )
    datasets: str = field(
        default="builtin:pydoc-topics",
        metadata={"help": "comma-separated sources: local .jsonl/.txt, hub names (emozilla/pg19-test, hoskinson-center/proof-pile) or builtin:*"},
    )
    dataset_split: str = field(default="test", metadata={"help": "split of hub datasets"})
    dataset_subset: str | None = field(default=None, metadata={"help": "config name of hub datasets"})
    text_field: str = field(default="text", metadata={"help": "field holding the document text"})
    lengths: str = field(default="8192", metadata={"help": "comma-separated context lengths L (tokens, start token included)"})
    budgets: str = field(default="256,512,1024,2048", metadata={"help": "comma-separated token budgets (own block included)"})
    methods: str = field(default=",".join(METHODS), metadata={"help": f"comma-separated subset of {', '.join(METHODS)}"})
    start_layer: int | None = field(default=None, metadata={"help": "layers below it stay dense (default: the checkpoint's seerattn_decode_start_layer)"})
    keep_sink: bool | None = field(default=None, metadata={"help": "every selector keeps the sink block (default: the checkpoint's seerattn_decode_keep_sink)"})
    keep_recent: int | None = field(default=None, metadata={"help": "every selector keeps the N most recent complete blocks (default: the checkpoint's)"})
    max_docs: int | None = field(default=None, metadata={"help": "score the first n long-enough documents of each dataset"})
    min_doc_tokens: int | None = field(default=None, metadata={"help": "skip shorter documents (default: max(lengths) - 1)"})
    output_dir: str = field(default="outputs/decode_ppl", metadata={"help": "where results, table and figure go"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu"})
    plot: bool = field(default=True, metadata={"help": "write decode_ppl_vs_budget.png"})
    yarn_factor: float | None = field(default=None, metadata={"help": "apply YaRN with this factor before evaluating"})
    generation_check: int = field(default=0, metadata={"help": "greedy tokens for the unlimited-budget == dense check (0: skip)"})
    layer_budgets: str | None = field(
        default=None, metadata={"help": "JSON from `layer_budgets --stage decode` for the '+layers' methods (default: the checkpoint's curves)"}
    )


def sweep_points(methods: list[str], budgets: list[int], layer_curves=None) -> list[SweepPoint]:
    """Rows to evaluate, dense first; `target` is the token budget. Plain rows use the same budget in
    every layer; `<method>+layers` rows spread it by `layer_curves` (required for them)."""
    unknown = sorted(set(methods) - set(METHODS) - set(LAYERED))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS + LAYERED}")
    if any(m in LAYERED for m in methods) and layer_curves is None:
        raise ValueError("'+layers' methods need decode layer curves: --layer_budgets FILE, or a checkpoint with "
                         "seerattn_decode_layer_budget_curves (python -m seer_attn.evaluation.layer_budgets --stage decode)")
    for b in budgets:
        if b <= 0:
            raise ValueError(f"token budgets must be > 0, got {b}")
    points = []
    if "dense" in methods:
        points.append(SweepPoint("dense", "dense", 0, {"seerattn_mode": "dense"}))
    for b in budgets:
        for m in methods:
            if m != "dense":
                base = m.removesuffix("+layers")
                fields = {"seerattn_mode": "decode_eval", "seerattn_decode_selector": "gate" if base == "seer" else base,
                          "seerattn_decode_token_budget": int(b), "seerattn_decode_threshold": None,
                          "seerattn_decode_layer_budget_scale": None,
                          "seerattn_decode_layer_budget_curves": layer_curves if m in LAYERED else None}
                points.append(SweepPoint(m, "token_budget", int(b), fields))
    return points


def evaluate(
    model, tokenizer, datasets: dict[str, list[list[int]]], lengths: list[int], points: list[SweepPoint],
    start_layer: int | None = None,
) -> list[dict]:
    """Every (dataset, length, sweep point) row; the model's decode settings are restored afterwards."""
    for length in lengths:
        check_context_length(model.config, length)
    if any(p.method in ("seer", "seer+layers") for p in points) and model.config.seerattn_decode_gate_type is None:
        raise ValueError("the model has no decode gate (seerattn_decode_gate_type is None): drop 'seer' from --methods")
    start_id, _ = boundary_token_ids(tokenizer)
    saved = {k: getattr(model.config, k) for k in _RESET_FIELDS}
    layer = saved["seerattn_decode_start_layer"] if start_layer is None else start_layer
    was_training = model.training
    model.eval()
    records = []
    total = sum(len(docs) for docs in datasets.values()) * len(lengths) * len(points)
    try:
        with tqdm(total=total, desc="decode ppl", unit="doc") as bar:
            for label, docs in datasets.items():
                for length in lengths:
                    for p in points:
                        model.set_seerattn(**{**saved, "seerattn_decode_start_layer": layer, **p.fields})
                        bar.set_postfix_str(f"{label} L={length} {p.method} budget={p.target}")
                        ppl, density, n = perplexity(model, docs, length, start_id, bar)
                        records.append({
                            "dataset": label, "context_length": length, "method": p.method,
                            "token_budget": p.target if p.method != "dense" else None,
                            "density": round(density, 6), "ppl": ppl, "num_docs": n,
                        })
                        logger.info(
                            "%s L=%d %s budget=%s: ppl %.4f density %.4f", label, length, p.method, p.target, ppl, density
                        )
    finally:
        model.set_seerattn(**saved)
        model.train(was_training)
    return records


@torch.no_grad()
def generation_check(model, ids: list[int], new_tokens: int, prompt_tokens: int = 1024) -> dict:
    """Greedy decoding with an unlimited token budget vs dense, from `ids[:prompt_tokens]`.

    Uses the decode gate when the model has one (the `static` selector otherwise). Returns
    `{"prompt_tokens", "new_tokens", "selector", "identical", "first_mismatch"}`.
    """
    device = next(model.parameters()).device
    x = torch.tensor([ids[:prompt_tokens]], device=device)
    saved = {k: getattr(model.config, k) for k in _RESET_FIELDS}
    selector = "gate" if model.config.seerattn_decode_gate_type is not None else "static"
    # an explicit all-ones mask: generate() would otherwise infer padding from pad_token_id, and a start
    # token equal to it (SmolLM2's is 0) makes the batch "padded", which decodes densely
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(x))  # fmt: skip
    try:
        model.set_seerattn(seerattn_mode="sparse", seerattn_decode_selector=selector, seerattn_decode_token_budget=1 << 30,
                           seerattn_decode_threshold=None, seerattn_decode_min_context=0)
        sparse = model.generate(x, **kw)[0, x.shape[1]:]
        model.set_seerattn(seerattn_mode="dense")
        dense = model.generate(x, **kw)[0, x.shape[1]:]
    finally:
        model.set_seerattn(**saved)
    diff = (sparse != dense).nonzero()
    return {
        "prompt_tokens": x.shape[1], "new_tokens": new_tokens, "selector": selector,
        "identical": bool(torch.equal(sparse, dense)), "first_mismatch": int(diff[0]) if len(diff) else None,
    }


def _markdown(records: list[dict]) -> str:
    methods = [m for m in METHODS[1:] + LAYERED if any(r["method"] == m for r in records)]
    has = set(methods)
    extra = ["seer vs dense", "seer share of oracle gain"] if {"seer"} <= has else []
    extra += ["seer+layers vs dense", "seer+layers share"] if {"seer+layers"} <= has else []
    lines = [
        "Decode-mode PPL (realised density) per dataset, context length and token budget; dense is the same for every budget.",
        "",
        "| dataset | L | budget | dense | " + " | ".join(methods + extra) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(methods + extra),
    ]
    dense = {(r["dataset"], r["context_length"]): r["ppl"] for r in records if r["method"] == "dense"}
    cells = {(r["dataset"], r["context_length"], r["token_budget"], r["method"]): r for r in records}
    keys = sorted({(r["dataset"], r["context_length"], r["token_budget"]) for r in records if r["method"] != "dense"})
    for ds, L, b in keys:
        d = dense.get((ds, L))
        row = [f"{d:.4g}" if d is not None else ""]
        for m in methods:
            r = cells.get((ds, L, b, m))
            row.append(f"{r['ppl']:.4g} ({r['density']:.3f})" if r else "")
        # shares against the same-budget-in-every-layer references (as the prefill evaluator's)
        oracle, static = cells.get((ds, L, b, "oracle")), cells.get((ds, L, b, "static"))
        gain = static["ppl"] - oracle["ppl"] if oracle and static else 0.0
        for name in ("seer", "seer+layers"):
            if name in has:
                seer = cells.get((ds, L, b, name))
                row.append(f"{100 * (seer['ppl'] / d - 1):+.2f}%" if seer and d else "")
                row.append(f"{(static['ppl'] - seer['ppl']) / gain:.2f}" if seer and gain > 0 else "")
        lines.append(f"| {ds} | {L} | {b} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_results(records: list[dict], path: str | Path) -> None:
    """PPL vs token budget: one panel per (length, dataset), one line per method, dense dashed."""

    def draw(ax, rows, m, color):
        pts = sorted((r["token_budget"], r["ppl"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=m)

    plot_ppl_panels(records, path, METHODS + LAYERED, draw, "token budget per decoded token", log2_x=True)


def write_results(records: list[dict], output_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write `decode_ppl_results.{json,csv,md}` and (optionally) `decode_ppl_vs_budget.png`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"decode_ppl_results.{k}" for k in ("json", "csv", "md")}
    paths["json"].write_text(json.dumps(records, indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        w.writeheader()
        w.writerows(records)
    paths["md"].write_text(_markdown(records))
    if plot:
        paths["png"] = out / "decode_ppl_vs_budget.png"
        plot_results(records, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(DecodePPLArguments).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lengths, sources = _ints(args.lengths), _names(args.datasets)
    if not lengths or not sources:
        raise ValueError("give at least one length (--lengths) and one dataset (--datasets)")
    methods = _names(args.methods)
    min_tokens = args.min_doc_tokens if args.min_doc_tokens is not None else max(lengths) - 1
    if min_tokens < max(lengths) - 1:
        raise ValueError(f"--min_doc_tokens {min_tokens} is below max(lengths) - 1 = {max(lengths) - 1}")

    tokenizer = load_tokenizer(args.model)
    model = _load_model(args)
    keep = {"seerattn_decode_keep_sink": args.keep_sink, "seerattn_decode_keep_recent": args.keep_recent}
    model.set_seerattn(**{k: v for k, v in keep.items() if v is not None})
    curves = model.config.seerattn_decode_layer_budget_curves
    if args.layer_budgets:
        curves = json.loads(Path(args.layer_budgets).read_text())["curves"]
    points = sweep_points(methods, _ints(args.budgets), curves)
    docs = {}
    for source in sources:
        label = source_label(source)
        label = label if label not in docs else f"{label}#{len(docs)}"
        docs[label] = load_eval_documents(
            source, tokenizer, min_tokens, args.max_docs, args.dataset_split, args.text_field, args.dataset_subset
        )
    records = evaluate(model, tokenizer, docs, lengths, points, args.start_layer)
    paths = write_results(records, args.output_dir, args.plot)
    out = Path(args.output_dir)
    with open(out / "decode_ppl_args.json", "w") as f:
        json.dump(asdict(args), f, indent=2)
    if args.generation_check:
        start_id, _ = boundary_token_ids(tokenizer)
        first = next(iter(docs.values()))[0]
        check = generation_check(model, [start_id] + first, args.generation_check)
        (out / "decode_generation_check.json").write_text(json.dumps(check, indent=2) + "\n")
        logger.info("generation check: %s", check)
    print(paths["md"].read_text())
    logger.info("results in %s", ", ".join(str(p) for p in paths.values()))
    return records


if __name__ == "__main__":
    main()
