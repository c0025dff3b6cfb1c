"""`pooled_block_scores` (the training-free `pooled` selector) against an fp64 twin written with complex
rotations, and against an AttnGate whose weights pass avg-pooled Q and K through unchanged."""

import math

import pytest
import torch

from seer_attn.modules.attn_gate import AttnGate, pooled_block_scores
from seer_attn.modules.seer_attention import SeerAttentionSettings, baseline_scores, seer_attention


def block_rope(B, nb, d, block_size=64, base=10000.0):
    pos = torch.arange(nb).float() * block_size
    f = pos[:, None] * (1.0 / base ** (torch.arange(0, d, 2).float() / d))[None]
    emb = torch.cat([f, f], -1)
    return emb.cos().expand(B, nb, d), emb.sin().expand(B, nb, d)


def twin(q, k, block_size, base=10000.0):
    """fp64 loops: mean over each block's real tokens, rotation as a complex phase (i - j) * block_size."""
    B, Hq, S, D = q.shape
    nb, g, h = math.ceil(S / block_size), Hq // k.shape[1], D // 2
    theta = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    out = torch.full((B, Hq, nb, nb), float("-inf"), dtype=torch.float64)
    for i in range(nb):
        qi = q[:, :, i * block_size : (i + 1) * block_size].double().mean(2)
        zq = torch.complex(qi[..., :h], qi[..., h:])
        for j in range(i + 1):
            kj = k[:, :, j * block_size : (j + 1) * block_size].double().mean(2).repeat_interleave(g, 1)
            zk = torch.complex(kj[..., :h], kj[..., h:])
            phase = torch.exp(1j * theta * (i - j) * block_size)
            out[:, :, i, j] = (zq * zk.conj() * phase).real.sum(-1) / math.sqrt(D)
    return out


@pytest.mark.parametrize("S,Hq,Hkv,D", [(63, 2, 2, 64), (200, 4, 2, 64), (130, 6, 3, 128)])
def test_pooled_block_scores_matches_twin(S, Hq, Hkv, D):
    torch.manual_seed(0)
    q, k = torch.randn(2, Hq, S, D), torch.randn(2, Hkv, S, D)
    nb = math.ceil(S / 64)
    out = pooled_block_scores(q, k, *block_rope(2, nb, D), 64)
    ref = twin(q, k, 64)
    assert out.dtype == torch.float32 and out.shape == (2, Hq, nb, nb)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.isneginf(out[..., ~causal]).all()
    torch.testing.assert_close(out[..., causal].double(), ref[..., causal], atol=1e-5, rtol=1e-5)


def test_pooled_block_scores_bad_inputs():
    q, k = torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
    with pytest.raises(ValueError, match=r"RoPE tables \[B, 2, 64\]"):
        pooled_block_scores(q, k, *block_rope(1, 2, 32), 64)
    with pytest.raises(ValueError, match="multiple of key heads"):
        pooled_block_scores(torch.randn(1, 3, 128, 64), k, *block_rope(1, 2, 64), 64)


@pytest.mark.parametrize("S", [200, 1000])
def test_pass_through_gate_gives_pooled_scores_and_selection(S):
    """A `Qavg_Kmaxminavg` gate whose K projection selects the avg part computes exactly the pooled logits."""
    torch.manual_seed(1)
    Hq, Hkv, D = 4, 2, 64
    q, k, v = torch.randn(1, Hq, S, D), torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)
    nb = math.ceil(S / 64)
    cos, sin = block_rope(1, nb, D)
    gate = AttnGate(Hq, Hkv, D, gate_type="Qavg_Kmaxminavg")
    assert gate.mask_linear_q is None and gate.mask_linear_k.weight.shape == (Hq, 3 * D, D)
    with torch.no_grad():
        gate.mask_linear_k.weight.zero_()
        gate.mask_linear_k.weight[:, 2 * D :, :] = torch.eye(D)  # pools are concatenated max, min, avg
        logits = gate(q, k, cos, sin, output="logits")
    pooled = pooled_block_scores(q, k, cos, sin, 64)
    torch.testing.assert_close(logits, pooled, atol=1e-6, rtol=1e-6)
    probs = baseline_scores("pooled", q, k, v, 1 / math.sqrt(D), 64, "naive", q_pre=q, k_pre=k, cos=cos, sin=sin,
                            output="probs")
    torch.testing.assert_close(probs, torch.softmax(pooled, -1))
    for method in ("nz_ratio", "threshold"):
        masks = []
        for selector in ("gate", "pooled"):
            settings = SeerAttentionSettings(selector=selector, sparsity_method=method, nz_ratio=0.3, threshold=0.02,
                                             kernel="naive")
            _, stats = seer_attention(q, k, v, q, k, gate, cos, sin, 1 / math.sqrt(D), settings, record=True)
            masks.append(stats.mask)
        assert torch.equal(masks[0], masks[1]) and 0 < masks[0].float().mean() < 1
    with pytest.raises(ValueError, match="needs q_pre, k_pre, cos and sin"):
        baseline_scores("pooled", q, k, v, 1.0, 64, "naive")
