"""The Qwen2.5-7B-Instruct and Qwen3-8B post-training recipes: they parse to upstream's settings,
and the pipeline starts on a tiny local model of the same family put in the base model's place."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from seer_attn.training.distill import main, parse_args

REPO = Path(__file__).resolve().parents[2]
RECIPES = {
    "qwen2": (REPO / "configs" / "qwen25_7b_instruct_post_training.yaml", "Qwen/Qwen2.5-7B-Instruct", Qwen2Config),
    "qwen3": (REPO / "configs" / "qwen3_8b_post_training.yaml", "Qwen/Qwen3-8B", Qwen3Config),
}


@pytest.mark.parametrize("family", list(RECIPES))
def test_recipe_parses_to_upstream_settings(family):
    path, hub_id, _ = RECIPES[family]
    margs, dargs, targs = parse_args(["--config", str(path), "--output_dir", "/tmp/unused"])
    assert margs.model == hub_id and margs.seerattn_loss == "kl" and margs.seerattn_gate_loss_scale == 10
    assert margs.seerattn_gate_type == "Qavg_Kmaxminavg" and margs.dtype == "bfloat16"
    assert dargs.dataset == "togethercomputer/RedPajama-Data-1T-Sample" and dargs.train_length == 32768
    assert targs.learning_rate == 1e-3 and targs.warmup_steps == 20 and targs.weight_decay == 0.0
    assert targs.lr_scheduler_type == "cosine"
    assert targs.per_device_train_batch_size * targs.gradient_accumulation_steps == 16
    # the Llama-3.1 recipe's token budget: 524288000 tokens
    assert targs.max_steps * 16 * dargs.train_length == 524288000
    assert targs.output_dir == "/tmp/unused"  # flags override the file


def tiny_family_dir(tiny_llama_dir, tmp_path, family) -> Path:
    """The tiny Llama's tokenizer next to a tiny random model of `family`."""
    config_class = RECIPES[family][2]
    tiny = tmp_path / f"tiny_{family}"
    shutil.copytree(tiny_llama_dir, tiny)  # the tokenizer; the model is replaced below
    plain = json.loads((tiny / "config.json").read_text())
    torch.manual_seed(0)
    config = config_class(  # room in the vocabulary: Qwen's tokenizer class adds <|endoftext|> to the tiny one
        vocab_size=plain["vocab_size"] + 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=plain["bos_token_id"], eos_token_id=plain["eos_token_id"],
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    return tiny


@pytest.mark.parametrize("family", list(RECIPES))
def test_recipe_starts_on_a_tiny_model_of_its_family(family, tiny_llama_dir, tiny_text_jsonl, tmp_path):
    tiny = tiny_family_dir(tiny_llama_dir, tmp_path, family)
    out = main([
        "--config", str(RECIPES[family][0]), "--model", str(tiny), "--dataset", tiny_text_jsonl, "--train_length", "128",
        "--max_steps", "1", "--preprocessing_num_workers", "1", "--dtype", "float32", "--output_dir", str(tmp_path / "o"),
    ])
    log = [json.loads(line) for line in (Path(out) / "gate_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["gate_loss"] > 0
    saved = json.loads((Path(out) / "config.json").read_text())
    assert saved["model_type"] == f"seer_{family}" and saved["base_model"] == str(tiny.resolve())
    gated = AutoModelForCausalLM.from_pretrained(out)
    assert type(gated).__name__ == f"Seer{family.capitalize()}ForCausalLM"


def test_evaluation_and_finetuning_take_a_qwen3_gate_checkpoint(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    from seer_attn.evaluation.ppl import main as ppl
    from seer_attn.training.finetune import main as finetune

    tiny = tiny_family_dir(tiny_llama_dir, tmp_path, "qwen3")
    gates = main(["--model", str(tiny), "--dataset", tiny_text_jsonl, "--train_length", "128", "--max_steps", "1",
                  "--dtype", "float32", "--output_dir", str(tmp_path / "gates")])
    records = ppl(["--model", gates, "--datasets", tiny_text_jsonl, "--lengths", "128", "--nz_ratios", "0.5",
                   "--methods", "dense,seer", "--max_docs", "1", "--output_dir", str(tmp_path / "eval")])
    assert {r["method"] for r in records} == {"dense", "seer"} and all(r["ppl"] > 1 for r in records)
    out = finetune(["--model", gates, "--dataset", tiny_text_jsonl, "--seerattn_mode", "sparse", "--yarn_factor", "2",
                    "--train_length", "128", "--max_steps", "1", "--output_dir", str(tmp_path / "ft")])
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert type(tuned).__name__ == "SeerQwen3ForCausalLM" and tuned.config.rope_parameters["rope_type"] == "yarn"
