"""`summarize` / `format_summary` / `findings` on hand-made records: the changes, the oracle share,
and the findings a reader must not miss (budgets that collapse to one density, a gate that loses to static)."""

import pytest

from seer_attn.evaluation.summary import findings, format_summary, summarize


def _records(seer_half=10.5, seer_quarter=11.0, quarter_density=0.24):
    r = [{"dataset": "d", "context_length": 2048, "method": "dense", "sparsity_method": "dense", "target": 1.0,
          "density": 1.0, "ppl": 10.0, "num_docs": 2}]
    for nz, seer, density in ((0.5, seer_half, 0.48), (0.25, seer_quarter, quarter_density)):
        for m, ppl in (("seer", seer), ("oracle_mass", 10.2 + (0.5 - nz)), ("static", 11.0 + 2 * (0.5 - nz))):
            r.append({"dataset": "d", "context_length": 2048, "method": m, "sparsity_method": "nz_ratio", "target": nz,
                      "density": density, "ppl": ppl, "num_docs": 2, "extra": "ignored"})
    return r


def test_summarize_changes_and_oracle_share():
    half, quarter = summarize(_records())
    assert (half["target"], half["density"], half["dense_ppl"]) == (0.5, 0.48, 10.0)
    assert half["vs_dense"] == pytest.approx(0.05) and half["vs_static"] == pytest.approx(10.5 / 11.0 - 1)
    assert half["oracle_share"] == pytest.approx((11.0 - 10.5) / (11.0 - 10.2))
    assert quarter["oracle_ppl"] is None and quarter["vs_oracle"] is None
    text = format_summary([half, quarter])
    assert "nz_ratio 0.5" in text and "+5.0%" in text and "vs oracle_mass" in text and "vs oracle " not in text
    assert "beats the static sink + window pattern at every budget (2/2)" in text


def test_findings_flag_collapsed_budgets_and_losing_gate():
    lines = findings(summarize(_records(seer_half=11.5, seer_quarter=12.0, quarter_density=0.475)))
    assert any("give the same realised density" in line for line in lines)
    assert any("does NOT beat the static" in line for line in lines)
    assert format_summary([]).startswith("no 'seer' rows")
