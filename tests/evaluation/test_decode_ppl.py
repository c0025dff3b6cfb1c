"""Decode-mode PPL on a tiny local Llama whose distilled checkpoint carries a decode gate."""

import json

import pytest

from seer_attn.evaluation.decode_ppl import main, sweep_points


def test_sweep_points():
    pts = sweep_points(["dense", "seer", "quest"], [256, 512])
    assert [(p.method, p.target) for p in pts] == [("dense", 0), ("seer", 256), ("quest", 256), ("seer", 512), ("quest", 512)]
    assert pts[1].fields["seerattn_decode_selector"] == "gate" and pts[1].fields["seerattn_mode"] == "decode_eval"
    with pytest.raises(ValueError, match="unknown methods"):
        sweep_points(["seer", "h2o"], [256])
    with pytest.raises(ValueError, match="budgets"):
        sweep_points(["seer"], [0])


def test_cli_on_decode_gate_checkpoint(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    from seer_attn.training.distill import main as distill

    gates = distill(["--model", tiny_llama_dir, "--dataset", tiny_text_jsonl, "--train_length", "192", "--max_steps", "2",
                     "--warmup_steps", "0", "--save_strategy", "no", "--seerattn_decode_gate_type", "Kmaxminavg",
                     "--output_dir", str(tmp_path / "gates")])
    out = tmp_path / "eval"
    records = main(["--model", gates, "--datasets", tiny_text_jsonl, "--lengths", "192", "--budgets", "64,128,1024",
                    "--max_docs", "1", "--generation_check", "4", "--output_dir", str(out)])
    assert len(records) == 1 + 3 * 4
    dense = next(r for r in records if r["method"] == "dense")["ppl"]
    by = {(r["method"], r["token_budget"]): r for r in records}
    for m in ("seer", "oracle", "quest", "static"):
        # a budget past the context is dense; 64 tokens is the own block alone, whoever selects
        assert by[(m, 1024)]["ppl"] == pytest.approx(dense, rel=1e-5) and by[(m, 1024)]["density"] == 1.0
        assert by[(m, 64)]["ppl"] == pytest.approx(by[("static", 64)]["ppl"], rel=1e-6)
        assert by[(m, 128)]["density"] < 1.0
    for name in ("decode_ppl_results.json", "decode_ppl_results.csv", "decode_ppl_results.md", "decode_ppl_vs_budget.png"):
        assert (out / name).stat().st_size > 0
    assert "seer share of oracle gain" in (out / "decode_ppl_results.md").read_text()
    check = json.loads((out / "decode_generation_check.json").read_text())
    assert check["identical"] and check["selector"] == "gate" and check["new_tokens"] == 4
    # --keep_recent 1 at a budget of one block besides the own: every selector keeps the most recent block, alike
    kept = main(["--model", gates, "--datasets", tiny_text_jsonl, "--lengths", "192", "--budgets", "128", "--max_docs", "1",
                 "--methods", "seer,oracle", "--keep_recent", "1", "--output_dir", str(tmp_path / "keep")])
    by_keep = {r["method"]: r["ppl"] for r in kept}
    assert by_keep["seer"] == pytest.approx(by_keep["oracle"], rel=1e-6)
    assert by_keep["seer"] != pytest.approx(by[("seer", 128)]["ppl"], rel=1e-6)
