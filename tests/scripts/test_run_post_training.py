"""`scripts/run_post_training.sh`: its CPU defaults give distinct densities per budget (checked
without a model), it runs end to end through its knobs on a tiny local Llama and ends with the
summary; and the Llama-3.1-8B recipe config parses and starts on a tiny local Llama in its place."""

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seer_attn.kernels.block_mask import block_density, select_blocks
from seer_attn.modules.seer_attention import baseline_scores
from seer_attn.training.distill import main, parse_args

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "llama31_8b_post_training.yaml"


def _dry_run(**env) -> dict[str, str]:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_post_training.sh")], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if re.match(r"^[A-Z_]+=", line))


def test_cpu_defaults_give_distinct_densities_per_budget():
    # the block schedule at the CPU defaults' lengths, without running the model
    knobs = _dry_run(DEVICE="cpu")
    assert int(knobs["TRAIN_LENGTH"]) >= 1024
    assert {"dense", "seer", "oracle_mass", "static"} <= set(knobs["METHODS"].split(","))
    budgets = [float(x) for x in knobs["NZ_RATIOS"].split(",")]
    assert len(budgets) >= 2
    for L in (int(x) for x in knobs["EVAL_LENGTHS"].split(",")):
        nb = math.ceil(L / 64)
        assert nb >= 32, "the last row must have at least 32 blocks"
        q = torch.zeros(1, 2, L, 1)
        scores = {"random": torch.rand(1, 2, nb, nb, generator=torch.Generator().manual_seed(0)),
                  "static": baseline_scores("static", q, q, q, 1.0, 64, "naive")}
        for name, sc in scores.items():
            densities = [block_density(select_blocks(sc, nz_ratio=nz)) for nz in budgets]
            for nz, d in zip(budgets, densities):
                assert abs(d - nz) < 0.1 * nz + 0.05, (name, nz, d)
            gaps = [abs(a - b) for i, a in enumerate(densities) for b in densities[i + 1 :]]
            assert min(gaps) > 0.1, (name, L, densities)


def test_gpu_defaults_are_8k():
    knobs = _dry_run(DEVICE="cuda")
    assert knobs["TRAIN_LENGTH"] == "8192" and knobs["EVAL_LENGTHS"] == "8192" and knobs["THRESHOLDS"]


def test_main_job_runs_end_to_end_with_summary(tiny_llama_dir, tmp_path):
    # the CPU defaults, on a tiny local Llama and long synthetic documents, at 1024 tokens
    data = tmp_path / "long.jsonl"
    text = " ".join(f"Item {i} of list {i % 7} costs {i * 37 % 101} coins." for i in range(600))
    data.write_text("".join(json.dumps({"text": f"Document {d}. {text}"}) + "\n" for d in range(4)))
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "MODEL": tiny_llama_dir,
        "DATASET": str(data),
        "EVAL_DATASETS": str(data),
        "CHECK_DISJOINT": "0",  # one file for both, to stay tiny
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MAX_STEPS": "2",
        "TRAIN_LENGTH": "256",
        "EVAL_LENGTHS": "1024",
        "MAX_DOCS": "1",
    }
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_post_training.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gates, eval_dir = tmp_path / "out" / "gates", tmp_path / "out" / "eval"
    assert all(".attn_gate." in k for k in load_file(str(gates / "model.safetensors")))
    config = json.loads((gates / "config.json").read_text())
    assert config["base_model"] == tiny_llama_dir and config["seerattn_mode"] == "sparse"
    records = json.loads((eval_dir / "ppl_results.json").read_text())
    assert {(r["method"], r["target"]) for r in records} == {("dense", 1.0)} | {
        (m, nz) for m in ("seer", "oracle_mass", "static") for nz in (0.5, 0.25)}
    for m in ("seer", "oracle_mass", "static"):
        half, quarter = (next(r["density"] for r in records if r["method"] == m and r["target"] == nz) for nz in (0.5, 0.25))
        assert half - quarter > 0.1, (m, half, quarter)
    rows = json.loads((eval_dir / "summary.json").read_text())
    assert [(r["target"], r["vs_dense"] is not None, r["vs_static"] is not None) for r in rows] == [(0.5, True, True), (0.25, True, True)]
    out = proc.stdout
    assert "== summary" in out and "share of oracle gain" in out and "CPU-sized run" in out
    assert f"{eval_dir}/{{ppl_results.md,ppl_results.csv,ppl_results.json}}" in out and str(gates) in out
    assert re.search(r"== done in \d+:\d\d \(device cpu, \d+ threads\)", out)


def test_llama31_8b_config_parses_to_upstream_recipe():
    margs, dargs, targs = parse_args(["--config", str(CONFIG), "--output_dir", "/tmp/unused"])
    assert margs.model == "meta-llama/Llama-3.1-8B" and margs.seerattn_loss == "kl" and margs.seerattn_gate_loss_scale == 10
    assert dargs.dataset == "togethercomputer/RedPajama-Data-1T-Sample" and dargs.train_length == 65536
    assert targs.max_steps == 500 and targs.learning_rate == 1e-3 and targs.warmup_steps == 20
    assert targs.lr_scheduler_type == "cosine" and targs.weight_decay == 0.0
    assert targs.per_device_train_batch_size * targs.gradient_accumulation_steps == 16
    assert targs.output_dir == "/tmp/unused"  # flags override the file


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text() + "\nlearning_rat: 1.0e-3\n")
    with pytest.raises(ValueError, match="unknown arguments"):
        parse_args(["--config", str(bad)])


def test_llama31_8b_config_starts_on_tiny_llama(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    out = main([
        "--config", str(CONFIG), "--model", tiny_llama_dir, "--dataset", tiny_text_jsonl, "--train_length", "128",
        "--max_steps", "1", "--preprocessing_num_workers", "1", "--dtype", "float32", "--output_dir", str(tmp_path / "o"),
    ])
    log = [json.loads(line) for line in (Path(out) / "gate_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["gate_loss"] > 0
    args = json.loads((Path(out) / "distill_args.json").read_text())
    assert args["train"]["gradient_accumulation_steps"] == 16 and args["model"]["seerattn_gate_loss_scale"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_dense_yarn_finetuning.sh", "run_seerattn_yarn_finetuning.sh"])
def test_yarn_finetuning_scripts_run_end_to_end(script, tiny_llama_dir, tiny_text_jsonl, tmp_path):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "MODEL": tiny_llama_dir,
        "DATASET": tiny_text_jsonl,
        "EVAL_DATASETS": tiny_text_jsonl,
        "OUTPUT_DIR": str(tmp_path / "out"),
        "SCALING_FACTOR": "2",
        "TRAIN_LENGTH": "256",
        "MAX_STEPS": "2",
        "INIT_TRAIN_LENGTH": "128",
        "INIT_STEPS": "2",
        "MAX_TRAIN_DOCS": "12",
        "MAX_DOCS": "1",
        "NZ_RATIO": "0.5",
        "EXTRA_TRAIN_ARGS": "--min_doc_tokens 1",
        "EXTRA_EVAL_ARGS": "--min_doc_tokens 255",
    }
    proc = subprocess.run(["bash", str(REPO / "scripts" / script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 2048
    records = json.loads((tmp_path / "out" / "eval" / "ppl_results.json").read_text())
    assert records and all(r["context_length"] == 256 for r in records)
    if "seerattn" in script:
        assert (tmp_path / "out" / "init_gates" / "model.safetensors").exists()
        assert {r["method"] for r in records} == {"dense", "seer"}
