"""`seer_attention(..., record=True)`: the recorded mask is the one the sparse path used, the mass map
is the exact attention's, the oracle mask is what `oracle_mass` selects, and recording changes nothing."""

import math

import pytest
import torch

from seer_attn.kernels.block_mask import select_blocks
from seer_attn.kernels.naive import attn_with_pooling_naive
from seer_attn.modules.attn_gate import AttnGate
from seer_attn.modules.seer_attention import SeerAttentionSettings, seer_attention


def _inputs(S, Hq=4, Hkv=2, D=64, dtype=torch.float32):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, S, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
    nb = math.ceil(S / 64)
    pos = torch.arange(nb).float() * 64
    f = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))[None]
    emb = torch.cat([f, f], -1)
    return q, k, v, AttnGate(Hq, Hkv, D), emb.cos()[None], emb.sin()[None]


SETTINGS = [
    dict(sparsity_method="nz_ratio", nz_ratio=0.3),
    dict(sparsity_method="nz_ratio", nz_ratio=0.5, keep_sink=True, keep_diagonal=False),
    dict(sparsity_method="threshold", threshold=0.05),
    dict(sparsity_method="nz_ratio", nz_ratio=0.3, dense_last_rows=2),
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_record_oracle_mass_mask_is_reference(kw):
    """Keeps `_reference_mask` in step with the selection of the sparse path."""
    q, k, v, gate, cos, sin = _inputs(200)
    settings = SeerAttentionSettings(selector="oracle_mass", kernel="naive", **kw)
    _, stats = seer_attention(q, k, v, q, k, gate, cos, sin, 0.125, settings, record=True)
    assert stats.sparse and torch.equal(stats.mask, stats.oracle_mask)
    _, mass = attn_with_pooling_naive(q, k, v, True, 0.125, 64, pooling="mass")
    torch.testing.assert_close(stats.mass, mass)
    assert int(stats.kept) == int(stats.mask.sum())


@pytest.mark.parametrize("kernel", ["naive", "TopK"])
def test_record_keeps_mask_used_and_changes_nothing(kernel):
    q, k, v, gate, cos, sin = _inputs(200, dtype=torch.float16 if kernel == "TopK" else torch.float32)
    settings = SeerAttentionSettings(nz_ratio=0.3, kernel=kernel)
    with torch.no_grad():
        o0, s0 = seer_attention(q, k, v, q, k, gate, cos, sin, 0.125, settings)
        o1, s1 = seer_attention(q, k, v, q, k, gate, cos, sin, 0.125, settings, record=True)
    assert s0.mask is None and s0.mass is None and s0.oracle_mask is None
    assert torch.equal(o0, o1)
    scores = gate(q, k, cos, sin, output="logits")
    assert torch.equal(s1.mask, select_blocks(scores, "nz_ratio", 0.3))
    assert torch.equal(s1.oracle_mask, select_blocks(s1.mass, "nz_ratio", 0.3))
    torch.testing.assert_close(s1.mass.sum(-1), torch.ones(1, 4, 4))


def test_record_dense_by_rule_is_full_mask():
    q, k, v, gate, cos, sin = _inputs(130)
    settings = SeerAttentionSettings(nz_ratio=1.0, kernel="naive")
    _, stats = seer_attention(q, k, v, q, k, gate, cos, sin, 0.125, settings, record=True)
    full = torch.ones(3, 3, dtype=torch.bool).tril().expand(1, 4, 3, 3)
    assert not stats.sparse and torch.equal(stats.mask, full) and torch.equal(stats.oracle_mask, full)
