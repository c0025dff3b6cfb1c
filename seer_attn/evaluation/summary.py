"""A five-second reading of a perplexity sweep: per budget, seer against dense, static and the oracle.

`summarize(records)` takes the records of `seer_attn.evaluation.ppl` (`ppl_results.json`) and
returns one row per (dataset, context length, sparsity method, budget) that has a `seer` record:

- `density`: seer's realised block density; `ppl`: seer's perplexity;
- `dense_ppl` and `vs_dense`: the relative PPL change of seer against dense attention;
- for each reference selector present at the same budget (`static`, `oracle_mass`, `oracle`):
  `<ref>_ppl`, `<ref>_density` and `vs_<ref>` (seer's relative PPL change against it);
- `oracle_share`: `(static - seer) / (static - oracle)`, the share of the oracle's gain over the
  static sink + window pattern that seer gets (oracle_mass preferred; None when the oracle does
  not beat static).

`format_summary(rows)` prints them as a short table with a verdict per dataset; `findings(rows)`
gives the verdict lines alone (e.g. budgets whose realised densities coincide, or a gate that does
not beat static). The CLI reads a results folder and also lists the files a run wrote:

    python -m seer_attn.evaluation.summary outputs/post_training/eval --gates outputs/post_training/gates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["REFERENCES", "summarize", "findings", "format_summary", "list_files", "main"]

REFERENCES = ("static", "oracle_mass", "oracle")
# realised densities closer than this are "the same budget" for the reader
SAME_DENSITY = 0.01


def _change(ppl: float, ref: float | None) -> float | None:
    return None if ref is None else ppl / ref - 1.0


def summarize(records: list[dict]) -> list[dict]:
    """Seer per budget against dense and the reference selectors (see the module docstring).

    Args:
        records: dicts with at least `dataset`, `context_length`, `method`, `sparsity_method`,
            `target`, `density`, `ppl` (and optionally `num_docs`); other keys are ignored.

    Returns:
        rows in the records' order of first appearance, with relative changes as fractions (0.02 = +2%).
    """
    dense = {(r["dataset"], r["context_length"]): r for r in records if r["method"] == "dense"}
    cells = {(r["dataset"], r["context_length"], r["sparsity_method"], r["target"], r["method"]): r for r in records}
    rows = []
    for r in records:
        if r["method"] != "seer":
            continue
        key = (r["dataset"], r["context_length"], r["sparsity_method"], r["target"])
        d = dense.get(key[:2])
        row = {
            "dataset": r["dataset"], "context_length": r["context_length"], "num_docs": r.get("num_docs"),
            "sparsity_method": r["sparsity_method"], "target": r["target"],
            "density": r["density"], "ppl": r["ppl"],
            "dense_ppl": d["ppl"] if d else None, "vs_dense": _change(r["ppl"], d["ppl"] if d else None),
        }
        for ref in REFERENCES:
            c = cells.get((*key, ref))
            row[f"{ref}_ppl"] = c["ppl"] if c else None
            row[f"{ref}_density"] = c["density"] if c else None
            row[f"vs_{ref}"] = _change(r["ppl"], c["ppl"] if c else None)
        oracle = row["oracle_mass_ppl"] if row["oracle_mass_ppl"] is not None else row["oracle_ppl"]
        static = row["static_ppl"]
        gain = None if oracle is None or static is None else static - oracle
        row["oracle_share"] = (static - r["ppl"]) / gain if gain and gain > 0 else None
        rows.append(row)
    return rows


def findings(rows: list[dict]) -> list[str]:
    """Verdict lines a reader should not miss, per dataset and context length."""
    lines = []
    for (ds, L) in dict.fromkeys((r["dataset"], r["context_length"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["context_length"]) == (ds, L)]
        where = f"{ds}, L={L}"
        for method in dict.fromkeys(r["sparsity_method"] for r in group):
            same = sorted((r for r in group if r["sparsity_method"] == method), key=lambda r: r["density"])
            for a, b in zip(same, same[1:]):
                if abs(a["density"] - b["density"]) < SAME_DENSITY:
                    lines.append(
                        f"{where}: {method} {a['target']:g} and {b['target']:g} give the same realised density "
                        f"({a['density']:.3f}); evaluate longer inputs to separate them."
                    )
        # at density 1 every selector is dense attention: no contest
        versus = [r for r in group if r["vs_static"] is not None and r["density"] < 1.0 - SAME_DENSITY]
        if versus:
            wins = sum(r["vs_static"] < 0 for r in versus)
            if wins == len(versus):
                lines.append(f"{where}: seer beats the static sink + window pattern at every budget ({wins}/{len(versus)}).")
            elif wins == 0:
                lines.append(
                    f"{where}: seer does NOT beat the static sink + window pattern at any budget: the gates are not "
                    "(yet) better than a fixed pattern here; this result does not show the method."
                )
            else:
                lines.append(f"{where}: seer beats the static sink + window pattern at {wins} of {len(versus)} budgets.")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _ref_cell(row: dict, ref: str) -> str:
    if row[f"{ref}_ppl"] is None:
        return "-"
    cell = f"{_pct(row[f'vs_{ref}'])} ({row[f'{ref}_ppl']:.4g}"
    if abs(row[f"{ref}_density"] - row["density"]) > 2 * SAME_DENSITY:
        cell += f" @{row[f'{ref}_density']:.2f}"
    return cell + ")"


def format_summary(rows: list[dict]) -> str:
    """The rows as a short table per dataset and length (PPL changes of seer, reference PPL in brackets), then the findings."""
    if not rows:
        return "no 'seer' rows to summarise (was the 'seer' method evaluated?)\n"
    refs = [ref for ref in REFERENCES if any(r[f"{ref}_ppl"] is not None for r in rows)]
    out = []
    for (ds, L) in dict.fromkeys((r["dataset"], r["context_length"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["context_length"]) == (ds, L)]
        docs = group[0]["num_docs"]
        dense = group[0]["dense_ppl"]
        out.append(
            f"{ds}, L={L}" + (f", {docs} docs" if docs else "") + (f": dense PPL {dense:.4g}" if dense is not None else "")
        )
        header = ["budget", "density", "seer PPL", "vs dense"] + [f"vs {ref}" for ref in refs] + ["share of oracle gain"]
        table = [header]
        for r in group:
            share = "-" if r["oracle_share"] is None else f"{100 * r['oracle_share']:.0f}%"
            table.append(
                [f"{r['sparsity_method']} {r['target']:g}", f"{r['density']:.3f}", f"{r['ppl']:.4g}", _pct(r["vs_dense"])]
                + [_ref_cell(r, ref) for ref in refs] + [share]
            )
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    out.append("(vs X: seer's PPL change against X, X's PPL in brackets, @ its realised density where it differs;")
    out.append(" share of oracle gain: (static - seer) / (static - oracle), oracle_mass where evaluated)")
    out += findings(rows)
    return "\n".join(out) + "\n"


_FILES = (
    ("gate-only checkpoint (from_pretrained loads it, sparse)", "gates", ("config.json", "model.safetensors")),
    ("gate loss per step", "gates", ("gate_loss.jsonl",)),
    ("distillation arguments", "gates", ("distill_args.json",)),
    ("PPL table", "eval", ("ppl_results.md", "ppl_results.csv", "ppl_results.json")),
    ("PPL vs density figure", "eval", ("ppl_vs_density.png",)),
    ("this summary", "eval", ("summary.txt", "summary.json")),
)


def list_files(eval_dir: str | Path, gates_dir: str | Path | None = None) -> str:
    """Where a run's files are: one line per kind, only for files that exist."""
    dirs = {"eval": Path(eval_dir), "gates": Path(gates_dir) if gates_dir else None}
    lines = []
    for what, where, names in _FILES:
        folder = dirs[where]
        found = [n for n in names if folder is not None and (folder / n).exists()]
        if found:
            lines.append(f"  {what}: {folder}/" + ("{" + ",".join(found) + "}" if len(found) > 1 else found[0]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description="Summarise ppl_results.json of a PPL sweep and list the run's files.")
    p.add_argument("eval_dir", help="folder holding ppl_results.json (written there: summary.txt, summary.json)")
    p.add_argument("--gates", default=None, help="gate checkpoint folder of the run, to list its files")
    p.add_argument("--note", action="append", default=[], help="a line to add after the table (repeatable)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    eval_dir = Path(args.eval_dir)
    records = json.loads((eval_dir / "ppl_results.json").read_text())
    rows = summarize(records)
    text = format_summary(rows) + "".join(f"{n}\n" for n in args.note)
    (eval_dir / "summary.txt").write_text(text)
    (eval_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("== summary\n" + text + "files:\n" + list_files(eval_dir, args.gates), end="")
    return rows


if __name__ == "__main__":
    main()
