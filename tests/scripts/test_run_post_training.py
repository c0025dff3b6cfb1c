"""`scripts/run_post_training.sh` end to end on the embedded model (tiny knobs), and the Llama-3.1-8B
recipe config: it parses, and the pipeline starts on a tiny local Llama put in its place."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from seer_attn.training.distill import main, parse_args

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "llama31_8b_post_training.yaml"


@pytest.mark.slow
def test_no_argument_script_runs_end_to_end(tmp_path):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MAX_STEPS": "2",
        "TRAIN_LENGTH": "128",
        "MAX_TRAIN_DOCS": "4",
        "EVAL_LENGTHS": "128",
        "MAX_DOCS": "1",
        "NZ_RATIOS": "0.5",
        "THRESHOLDS": "0.3",
        "METHODS": "dense,seer,oracle,random",
    }
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_post_training.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gates = tmp_path / "out" / "gates"
    assert all(".attn_gate." in k for k in load_file(str(gates / "model.safetensors")))
    assert json.loads((gates / "config.json").read_text())["base_model"] == "smollm2-135m"
    records = json.loads((tmp_path / "out" / "eval" / "ppl_results.json").read_text())
    assert {(r["method"], r["sparsity_method"]) for r in records} == {
        ("dense", "dense"), ("seer", "nz_ratio"), ("oracle", "nz_ratio"), ("random", "nz_ratio"),
        ("seer", "threshold"), ("oracle", "threshold"),
    }
    assert all(r["dataset"] == "pydoc-topics" and r["num_docs"] == 1 for r in records)
    assert (tmp_path / "out" / "eval" / "ppl_vs_density.png").exists()


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
