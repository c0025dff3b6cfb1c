"""Long-context fine-tuning on a tiny random Llama: YaRN, sparse training, full checkpoints."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seer_attn import SeerLlamaForCausalLM
from seer_attn.models import apply_yarn
from seer_attn.training import finetune


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(42)
    d = tmp_path_factory.mktemp("tiny_llama_ft")
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def test_apply_yarn_sets_original_length(tiny_dir):
    cfg = SeerLlamaForCausalLM.config_from(tiny_dir)
    apply_yarn(cfg, 4)
    assert cfg.max_position_embeddings == 1024
    assert cfg.rope_parameters["rope_type"] == "yarn" and cfg.rope_parameters["original_max_position_embeddings"] == 256
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, config=cfg)
    gate_rope = model.model.layers[0].self_attn.gate_rotary_emb
    assert gate_rope.rope_type == "yarn" and gate_rope.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    with pytest.raises(ValueError, match="factor"):
        apply_yarn(cfg, 0.5)


def test_sparse_gradients_equal_dense_when_all_blocks_kept(tiny_dir):
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 200))
    grads = {}
    for mode, extra in (("dense", {}), ("sparse", {"seerattn_sparsity_method": "threshold", "seerattn_threshold": 0.0})):
        model = SeerLlamaForCausalLM.from_pretrained(
            tiny_dir, seerattn_mode=mode, dtype=torch.float32, seerattn_min_sparse_length=0, **extra
        ).train()
        for g in model.gate_modules():
            g.requires_grad_(False)  # LM gradients only: the gate loss trains disjoint weights
        out = model(x, labels=x, logits_to_keep=1)
        if mode == "sparse":
            assert out.density == 1.0
        out.loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["dense"].keys() == grads["sparse"].keys() and len(grads["dense"]) > 10
    for n in grads["dense"]:
        torch.testing.assert_close(grads["sparse"][n], grads["dense"][n], atol=1e-5, rtol=1e-4)


def test_sparse_training_adds_gate_loss_and_reaches_base(tiny_dir):
    model = SeerLlamaForCausalLM.from_pretrained(
        tiny_dir, seerattn_mode="sparse", seerattn_nz_ratio=0.5, seerattn_min_sparse_length=0, dtype=torch.float32,
        seerattn_sparsity_method="nz_ratio",
    ).train()
    x = torch.randint(0, 128, (1, 256))
    out = model(x, labels=x, logits_to_keep=1)
    assert out.gate_loss is not None and 0.4 < out.density < 0.8
    torch.testing.assert_close(out.loss, out.lm_loss + out.gate_loss)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.attn_gate.mask_linear_k.weight.grad.abs().sum() > 0


def write_corpus(path, n_docs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(path, "w") as f:
        for _ in range(n_docs):
            idx = torch.randint(0, len(words), (600,), generator=g)
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_finetune_cli_lowers_losses_and_round_trips(tiny_dir, tmp_path, mode, monkeypatch):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    # a word-level tokenizer for the tiny model, saved next to a copy of its weights
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    model_dir = tmp_path / "base"
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    write_corpus(data)
    out = tmp_path / f"ft_{mode}"
    finetune.main([
        "--model", str(model_dir), "--dataset", str(data), "--seerattn_mode", mode, "--nz_ratio", "0.5",
        "--yarn_factor", "2", "--train_length", "512", "--max_steps", "12", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--per_device_train_batch_size", "2", "--output_dir", str(out), "--save_steps", "100",
    ])
    log = [json.loads(line) for line in open(out / finetune.LOG_NAME)]
    assert len(log) == 12
    # steady-state throughput for scaling runs: 12 steps, the first 5 dropped, 2 x 512 tokens a step
    tp = json.loads((out / "throughput.json").read_text())
    assert tp["tokens_per_step"] == 1024 and tp["steps_timed"] == 7 and tp["tokens_per_s"] > 0
    assert tp["world_size"] == 1 and tp["peak_memory_gib"] == []
    first, last = sum(r["lm_loss"] for r in log[:3]) / 3, sum(r["lm_loss"] for r in log[-3:]) / 3
    assert last < first
    again = SeerLlamaForCausalLM.from_pretrained(out)
    if mode == "sparse":
        assert all(0.3 < r["density"] < 0.8 for r in log)
        # the base moves while it trains, so judge the gates on the final base: trained gates
        # predict its attention better than fresh ones
        ids = tok(open(data).readline()[10:2000], return_tensors="pt").input_ids[:, :500]
        again.set_seerattn(seerattn_mode="distill")
        with torch.no_grad():
            trained = again(ids).gate_loss
            torch.manual_seed(0)
            again.reset_gates()
            fresh = again(ids).gate_loss
        assert trained < fresh
        again = SeerLlamaForCausalLM.from_pretrained(out)
    assert again.config.rope_parameters["rope_type"] == "yarn" and again.config.max_position_embeddings == 512
    assert again.config.seerattn_mode == mode
    AutoTokenizer.from_pretrained(out)  # the checkpoint carries its tokenizer


def test_upstream_llama3_recipe_parses_and_starts(tiny_dir, tmp_path):
    margs, dargs, targs = finetune.parse_args(["--config", "configs/llama3_8b_yarn_finetuning.yaml"])
    assert (margs.yarn_factor, margs.nz_ratio, margs.seerattn_loss) == (4.0, 0.5, "mse")
    assert (dargs.train_length, targs.max_steps, targs.learning_rate, targs.gradient_accumulation_steps) == (32768, 400, 1e-5, 2)
    assert targs.lr_scheduler_type == "linear" and targs.warmup_steps == 20
    # the same recipe, pointed at a tiny local Llama and tiny lengths, runs a step
    data = tmp_path / "train.jsonl"
    write_corpus(data)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "base"
    LlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(model_dir)
    out = finetune.main([
        "--config", "configs/llama3_8b_yarn_finetuning.yaml", "--model", str(model_dir), "--dataset", str(data),
        "--original_max_position_embeddings", "256", "--train_length", "512", "--max_steps", "1",
        "--output_dir", str(tmp_path / "out"),
    ])
    assert (tmp_path / "out" / "model.safetensors").exists() and out == str(tmp_path / "out")


def test_final_save_writes_the_state_dict_it_is_given(tiny_dir, tmp_path):
    # under FSDP the Trainer gathers the shards into one full state dict and hands it to `_save`: the
    # checkpoint must hold that dict, not the (sharded) module's own tensors
    from safetensors.torch import load_file
    from transformers import TrainingArguments

    from seer_attn.training.reload_check import RELOAD_CHECK_NAME, checksums

    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, seerattn_mode="sparse")
    trainer = finetune.FinetuneTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    gathered = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    trainer.reload_check = {"input_ids": [1, 2, 3], "loss": 0.0, "settings": {}}
    trainer._save(str(tmp_path / "ck"), state_dict=gathered)
    saved = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert saved and all(torch.equal(saved[k], gathered[k]) for k in saved)
    rec = json.loads((tmp_path / "ck" / RELOAD_CHECK_NAME).read_text())
    assert rec["checksums"] == checksums(gathered)


def test_fsdp2_bf16_policy_reduces_and_returns_fp32():
    # accelerate's default FSDP2 bf16 policy rounds each micro-batch's loss and the gradient sums to bf16
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    finetune.fsdp_keep_fp32_reduce_and_outputs(plugin)
    pol = plugin.mixed_precision_policy
    assert (pol.param_dtype, pol.reduce_dtype, pol.output_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    # a user's own choice stays (accelerate's default is bf16 parameters and reduction, outputs bf16 or None)
    mine = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plugin.mixed_precision_policy = mine
    finetune.fsdp_keep_fp32_reduce_and_outputs(plugin)
    assert plugin.mixed_precision_policy is mine
