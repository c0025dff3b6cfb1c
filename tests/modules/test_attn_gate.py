import math

import pytest
import torch

from seer_attn.modules.attn_gate import AttnGate, apply_rope, parse_gate_type, pool_blocks, valid_gate_types


def rope_tables(B, nb, d, bs=64, theta=10000.0):
    pos = torch.arange(nb).float() * bs
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = pos[:, None] * inv[None]
    emb = torch.cat([f, f], -1)
    return emb.cos().expand(B, nb, d), emb.sin().expand(B, nb, d)


def test_gate_type_names():
    names = valid_gate_types()
    assert len(names) == 49 and "Qavg_Kmaxminavg" in names and "Qavg_Kminmax" not in names
    assert parse_gate_type("Qmaxavg_Kmin") == (("max", "avg"), ("min",))
    with pytest.raises(ValueError, match="valid gate types"):
        parse_gate_type("Qavg_Kminmax")


@pytest.mark.parametrize("S", [63, 64, 65, 130])
def test_pool_blocks_partial_last_block(S):
    x = torch.randn(1, 2, S, 4)
    nb = math.ceil(S / 64)
    for kind, fn in (("max", lambda t: t.amax(2)), ("min", lambda t: t.amin(2)), ("avg", lambda t: t.mean(2))):
        out = pool_blocks(x, 64, kind)
        assert out.shape == (1, 2, nb, 4)
        for i in range(nb):
            torch.testing.assert_close(out[:, :, i], fn(x[:, :, i * 64 : (i + 1) * 64]))


@pytest.mark.parametrize("gate_type,hidden,expect_q", [("Qavg_Kmaxmin", None, False), ("Qmaxavg_Kmax", None, True), ("Qavg_Kavg", 32, True)])
@pytest.mark.parametrize("S", [65, 200])
def test_gate_shapes_gqa(gate_type, hidden, expect_q, S):
    gate = AttnGate(num_heads=6, num_kv_heads=2, head_dim=16, gate_type=gate_type, hidden_size=hidden)
    assert (gate.mask_linear_q is not None) == expect_q
    nb = math.ceil(S / 64)
    cos, sin = rope_tables(2, nb, gate.hidden_size)
    q, k = torch.randn(2, 6, S, 16), torch.randn(2, 2, S, 16)
    probs = gate(q, k, cos, sin, output="probs")
    logits = gate(q, k, cos, sin, output="logits")
    assert probs.shape == logits.shape == (2, 6, nb, nb)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 6, nb))
    assert (probs.triu(1) == 0).all() and torch.isinf(logits.triu(1)[..., 0, 1:]).all()
    torch.testing.assert_close(torch.softmax(logits, -1), probs)


def test_gate_scores_are_relative_in_position():
    # RoPE makes scores depend on block offsets only: shifting every block start changes nothing
    gate = AttnGate(4, 2, 16, "Qavg_Kmax")
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    c0, s0 = rope_tables(1, 4, 16)
    pos = (torch.arange(4).float() * 64 + 1000)[:, None] * (1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))[None]
    emb = torch.cat([pos, pos], -1)
    c1, s1 = emb.cos()[None], emb.sin()[None]
    torch.testing.assert_close(gate(q, k, c0, s0, "logits"), gate(q, k, c1, s1, "logits"), atol=1e-4, rtol=1e-4)


def test_gate_bad_inputs():
    gate = AttnGate(4, 2, 16)
    cos, sin = rope_tables(1, 2, 16)
    with pytest.raises(ValueError, match="built for"):
        gate(torch.randn(1, 3, 128, 16), torch.randn(1, 2, 128, 16), cos, sin)
    with pytest.raises(ValueError, match="RoPE tables"):
        gate(torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16), cos, sin)
    with pytest.raises(ValueError, match="multiple"):
        AttnGate(5, 2, 16)


def test_apply_rope_is_a_rotation():
    x = torch.randn(1, 2, 3, 8)
    cos, sin = rope_tables(1, 3, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
