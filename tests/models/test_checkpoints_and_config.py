"""What a new user meets first: a sparse forward that ran dense says so, config values are checked
when set (and `set_seerattn` is all or nothing), a distilled checkpoint reloads sparse, and a missing
base model or a mistyped name fails at once with a message naming what was looked at."""

import json
import logging
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import seer_attn.models.loading as loading
import seer_attn.models.modeling_seer as modeling
from seer_attn import SeerLlamaForCausalLM


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_base")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(d)
    return d


@pytest.fixture()
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(modeling, "_warned_dense", set())


def _ids(S, seed=0):
    return torch.randint(0, 128, (1, S), generator=torch.Generator().manual_seed(seed))


def _dense_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "density is 1.0" in r.getMessage()]


def test_sparse_forward_that_runs_dense_logs_why_once(tiny_dir, fresh_warnings, caplog):
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, seerattn_mode="sparse", seerattn_nz_ratio=0.3).eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        # below seerattn_min_sparse_length ("auto": the measured crossover, far above 300 here): dense, said once
        assert model(_ids(300)).density == 1.0
        assert model(_ids(200)).density == 1.0
        (short,) = _dense_warnings(caplog)
        assert "shorter than seerattn_min_sparse_length=" in short and "(auto: the measured crossover" in short
        assert "300 tokens" in short
        # at any length once the minimum is 0; nz_ratio 1.0 is dense by definition: its own reason
        model.set_seerattn(seerattn_min_sparse_length=0)
        assert model(_ids(300)).density < 1.0
        model.set_seerattn(seerattn_nz_ratio=1.0)
        assert model(_ids(300)).density == 1.0
        # decoding steps over a KV cache: dense, density 1.0
        model.set_seerattn(seerattn_nz_ratio=0.3)
        pre = model(_ids(300), use_cache=True)
        step = model(_ids(1, seed=1), past_key_values=pre.past_key_values, use_cache=True)
        assert pre.density < 1.0 and step.density == 1.0
    messages = _dense_warnings(caplog)
    assert len(messages) == 3
    assert "seerattn_nz_ratio=1.0" in messages[1] and "KV cache" in messages[2]


def test_dense_mode_logs_nothing(tiny_dir, fresh_warnings, caplog):
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, seerattn_mode="dense").eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        assert model(_ids(300)).density is None
    assert not _dense_warnings(caplog)


def test_rejected_set_seerattn_leaves_config_unchanged(tiny_dir):
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, seerattn_nz_ratio=0.3)
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="seerattn_nz_ratio"):
        model.set_seerattn(seerattn_mode="dense", seerattn_nz_ratio=1.5)
    with pytest.raises(ValueError, match="seerattn_min_sparse_length"):
        model.set_seerattn(seerattn_threshold=0.1, seerattn_min_sparse_length=-1)
    with pytest.raises(ValueError, match="define the gate weights"):
        model.set_seerattn(seerattn_nz_ratio=0.2, seerattn_gate_block_size=32)
    with pytest.raises(ValueError, match="unknown fields"):
        model.set_seerattn(seerattn_nz_ratio=0.2, seerattn_nz=0.1)
    # direct assignment is checked too
    for name, bad in [("seerattn_nz_ratio", 1.5), ("seerattn_nz_ratio", 0), ("seerattn_mode", "fast"),
                      ("seerattn_threshold", -1.0), ("seerattn_keep_sink", "yes"), ("seerattn_gate_hidden_size", 7),
                      ("seerattn_decode_min_context", "fast"), ("seerattn_decode_min_context", -1)]:
        with pytest.raises(ValueError, match=name):
            setattr(model.config, name, bad)
    assert model.config.to_dict() == before
    model.set_seerattn(seerattn_mode="dense", seerattn_nz_ratio=0.2)
    assert (model.config.seerattn_mode, model.config.seerattn_nz_ratio) == ("dense", 0.2)


def test_distilled_checkpoint_reloads_sparse(tiny_dir, tmp_path):
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, seerattn_mode="distill")
    model.save_pretrained(tmp_path / "gates")
    assert model.config.seerattn_mode == "distill" and not hasattr(model.config, "seerattn_trained_mode")
    saved = json.loads((tmp_path / "gates" / "config.json").read_text())
    assert saved["seerattn_mode"] == "sparse" and saved["seerattn_trained_mode"] == "distill"
    for cls in (SeerLlamaForCausalLM, AutoModelForCausalLM):
        again = cls.from_pretrained(tmp_path / "gates", seerattn_min_sparse_length=0).eval()
        assert again.config.seerattn_mode == "sparse"
        with torch.no_grad():
            out = again(_ids(300), labels=_ids(300))
        assert out.gate_loss is None and out.density < 1.0 and torch.equal(out.loss, out.lm_loss)
    # continuing distillation is one keyword away
    assert SeerLlamaForCausalLM.from_pretrained(tmp_path / "gates", seerattn_mode="distill").config.seerattn_mode == "distill"


def _gates_with_base(tmp_path, tiny_dir, base_model):
    ckpt = tmp_path / "ckpt"
    SeerLlamaForCausalLM.from_pretrained(tiny_dir).save_pretrained(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["base_model"] = base_model
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def test_relative_base_model_resolves_against_checkpoint_then_cwd(tiny_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_dir, tmp_path / "base")
    ckpt = _gates_with_base(tmp_path, tiny_dir, "../base")  # next to the checkpoint
    monkeypatch.chdir(tiny_dir)
    assert SeerLlamaForCausalLM.from_pretrained(ckpt).config.base_model == "../base"
    ckpt = _gates_with_base(tmp_path, tiny_dir, "base")  # relative to the working directory
    monkeypatch.chdir(tmp_path)
    SeerLlamaForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("base_model", ["models/gone", "../gone", "./gone"])
def test_missing_base_model_fails_fast_naming_it(tiny_dir, tmp_path, monkeypatch, base_model):
    ckpt = _gates_with_base(tmp_path, tiny_dir, base_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda endpoint: False)  # a machine without network
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        SeerLlamaForCausalLM.from_pretrained(ckpt)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert msg.startswith(f"base_model '{base_model}' named in {ckpt / 'config.json'} was not found (looked at ")
    assert str((ckpt / base_model).resolve()) in msg and str((tmp_path / base_model).resolve()) in msg
    with pytest.raises(FileNotFoundError, match="base_model"):
        modeling.load_tokenizer(ckpt)


def test_mistyped_name_fails_fast(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"'nonexistent/dir' not found: no such local path .*hub is off"):
        SeerLlamaForCausalLM.from_pretrained("nonexistent/dir")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(loading, "_hub_reachable", lambda endpoint: False)
    with pytest.raises(FileNotFoundError, match="did not answer"):
        SeerLlamaForCausalLM.from_pretrained("nonexistent/dir")
    assert time.perf_counter() - start < 5
