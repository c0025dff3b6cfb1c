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


def _naive_summary_mixture(q, k, gate, n_q, n_k, theta=10000.0):
    """Reference for several summaries, written out row by row (fp64)."""
    B, Hq, S, D = q.shape
    bs = gate.block_size
    nb = math.ceil(S / bs)
    sq, sk = bs // n_q, bs // n_k
    qs = [q[:, :, i : i + sq].double().mean(2) for i in range(0, S, sq)]
    ks = [k[:, :, i : i + sk].double().mean(2) for i in range(0, S, sk)]

    def rot(x, pos):
        inv = 1.0 / theta ** (torch.arange(0, D, 2).double() / D)
        f = pos * inv
        emb = torch.cat([f, f])
        x1, x2 = x.chunk(2, -1)
        return x * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()

    qs = [rot(x, i * sq) for i, x in enumerate(qs)]
    ks = [rot(x, j * sk) for j, x in enumerate(ks)]
    ks = [x.repeat_interleave(Hq // k.shape[1], 1) for x in ks]
    out = torch.zeros(B, Hq, nb, nb, dtype=torch.float64)
    for i in range(nb):
        rows = [s for s in range(len(qs)) if s // n_q == i]
        keys = [t for t in range(len(ks)) if t // n_k <= i]
        for s in rows:
            logit = torch.stack([(qs[s] * ks[t]).sum(-1) for t in keys], -1) / math.sqrt(D)
            p = logit.softmax(-1)
            for c, t in enumerate(keys):
                out[:, :, i, t // n_k] += p[..., c] / len(rows)
    return out


@pytest.mark.parametrize("n_q,n_k", [(4, 1), (2, 2), (1, 4)])
@pytest.mark.parametrize("S", [63, 65, 200])
def test_gate_summaries_mixture_matches_reference(n_q, n_k, S):
    torch.manual_seed(0)
    gate = AttnGate(num_heads=4, num_kv_heads=2, head_dim=8, gate_type="Qavg_Kavg", q_summaries=n_q, k_summaries=n_k)
    gate.init_from_pooled()
    q, k = torch.randn(2, 4, S, 8), torch.randn(2, 2, S, 8)
    stride = gate.rope_stride
    cos, sin = rope_tables(2, math.ceil(S / stride), 8, bs=stride)
    probs = gate(q, k, cos, sin, output="probs")
    ref = _naive_summary_mixture(q, k, gate, n_q, n_k)
    torch.testing.assert_close(probs.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
    logits = gate(q, k, cos, sin, output="logits")
    torch.testing.assert_close(logits.softmax(-1), probs, atol=1e-6, rtol=1e-5)


def test_gate_init_from_pooled_gives_pooled_scores():
    torch.manual_seed(0)
    for gate_type, hidden in (("Qavg_Kmaxminavg", None), ("Qmaxavg_Kminavg", None)):
        gate = AttnGate(num_heads=4, num_kv_heads=2, head_dim=8, gate_type=gate_type, hidden_size=hidden)
        gate.init_from_pooled()
        q, k = torch.randn(1, 4, 130, 8), torch.randn(1, 2, 130, 8)
        cos, sin = rope_tables(1, 3, 8)
        qa = apply_rope(pool_blocks(q, 64, "avg"), cos, sin)
        ka = apply_rope(pool_blocks(k, 64, "avg"), cos, sin).repeat_interleave(2, 1)
        ref = (qa @ ka.transpose(-1, -2) / math.sqrt(8)).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(gate(q, k, cos, sin, output="logits"), ref)
    with pytest.raises(ValueError, match="init_from_pooled"):
        AttnGate(4, 2, 8, gate_type="Qmax_Kavg").init_from_pooled()


def test_gate_summaries_gradients_finite():
    gate = AttnGate(num_heads=2, num_kv_heads=1, head_dim=8, gate_type="Qavg_Kmaxavg", q_summaries=4, k_summaries=2)
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 1, 100, 8)
    cos, sin = rope_tables(1, math.ceil(100 / gate.rope_stride), 8, bs=gate.rope_stride)
    logits = gate(q, k, cos, sin, output="logits")
    torch.log_softmax(logits.masked_fill(torch.isinf(logits), -1e9), -1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters())
    with pytest.raises(ValueError, match="q_summaries"):
        AttnGate(2, 1, 8, q_summaries=3)
