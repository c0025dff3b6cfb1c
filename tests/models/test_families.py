"""Every supported family on a tiny random model (GQA; Qwen2 with random q/k/v biases, Qwen3 with
random q/k norms, Phi-3 with its fused qkv_proj): dense == the transformers model of the family,
nz 1.0 == dense, the gate sees exactly what the family rotates, distill trains gates only,
gate-only save -> load (own class, AutoModelForCausalLM, AutoSeerForCausalLM), sliding windows."""

import importlib
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import seer_attn.models.modeling_seer as modeling_seer
from seer_attn import (
    AutoSeerForCausalLM,
    SeerLlamaForCausalLM,
    SeerMistralForCausalLM,
    SeerPhi3ForCausalLM,
    SeerQwen2ForCausalLM,
    SeerQwen3ForCausalLM,
)

TINY = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
    intermediate_size=128, vocab_size=128, max_position_embeddings=2048,
)
FAMILIES = {
    "qwen2": (lambda **kw: Qwen2Config(**{**TINY, **kw}), SeerQwen2ForCausalLM),
    "qwen3": (lambda **kw: Qwen3Config(**{"head_dim": 16, **TINY, **kw}), SeerQwen3ForCausalLM),
    "mistral": (lambda **kw: MistralConfig(**{"sliding_window": None, **TINY, **kw}), SeerMistralForCausalLM),
    "phi3": (lambda **kw: Phi3Config(**{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **TINY, **kw}), SeerPhi3ForCausalLM),
}


def save_tiny(path, family, seed=0, **kw):
    """A random plain model of `family`; biases and q/k norm weights randomised so that they matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family][0](**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                p.normal_(0.5, 0.5)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param), request.param)


def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


CLASSIC_GATE = dict(
    seerattn_gate_q_summaries=1, seerattn_gate_k_summaries=1, seerattn_gate_init="random", seerattn_sparsity_method="nz_ratio"
)


def seer(path, **kw):
    kw.setdefault("seerattn_min_sparse_length", 0)  # short test inputs must still take the sparse path
    # the mechanics below are checked on the classic gate (one summary per side, random init,
    # per-row top-k); the default recipe has its own tests (test_gate_designs_*, tests/models/test_seer_llama.py)
    for key, value in CLASSIC_GATE.items():
        kw.setdefault(key, value)
    return AutoSeerForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def ids(B=2, S=300, seed=0):
    return torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(seed))


def padded_batch(S=300):
    x = ids(S=S)
    mask = torch.ones_like(x)
    mask[1, :77] = 0  # left padding
    mask[0, 250:] = 0  # right padding
    return x, mask


def test_family_is_picked_from_the_config(family_dir):
    family, path = family_dir
    model = seer(path)
    assert type(model) is FAMILIES[family][1] and model.config.model_type == f"seer_{family}"
    assert model.config.base_model == path


def test_qwen2_has_biases_and_qwen3_norms_phi3_fused(family_dir):
    family, path = family_dir
    attn = seer(path).model.layers[0].self_attn
    proj = attn.qkv_proj if family == "phi3" else attn.q_proj
    assert (proj.bias is not None) == (family == "qwen2")
    assert hasattr(attn, "q_norm") == (family == "qwen3")
    assert hasattr(attn, "qkv_proj") == (family == "phi3")


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("mode", [dict(seerattn_mode="dense"), dict(seerattn_mode="sparse", seerattn_nz_ratio=1.0)])
def test_dense_and_nz_one_equal_the_family_model(family_dir, padding, mode):
    family, path = family_dir
    x, mask = padded_batch() if padding else (ids(), None)
    with torch.no_grad():
        ref = hf(path)(x, attention_mask=mask).logits
        out = seer(path, **mode)(x, attention_mask=mask).logits
    real = mask.bool() if padding else torch.ones_like(x, dtype=torch.bool)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)


def test_gate_sees_what_the_family_rotates(family_dir, monkeypatch):
    # the pre-RoPE q/k handed to the gate are exactly the tensors the family's own forward passes
    # to its apply_rotary_pos_emb (after Qwen3's norms, with Qwen2's biases, split from Phi-3's qkv)
    family, path = family_dir
    model = seer(path, seerattn_mode="sparse", seerattn_nz_ratio=1.0)  # layer outputs stay those of the family
    family_module = importlib.import_module(type(hf(path)).__module__)
    seen, gate_seen = [], []
    orig_rope, orig_seer = family_module.apply_rotary_pos_emb, modeling_seer.seer_attention

    def spy_rope(q, k, cos, sin, *a, **kw):
        seen.append((q, k))
        return orig_rope(q, k, cos, sin, *a, **kw)

    def spy_seer(q, k, v, q_pre, k_pre, *a, **kw):
        gate_seen.append((q_pre, k_pre))
        return orig_seer(q, k, v, q_pre, k_pre, *a, **kw)

    monkeypatch.setattr(family_module, "apply_rotary_pos_emb", spy_rope)
    monkeypatch.setattr(modeling_seer, "seer_attention", spy_seer)
    x = ids(B=1, S=200)
    with torch.no_grad():
        hf(path)(x)
        model(x)
    assert len(seen) == len(gate_seen) == 2
    for (q, k), (qp, kp) in zip(seen, gate_seen):
        torch.testing.assert_close(qp, q, atol=1e-6, rtol=0)
        torch.testing.assert_close(kp, k, atol=1e-6, rtol=0)


def test_sparse_forward_is_sparse_and_padding_equals_unpadded(family_dir):
    family, path = family_dir
    model = seer(path, seerattn_nz_ratio=0.3)
    x, mask = padded_batch()
    with torch.no_grad():
        padded = model(x, attention_mask=mask)
        alone = model(x[1:, 77:])
    assert padded.density < 0.8
    torch.testing.assert_close(padded.logits[1:, 77:], alone.logits, atol=1e-5, rtol=0)


def test_distill_gives_gate_gradients_only(family_dir):
    family, path = family_dir
    model = seer(path, seerattn_mode="distill")
    model.freeze_base()
    out = model(ids(S=200))
    assert out.gate_losses.shape == (2,) and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".attn_gate." in name), name


def test_gate_only_save_load(family_dir, tmp_path):
    family, path = family_dir
    model = seer(path, seerattn_nz_ratio=0.4)
    with torch.no_grad():
        for g in model.gate_modules():
            g.mask_linear_k.weight.normal_()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"seer_{family}" and saved["base_model"] == path
    x = ids(S=400)
    with torch.no_grad():
        ref = model(x).logits
        for loader in (FAMILIES[family][1], AutoModelForCausalLM, AutoSeerForCausalLM):
            again = loader.from_pretrained(tmp_path, dtype=torch.float32).eval()
            assert type(again) is FAMILIES[family][1] and again.config.seerattn_nz_ratio == 0.4
            assert torch.equal(again(x).logits, ref), loader.__name__
    with pytest.raises(ValueError, match="AutoSeerForCausalLM"):
        SeerLlamaForCausalLM.from_pretrained(tmp_path)


def test_wrong_family_class_and_unsupported_family(tmp_path):
    path = save_tiny(tmp_path / "q", "qwen2")
    with pytest.raises(ValueError, match="Qwen2Config; SeerLlamaForCausalLM needs a LlamaConfig"):
        SeerLlamaForCausalLM.from_pretrained(path)
    Gemma2Config(**TINY, head_dim=16).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match=r"'gemma2'.*Supported model types: llama .*qwen2 .*qwen3 .*mistral .*phi3"):
        AutoSeerForCausalLM.from_pretrained(str(tmp_path / "g"))
    with pytest.raises(ValueError, match="partial rotary"):
        AutoSeerForCausalLM.from_config(FAMILIES["phi3"][0](partial_rotary_factor=0.5))


# --- sliding windows: Mistral (every layer) and Qwen2 (layers >= max_window_layers) ---------------
WINDOWED = {
    "mistral": dict(sliding_window=96),
    "qwen2": dict(use_sliding_window=True, sliding_window=96, max_window_layers=1),
}


@pytest.mark.parametrize("family", list(WINDOWED))
def test_dense_mode_applies_the_sliding_window_as_transformers(family, tmp_path):
    path = save_tiny(tmp_path, family, **WINDOWED[family])
    base, model = hf(path), seer(path, seerattn_mode="dense")
    windows = [layer.self_attn.seer_sliding_window for layer in model.model.layers]
    assert windows == ([96, 96] if family == "mistral" else [None, 96])
    x, mask = padded_batch(S=300)
    with torch.no_grad():
        ref = base(x, attention_mask=mask).logits
        out = model(x, attention_mask=mask).logits
        # the window matters at this length: without it the logits differ
        no_window = hf(save_tiny(tmp_path / "nw", family, sliding_window=None))(x, attention_mask=mask).logits
        # decode over the (windowed) cache equals the full forward
        pre = model(x[:1, :299], use_cache=True)
        step = model(x[:1, 299:], past_key_values=pre.past_key_values, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    assert (no_window[real] - ref[real]).abs().max() > 1e-3
    torch.testing.assert_close(step[:, -1], base(x[:1]).logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(WINDOWED))
def test_sparse_with_a_sliding_window_is_refused(family, tmp_path):
    path = save_tiny(tmp_path, family, **WINDOWED[family])
    for mode in ("sparse", "distill"):
        with pytest.raises(ValueError, match="sliding_window=96 < max_position_embeddings"):
            seer(path, seerattn_mode=mode)
    model = seer(path, seerattn_mode="dense")
    model.set_seerattn(seerattn_mode="sparse")  # switched after load: refused at forward, before running
    with pytest.raises(ValueError, match="sliding window of 96 tokens and the input has 300"):
        with torch.no_grad():
            model(ids(S=300))
    with torch.no_grad():
        assert torch.isfinite(model(ids(S=96)).logits).all()  # within the window it is exact


def test_gate_designs_reach_every_family(family_dir):
    # the config's gate fields reach each family's gates (one shared attention mixin builds them)
    family, path = family_dir
    model = seer(path, seerattn_gate_q_summaries=2, seerattn_gate_k_summaries=2, seerattn_gate_init="pooled",
                 seerattn_nz_ratio=0.3)
    gate = model.gate_modules()[0]
    assert gate.rope_stride == 32
    with torch.no_grad():
        out = model(ids(S=300))
    assert torch.isfinite(out.logits).all() and out.density < 0.8
