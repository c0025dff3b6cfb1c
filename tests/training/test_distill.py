"""Gate distillation on a tiny random Llama: the loss drops, checkpoints are gate-only, resume and
gradient accumulation behave, and the data pipeline never feeds padding."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seer_attn import SeerLlamaForCausalLM, load_tokenizer
from seer_attn.training.data import (
    boundary_token_ids,
    check_context_length,
    filter_min_tokens,
    load_documents,
    pack_sequences,
    tokenize_documents,
)
from seer_attn.training.distill import main

LENGTH = 128


def _run(out, model, data, *extra):
    args = ["--model", model, "--dataset", data, "--train_length", str(LENGTH), "--output_dir", str(out),
            "--warmup_steps", "0", "--seed", "0", "--dataloader_pin_memory", "false", *extra]
    return main(args)


def _gates(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _fixed_batch(tiny_llama_dir, tiny_text_jsonl):
    tok = load_tokenizer(tiny_llama_dir)
    ids = tokenize_documents(load_documents(tiny_text_jsonl), tok)
    packed = pack_sequences(ids, LENGTH, *boundary_token_ids(tok))
    return torch.tensor(packed["input_ids"][:4])


def test_trainer_lowers_gate_loss_and_checkpoint_is_gate_only(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    batch = _fixed_batch(tiny_llama_dir, tiny_text_jsonl)
    # the trainer's mechanics, on the classic gate (one summary per side, random init)
    before = SeerLlamaForCausalLM.from_pretrained(
        tiny_llama_dir, seerattn_mode="distill", seerattn_gate_init="random", seerattn_gate_q_summaries=1, seerattn_gate_k_summaries=1
    )
    torch.manual_seed(0)
    before.reset_gates()
    with torch.no_grad():
        loss_before = before(input_ids=batch, logits_to_keep=1).loss.item()

    out = _run(tmp_path / "run", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "15", "--learning_rate", "3e-2", "--seerattn_gate_init", "random",
               "--seerattn_gate_q_summaries", "1", "--seerattn_gate_k_summaries", "1",
               "--per_device_train_batch_size", "2", "--layer_log_steps", "5")
    after = SeerLlamaForCausalLM.from_pretrained(out, seerattn_mode="distill")
    with torch.no_grad():
        loss_after = after(input_ids=batch, logits_to_keep=1).loss.item()
    assert loss_after < 0.8 * loss_before

    saved = _gates(out)
    assert saved and all(".attn_gate." in k for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert json.loads((Path(out) / "config.json").read_text())["base_model"] == str(Path(tiny_llama_dir).resolve())
    log = [json.loads(line) for line in (Path(out) / "gate_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 16))
    assert [r["step"] for r in log if "layer_losses" in r] == [5, 10, 15]
    assert all(len(r["layer_losses"]) == 2 for r in log if "layer_losses" in r)


def test_resume_matches_uninterrupted_run(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    common = ["--learning_rate", "1e-2", "--save_steps", "2"]
    full = _run(tmp_path / "full", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "4", *common)
    part = _run(tmp_path / "part", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "4", *common)
    # pretend the run stopped after step 2: keep only checkpoint-2, then resume from it
    for name in ("checkpoint-4", "model.safetensors"):
        p = Path(part) / name
        if p.is_dir():
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
        else:
            p.unlink()
    resumed = _run(tmp_path / "part", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "4", *common,
                   "--resume_from_checkpoint", "last")
    assert resumed == part
    a, b = _gates(full), _gates(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    state = json.loads((Path(part) / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_gradient_accumulation_averages_micro_batches(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    # the gate loss is a per-batch mean: 1 x 2 accumulated must equal one batch of 2. Plain SGD, so the
    # update is lr * gradient (Adam's first step is about lr * sign(gradient), which hides scale errors)
    common = ["--max_steps", "1", "--optim", "sgd", "--save_strategy", "no", "--max_grad_norm", "0"]
    init = _run(tmp_path / "init", tiny_llama_dir, tiny_text_jsonl, *common, "--learning_rate", "0")
    common += ["--learning_rate", "10"]
    big = _run(tmp_path / "big", tiny_llama_dir, tiny_text_jsonl, "--per_device_train_batch_size", "2", *common)
    acc = _run(tmp_path / "acc", tiny_llama_dir, tiny_text_jsonl, "--per_device_train_batch_size", "1",
               "--gradient_accumulation_steps", "2", *common)
    a, b, w0 = _gates(big), _gates(acc), _gates(init)
    assert any((a[k] - w0[k]).abs().max() > 1e-3 for k in a)
    for k in a:
        torch.testing.assert_close(a[k] - w0[k], b[k] - w0[k], rtol=1e-3, atol=1e-6)
    la = json.loads((Path(big) / "gate_loss.jsonl").read_text().splitlines()[0])["gate_loss"]
    lb = json.loads((Path(acc) / "gate_loss.jsonl").read_text().splitlines()[0])["gate_loss"]
    assert la == pytest.approx(lb, rel=1e-4)


def test_packing_has_fixed_length_start_token_and_no_padding(tiny_llama_dir, tiny_text_jsonl):
    tok = load_tokenizer(tiny_llama_dir)
    start, end = boundary_token_ids(tok)
    assert (start, end) == (tok.bos_token_id, tok.eos_token_id)
    ids = tokenize_documents(load_documents(tiny_text_jsonl), tok)
    packed = pack_sequences(ids, LENGTH, start, end)
    rows = packed["input_ids"]
    assert len(rows) == (sum(ids["num_tokens"]) + len(ids)) // (LENGTH - 1)
    assert all(len(r) == LENGTH and r[0] == start for r in rows)
    stream = [t for r in rows for t in r[1:]]
    expected = [t for doc in ids["input_ids"] for t in (*doc, end)]
    assert stream == expected[: len(stream)]
    assert tok.pad_token_id is None or tok.pad_token_id not in stream


def test_documents_shuffle_with_seed_and_min_length(tiny_llama_dir, tiny_text_jsonl):
    a = load_documents(tiny_text_jsonl, seed=1)["text"]
    assert a == load_documents(tiny_text_jsonl, seed=1)["text"]
    assert a != load_documents(tiny_text_jsonl)["text"] and sorted(a) == sorted(load_documents(tiny_text_jsonl)["text"])
    tok = load_tokenizer(tiny_llama_dir)
    ids = tokenize_documents(load_documents(tiny_text_jsonl), tok)
    n = sorted(ids["num_tokens"])[6]
    assert len(filter_min_tokens(ids, n, "x", "test")) == sum(k >= n for k in ids["num_tokens"])


def test_bad_data_inputs_raise(tmp_path, tiny_llama_dir, tiny_text_jsonl):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_documents(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_documents(str(tmp_path / "blank.jsonl"))
    with pytest.raises(ValueError, match="no field 'body'"):
        load_documents(tiny_text_jsonl, text_field="body")
    tok = load_tokenizer(tiny_llama_dir)
    ids = tokenize_documents(load_documents(tiny_text_jsonl), tok)
    with pytest.raises(ValueError, match=r"all 12 documents have fewer than 100000 tokens"):
        filter_min_tokens(ids, 100_000, tiny_text_jsonl, "min_doc_tokens")
    with pytest.raises(ValueError, match="not enough for one sequence"):
        pack_sequences(ids, 100_000, 1, 2)
    config = SeerLlamaForCausalLM.config_class.from_pretrained(tiny_llama_dir)
    check_context_length(config, 1024)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        check_context_length(config, 2048)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        _run(tmp_path / "long", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "1", "--train_length", "4096")


def test_layer_budget_docs_save_calibrated_curves(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    out = _run(tmp_path / "run", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "1", "--layer_budget_docs", "2")
    cfg = json.loads((Path(out) / "config.json").read_text())
    curves = cfg["seerattn_layer_budget_curves"]
    assert len(curves) == cfg["num_hidden_layers"] and all(c[-1][0] == 1.0 for c in curves)
    model = SeerLlamaForCausalLM.from_pretrained(out)
    assert model.config.seerattn_layer_budget_curves == curves
    assert model.config.seerattn_mode == "sparse"  # calibration restored the settings it changed


def test_profile_steps_write_where_the_time_goes(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    out = _run(tmp_path / "run", tiny_llama_dir, tiny_text_jsonl, "--max_steps", "8", "--profile_steps", "2")
    prof = json.loads((Path(out) / "profile.json").read_text())
    assert prof["steps"] == 2 and prof["wall_s"] > 0 and prof["host_ops"]
    assert prof["device_busy_s"] == 0.0 and prof["device_kernels"] == []  # CPU: no device kernels
    assert (Path(out) / "profile.txt").read_text().strip()


def test_gate_loss_logger_keeps_sums_on_device_until_a_flush(tmp_path):
    # per-step records, written in batches (no host sync per step): every `flush_steps`, at checkpoints, at the end
    from types import SimpleNamespace

    from seer_attn.training.distill import GateLossLogger

    class Stub:
        def __init__(self):
            self.step = 0

        def pop_gate_losses(self):
            self.step += 1
            return torch.tensor([2.0 * self.step, 1.0, 3.0]), 2  # two micro-batches: [total, layer 0, layer 1] sums

    args = SimpleNamespace(output_dir=str(tmp_path), device="cpu")
    state = SimpleNamespace(global_step=0, max_steps=6, is_world_process_zero=True)
    logger = GateLossLogger(Stub(), layer_log_steps=3, flush_steps=4)
    path = tmp_path / "gate_loss.jsonl"
    lines = lambda: path.read_text().splitlines() if path.exists() else []  # noqa: E731
    for step in range(1, 6):
        state.global_step = step
        logger.on_step_end(args, state, None)
        assert len(lines()) == (4 if step >= 4 else 0)
    logger.on_save(args, state, None)
    state.global_step = 6
    logger.on_step_end(args, state, None)
    logger.on_train_end(args, state, None)
    log = [json.loads(x) for x in lines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["gate_loss"] for r in log] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [r["layer_losses"] for r in log if "layer_losses" in r] == [[0.5, 1.5], [0.5, 1.5]]


def test_one_process_on_several_gpus_is_refused():
    # the Trainer would fall back to torch.nn.DataParallel (threads: Triton's autotuner crashed on 2 H200s)
    from types import SimpleNamespace

    from seer_attn.training.distill import refuse_data_parallel

    with pytest.raises(RuntimeError, match="2 GPUs are visible to this single process.*NPROC=2.*CUDA_VISIBLE_DEVICES"):
        refuse_data_parallel(SimpleNamespace(n_gpu=2, world_size=1))
    refuse_data_parallel(SimpleNamespace(n_gpu=1, world_size=1))  # one GPU, or one per process: fine
    refuse_data_parallel(SimpleNamespace(n_gpu=1, world_size=2))
