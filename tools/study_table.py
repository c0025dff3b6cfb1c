"""Turn a gate-study folder (eval_<arm>/ppl_results.json + eval_baselines) into the issue-9 table.

Share of the oracle's gain = (static - seer) / (static - oracle_mass), with static and oracle_mass
per-row top-k at the same nz budget, seer at the same budget with the named sparsity method.
usage: python tools/study_table.py docs/results/study9 [arm ...]
"""
import glob
import json
import os
import sys

root = sys.argv[1]
B = {(r["dataset"], r["method"], r["sparsity_method"], r["target"]): r for r in json.load(open(f"{root}/eval_baselines/ppl_results.json"))}
sets = ("pg19-mini", "proofpile-mini")
arms = sys.argv[2:] or sorted(os.path.basename(p)[5:] for p in glob.glob(f"{root}/eval_*") if not p.endswith("baselines"))
print("| arm | method | " + " | ".join(f"{s.split('-')[0]} nz {nz}" for s in sets for nz in (0.5, 0.3, 0.1)) + " |")
print("|---|---|" + "---|" * 6)
for m in ("oracle_mass", "static"):
    for sm in ("nz_ratio", "adaptive"):
        cells = [f"{B[(s, m, sm, nz)]['ppl']:.4g} ({B[(s, m, sm, nz)]['density']:.3f})" for s in sets for nz in (0.5, 0.3, 0.1)]
        print(f"| {m} | {sm} | " + " | ".join(cells) + " |")
for arm in arms:
    R = {(r["dataset"], r["method"], r["sparsity_method"], r["target"]): r for r in json.load(open(f"{root}/eval_{arm}/ppl_results.json"))}
    for sm in ("nz_ratio", "adaptive"):
        cells = []
        for s in sets:
            for nz in (0.5, 0.3, 0.1):
                st, om, r = B[(s, "static", "nz_ratio", nz)]["ppl"], B[(s, "oracle_mass", "nz_ratio", nz)]["ppl"], R[(s, "seer", sm, nz)]
                cells.append(f"{r['ppl']:.4g} ({100 * (st - r['ppl']) / (st - om):.0f}%)")
        print(f"| {arm} | {sm} | " + " | ".join(cells) + " |")
