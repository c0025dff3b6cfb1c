"""PPL evaluation on the embedded SmolLM2-135M (one shared load) and on a tiny local Llama."""

import json
import math

import pytest

from seer_attn.evaluation.ppl import evaluate, load_eval_documents, main, sweep_points, write_results
from seer_attn.kernels.block_mask import nz_ratio_to_k
from seer_attn.data import boundary_token_ids, check_context_length

LENGTH = 512  # 8 blocks of 64
NB = LENGTH // 64


def _point(method, sparsity, target):
    if method == "dense":
        return sweep_points(["dense"], [], [])[0]
    return sweep_points([method], [target] if sparsity == "nz_ratio" else [], [target] if sparsity == "threshold" else [])[0]


@pytest.fixture(scope="module")
def smollm2_records(smollm2):
    model, tok = smollm2
    docs = {"pydoc-topics": load_eval_documents("builtin:pydoc-topics", tok, LENGTH - 1, max_docs=1)}
    points = [_point("dense", "dense", 1.0), _point("seer", "nz_ratio", 1.0)]
    points += [_point(m, "nz_ratio", 0.2) for m in ("oracle", "random")]
    points += [_point("oracle", "threshold", 0.05)]
    return evaluate(model, tok, docs, [LENGTH], points, seed=0, recall=True)


def _get(records, method, sparsity, target):
    return next(r for r in records if (r["method"], r["sparsity_method"], r["target"]) == (method, sparsity, target))


def test_smollm2_document_start_is_endoftext(smollm2):
    _, tok = smollm2
    start, end = boundary_token_ids(tok)
    assert start == end == tok.get_vocab()["<|endoftext|>"]


def test_density_one_equals_dense(smollm2_records):
    dense = _get(smollm2_records, "dense", "dense", 1.0)
    assert math.isfinite(dense["ppl"]) and 1 < dense["ppl"] < 100
    r = _get(smollm2_records, "seer", "nz_ratio", 1.0)
    assert r["density"] == 1.0
    assert r["ppl"] == pytest.approx(dense["ppl"], rel=1e-6)


@pytest.mark.parametrize("nz", [0.2])
def test_oracle_never_worse_than_random(smollm2_records, nz):
    oracle, random = _get(smollm2_records, "oracle", "nz_ratio", nz), _get(smollm2_records, "random", "nz_ratio", nz)
    assert abs(oracle["density"] - random["density"]) < 0.1
    assert oracle["ppl"] <= random["ppl"]
    assert oracle["ppl"] >= _get(smollm2_records, "dense", "dense", 1.0)["ppl"] * 0.98


@pytest.mark.parametrize("nz", [0.2])
@pytest.mark.parametrize("method", ["oracle", "random"])
def test_realised_density_within_budget(smollm2_records, method, nz):
    # per row min(i+1, k) top blocks, plus the diagonal when top-k missed it: between k and k+1 per row
    k = nz_ratio_to_k(nz, NB)
    causal = NB * (NB + 1) / 2
    low = sum(min(i + 1, k) for i in range(NB)) / causal
    high = sum(min(i + 1, k + 1) for i in range(NB)) / causal
    d = _get(smollm2_records, method, "nz_ratio", nz)["density"]
    assert low - 1e-6 <= d <= high + 1e-6
    assert abs(d - nz) <= 2 / (NB + 1) + 0.05


def test_threshold_row_is_sparse_and_records_complete(smollm2_records, tmp_path):
    r = _get(smollm2_records, "oracle", "threshold", 0.05)
    assert 0 < r["density"] < 1
    keys = {"dataset", "context_length", "method", "sparsity_method", "target", "density", "ppl", "num_docs", "recall", "overlap"}
    assert all(set(x) - {"layers"} == keys and x["num_docs"] == 1 and x["context_length"] == LENGTH for x in smollm2_records)
    paths = write_results(smollm2_records, tmp_path)
    assert json.loads(paths["json"].read_text()) == [{k: v for k, v in x.items() if k != "layers"} for x in smollm2_records]
    assert paths["png"].stat().st_size > 0 and "| pydoc-topics | 512 |" in paths["md"].read_text()
    recall = json.loads(paths["recall_json"].read_text())
    assert [x["method"] for x in recall] == ["seer", "oracle", "random", "oracle"]  # every sparse row, dense not
    assert all(len(x["layers"]) == 30 and len(x["layers"][0]["recall"]) == 9 for x in recall)
    assert paths["recall_png"].stat().st_size > 0 and "Mean attention recall" in paths["md"].read_text()


def test_recall_in_ppl_rows(smollm2_records):
    assert _get(smollm2_records, "dense", "dense", 1.0)["recall"] == 1.0
    full = _get(smollm2_records, "seer", "nz_ratio", 1.0)
    assert full["recall"] == pytest.approx(1.0, abs=1e-5) and full["overlap"] == 1.0
    oracle, random = _get(smollm2_records, "oracle", "nz_ratio", 0.2), _get(smollm2_records, "random", "nz_ratio", 0.2)
    assert 0 < random["recall"] < oracle["recall"] < 1 and 0 < random["overlap"] < 1
    layer = oracle["layers"][5]
    assert oracle["recall"] == pytest.approx(sum(sum(x["recall"]) for x in oracle["layers"]) / (30 * 9), rel=1e-5)
    assert set(layer) == {"layer", "density", "recall", "overlap"} and 0 < layer["density"] < 1


def test_sweep_points_methods_and_thresholds():
    pts = sweep_points(["dense", "seer", "static", "random", "oracle_mass", "pooled"], [1.0, 0.3], [0.01])
    assert [(p.method, p.sparsity_method) for p in pts if p.sparsity_method == "threshold"] == [
        ("seer", "threshold"), ("oracle_mass", "threshold"), ("pooled", "threshold")
    ]
    assert sum(p.method == "dense" for p in pts) == 1 and len(pts) == 1 + 5 * 2 + 3
    with pytest.raises(ValueError, match="unknown methods"):
        sweep_points(["seer", "h2o"], [0.5], [])
    with pytest.raises(ValueError, match="nz_ratio"):
        sweep_points(["seer"], [1.5], [])
    pts = sweep_points(["dense", "seer", "static"], [1.0, 0.3], [], budget_methods=("nz_ratio", "adaptive"), top_ps=(0.9,))
    assert [(p.method, p.sparsity_method, p.target) for p in pts if p.sparsity_method in ("adaptive", "top_p")] == [
        ("seer", "adaptive", 0.3), ("static", "adaptive", 0.3), ("seer", "top_p", 0.9)
    ]
    with pytest.raises(ValueError, match="budget methods"):
        sweep_points(["seer"], [0.5], [], budget_methods=("threshold",))


def test_bad_inputs_raise(smollm2, tmp_path):
    model, tok = smollm2
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_documents(str(tmp_path / "nope.jsonl"), tok, 10)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_eval_documents(str(tmp_path / "empty.jsonl"), tok, 10)
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": f"short document {i}"}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"all 3 documents have fewer than 8191 tokens"):
        load_eval_documents(str(tmp_path / "short.jsonl"), tok, 8191)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        check_context_length(model.config, 16384)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate(model, tok, {"x": [[1] * 20000]}, [16384], sweep_points(["dense"], [], []))
    with pytest.raises(FileNotFoundError, match="not an embedded model"):
        main(["--model", "no-such-model", "--datasets", "builtin:pydoc-topics", "--lengths", "256"])


def test_cli_on_gate_checkpoint_of_tiny_llama(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    from seer_attn.training.distill import main as distill

    gates = distill(["--model", tiny_llama_dir, "--dataset", tiny_text_jsonl, "--train_length", "128", "--max_steps", "2",
                     "--warmup_steps", "0", "--save_strategy", "no", "--output_dir", str(tmp_path / "gates")])
    records = main(["--model", gates, "--datasets", tiny_text_jsonl, "--lengths", "128,192", "--nz_ratios", "0.5",
                    "--thresholds", "0.3", "--max_docs", "1", "--output_dir", str(tmp_path / "eval")])
    assert len(records) == 2 * (1 + 6 + 4)
    assert {r["dataset"] for r in records} == {"docs"}
    assert all(r["recall"] is not None for r in records)
    for name in ("ppl_results.json", "ppl_results.csv", "ppl_results.md", "ppl_vs_density.png", "recall.json",
                 "recall_per_layer.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
