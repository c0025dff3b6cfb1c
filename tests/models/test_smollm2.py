"""The real pretrained model (SmolLM2-135M from its GGUF) as a SeerLlama, on CPU."""

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seer_attn.models.loading import find_smollm2_gguf


def test_embedded_model_is_found():
    assert find_smollm2_gguf().name.endswith(".gguf")


def test_smollm2_dense_equals_llama(smollm2, eval_text):
    model, tok = smollm2
    cfg = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if not k.startswith("seerattn_") and k not in ("model_type", "base_model", "architectures")})
    plain = LlamaForCausalLM(cfg).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".attn_gate." in k for k in unexpected)
    x = tok(eval_text, return_tensors="pt").input_ids[:, :300]
    model.set_seerattn(seerattn_mode="dense")
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, plain(x).logits, atol=1e-4, rtol=0)
    finally:
        model.set_seerattn(seerattn_mode="sparse")


def test_smollm2_distill_and_sparse(smollm2, eval_text):
    model, tok = smollm2
    x = tok(eval_text, return_tensors="pt").input_ids[:, :1024]
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    model.set_seerattn(seerattn_mode="distill")
    try:
        with torch.no_grad():
            out = model(x)
        assert out.gate_losses.shape == (30,) and torch.isfinite(out.gate_losses).all()
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=1.0)
        with torch.no_grad():
            dense = model(x, labels=x, logits_to_keep=1)
        model.set_seerattn(seerattn_nz_ratio=0.5, seerattn_min_sparse_length=0)
        with torch.no_grad():
            sparse = model(x, labels=x, logits_to_keep=1)
        ppl_dense, ppl_sparse = math.exp(dense.lm_loss.item()), math.exp(sparse.lm_loss.item())
        assert 3 < ppl_dense < 40 and math.isfinite(ppl_sparse)
        assert 0.4 < sparse.density < 0.6
    finally:
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=0.5, seerattn_min_sparse_length=16384)
