import math

import pytest
import torch

from seer_attn.modules.attn_gate import apply_rope, pool_blocks
from seer_attn.modules.decode_gate import (
    CompressedKeyCache,
    DecodeGate,
    StaticCompressedKeyCache,
    parse_decode_gate_type,
    valid_decode_gate_types,
)


def rope(positions, d=16, theta=10000.0):
    """`[B, n]` positions -> cos, sin `[B, n, d]` (plain RoPE, enough to check positions)."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = positions.float()[..., None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def make_gate(q_pooling="proj", use_norm=True, gate_type="Kmaxminavg", hidden=None, bs=16, Hq=6, Hkv=2, D=16):
    torch.manual_seed(0)
    gate = DecodeGate(Hq, Hkv, D, gate_type=gate_type, hidden_size=hidden, block_size=bs, q_pooling=q_pooling, use_norm=use_norm)
    gate.reset_parameters(0.2)
    if use_norm:
        with torch.no_grad():
            gate.q_norm.weight.uniform_(0.5, 1.5)
            gate.k_norm.weight.uniform_(0.5, 1.5)
    return gate


def test_decode_gate_type_names():
    names = valid_decode_gate_types()
    assert len(names) == 7 and "Kmaxminavg" in names and "Kminmax" not in names
    assert parse_decode_gate_type("Kmaxavg") == ("max", "avg")
    with pytest.raises(ValueError, match="valid types"):
        parse_decode_gate_type("Qavg_Kmax")
    with pytest.raises(ValueError, match="hidden_size == head_dim"):
        DecodeGate(4, 2, 16, hidden_size=32, q_pooling="avg")
    with pytest.raises(ValueError, match="q_pooling"):
        DecodeGate(4, 2, 16, q_pooling="sum")
    assert DecodeGate(4, 2, 16, q_pooling="heads").q_linear.weight.shape == (4, 16, 16)


@pytest.mark.parametrize("q_pooling,use_norm,hidden", [("proj", True, None), ("proj", False, 8), ("avg", True, None)])
def test_decode_gate_matches_reference(q_pooling, use_norm, hidden):
    """Every step written out by hand: pooled K -> per-KV-head linear -> norm -> RoPE at the block start;
    grouped Q -> (projection | mean) -> norm -> RoPE at the token; scaled dot product; candidates j < t // bs."""
    bs, Hq, Hkv, D, S = 16, 6, 2, 16, 71
    gate = make_gate(q_pooling, use_norm, "Kmaxmin", hidden, bs, Hq, Hkv, D)
    Dg = gate.hidden_size
    q, k = torch.randn(2, Hq, S, D), torch.randn(2, Hkv, S, D)
    rows = torch.arange(S)
    pos = rows[None].expand(2, S)
    nbf = S // bs
    logits = gate(q, k, *rope(pos, Dg), *rope(pos[:, :: bs][:, :nbf], Dg), rows)
    assert logits.shape == (2, Hkv, S, math.ceil(S / bs))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w if use_norm else x

    kb = torch.cat([pool_blocks(k[:, :, : nbf * bs], bs, "max"), pool_blocks(k[:, :, : nbf * bs], bs, "min")], -1)
    kb = torch.stack([kb[:, h] @ gate.k_linear.weight[h] for h in range(Hkv)], 1)
    kb = apply_rope(norm(kb, gate.k_norm.weight if use_norm else None), *rope(pos[:, ::bs][:, :nbf], Dg))
    G = Hq // Hkv
    if q_pooling == "proj":
        qg = torch.stack([torch.cat([q[:, h * G + g] for g in range(G)], -1) @ gate.q_linear.weight[h] for h in range(Hkv)], 1)
    else:
        qg = torch.stack([q[:, h * G : (h + 1) * G].mean(1) for h in range(Hkv)], 1)
    qg = apply_rope(norm(qg, gate.q_norm.weight if use_norm else None), *rope(pos, Dg))
    ref = qg @ kb.transpose(-1, -2) / math.sqrt(Dg)
    for t in range(S):
        nc = t // bs
        torch.testing.assert_close(logits[:, :, t, :nc], ref[:, :, t, :nc], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(logits[:, :, t, nc:]).all()


@pytest.mark.parametrize("use_norm", [True, False])
def test_decode_gate_heads_is_a_mixture_of_softmaxes(use_norm):
    """`heads`: one query per head, block log-probabilities = log of the mean over the group's heads of
    their softmaxes over the candidate blocks; -inf elsewhere; finite gradients even for rows with no
    candidate."""
    bs, Hq, Hkv, D, S = 16, 6, 2, 16, 71
    gate = make_gate("heads", use_norm, "Kmaxavg", None, bs, Hq, Hkv, D)
    q, k = torch.randn(2, Hq, S, D), torch.randn(2, Hkv, S, D)
    rows = torch.arange(S)
    pos = rows[None].expand(2, S)
    nbf = S // bs
    out = gate(q, k, *rope(pos, D), *rope(pos[:, ::bs][:, :nbf], D), rows)
    assert out.shape == (2, Hkv, S, math.ceil(S / bs))

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w if use_norm else x

    kb = torch.cat([pool_blocks(k[:, :, : nbf * bs], bs, "max"), pool_blocks(k[:, :, : nbf * bs], bs, "avg")], -1)
    kb = torch.stack([kb[:, h] @ gate.k_linear.weight[h] for h in range(Hkv)], 1)
    kb = apply_rope(norm(kb, gate.k_norm.weight if use_norm else None), *rope(pos[:, ::bs][:, :nbf], D))
    qh = torch.stack([q[:, h] @ gate.q_linear.weight[h] for h in range(Hq)], 1)
    qh = apply_rope(norm(qh, gate.q_norm.weight if use_norm else None), *rope(pos, D))
    G = Hq // Hkv
    for t in range(S):
        nc = t // bs
        if nc:
            logits = torch.stack([torch.einsum("bd,bjd->bj", qh[:, h, t], kb[:, h // G, :nc]) for h in range(Hq)], 1)
            probs = torch.softmax(logits / math.sqrt(D), -1)
            ref = probs.view(2, Hkv, G, nc).mean(2).log()
            torch.testing.assert_close(out[:, :, t, :nc], ref, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(out[:, :, t, nc:]).all()
    out.masked_fill(torch.isinf(out), 0).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters() if p.grad is not None)


@pytest.mark.parametrize("q_pooling", ["heads", "proj", "avg"])
def test_decode_gate_init_from_pooled(q_pooling):
    """Pooled init: the gate scores the (group-mean, or per-head) query against the avg-pooled keys."""
    bs, Hq, Hkv, D, S = 16, 4, 2, 16, 64
    gate = DecodeGate(Hq, Hkv, D, "Kmaxminavg", block_size=bs, q_pooling=q_pooling, use_norm=False)
    gate.init_from_pooled()
    q, k = torch.randn(1, Hq, S, D), torch.randn(1, Hkv, S, D)
    rows = torch.tensor([S - 1])
    # identity RoPE tables (cos 1, sin 0): the check is about the projections
    ones, zeros = torch.ones(1, 1, D), torch.zeros(1, 1, D)
    out = gate(q[:, :, -1:], k, ones, zeros, ones.expand(1, S // bs, D), zeros.expand(1, S // bs, D), rows)
    kavg = pool_blocks(k, bs, "avg")
    G = Hq // Hkv
    nc = (S - 1) // bs
    if q_pooling == "heads":
        logits = torch.einsum("bhd,bhjd->bhj", q[:, :, -1], kavg.repeat_interleave(G, 1))[..., :nc] / math.sqrt(D)
        ref = torch.softmax(logits, -1).view(1, Hkv, G, nc).mean(2).log()
    else:
        qm = q[:, :, -1].view(1, Hkv, G, D).mean(2)
        ref = torch.einsum("bhd,bhjd->bhj", qm, kavg)[..., :nc] / math.sqrt(D)
    torch.testing.assert_close(out[:, :, 0, :nc], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="avg"):
        DecodeGate(Hq, Hkv, D, "Kmaxmin", q_pooling=q_pooling if q_pooling != "avg" else "proj").init_from_pooled()


@pytest.mark.parametrize("q_pooling", ["proj", "heads"])
def test_decode_gate_key_summaries(q_pooling):
    """k_summaries=2: two compressed keys per block (pools of 8 tokens rotated at their own first token);
    a block scores the log-sum-exp of its two logits (heads: per head, before the mixture)."""
    bs, Hq, Hkv, D, S = 16, 4, 2, 16, 53
    torch.manual_seed(0)
    gate = DecodeGate(Hq, Hkv, D, "Kmaxavg", block_size=bs, q_pooling=q_pooling, use_norm=False, k_summaries=2)
    gate.reset_parameters(0.2)
    q, k = torch.randn(1, Hq, S, D), torch.randn(1, Hkv, S, D)
    rows = torch.arange(S)
    pos = rows[None]
    nbf = S // bs
    out = gate(q, k, *rope(pos, D), *rope(pos[:, : nbf * bs : 8], D), rows)
    kb = torch.cat([pool_blocks(k[:, :, : nbf * bs], 8, "max"), pool_blocks(k[:, :, : nbf * bs], 8, "avg")], -1)
    kb = torch.stack([kb[:, h] @ gate.k_linear.weight[h] for h in range(Hkv)], 1)
    kb = apply_rope(kb, *rope(pos[:, : nbf * bs : 8], D))  # [1, Hkv, 2 * nbf, D]
    G = Hq // Hkv
    for t in (20, 40, 52):
        nc = t // bs
        if q_pooling == "heads":
            qh = apply_rope(torch.stack([q[:, h] @ gate.q_linear.weight[h] for h in range(Hq)], 1), *rope(pos, D))
            lg = torch.stack([qh[0, h, t] @ kb[0, h // G, : 2 * nc].T for h in range(Hq)]) / math.sqrt(D)
            blk = lg.view(Hq, nc, 2).logsumexp(-1)
            ref = torch.softmax(blk, -1).view(Hkv, G, nc).mean(1).log()
        else:
            qg = torch.stack([torch.cat([q[:, h * G + g] for g in range(G)], -1) @ gate.q_linear.weight[h] for h in range(Hkv)], 1)
            qg = apply_rope(qg, *rope(pos, D))
            lg = torch.stack([qg[0, h, t] @ kb[0, h, : 2 * nc].T for h in range(Hkv)]) / math.sqrt(D)
            ref = lg.view(Hkv, nc, 2).logsumexp(-1)
        torch.testing.assert_close(out[0, :, t, :nc], ref, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(out[0, :, t, nc:]).all()
    with pytest.raises(ValueError, match="k_summaries"):
        DecodeGate(Hq, Hkv, D, block_size=16, k_summaries=3)


@pytest.mark.parametrize("k_summaries", [1, 4])
def test_compressed_key_cache_incremental_equals_prefix(k_summaries):
    """Prompt, then single tokens and a 3-token step, across several block boundaries: after every
    step the cache equals compressing the whole prefix at once (each summary rotated at its start)."""
    bs, Hkv, D = 16, 2, 16
    gate = make_gate(bs=bs, Hkv=Hkv, D=D)
    gate.k_summaries, gate.key_stride = k_summaries, bs // k_summaries
    total, prompt = 75, 21
    k = torch.randn(2, Hkv, total, D)
    pos = torch.arange(total)[None] + 5  # position ids need not start at 0: blocks rotate at their own
    rope_fn = lambda p: rope(p, gate.hidden_size)  # noqa: E731
    cache = CompressedKeyCache()
    steps = [prompt] + [1] * 20 + [3] + [1] * (total - prompt - 23)
    t = 0
    for n in steps:
        cache.append(gate, k[:, :, t : t + n], pos[:, t : t + n], rope_fn)
        t += n
        full = (t // bs) * bs
        assert cache.num_tokens == t and cache.num_blocks == t // bs
        assert cache.pending.shape[2] == t - full
        if full:
            ref = gate.compress_keys(k[:, :, :full], *rope_fn(pos[:, : full : gate.key_stride].expand(2, -1)))
            torch.testing.assert_close(cache.keys, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.pending, k[:, :, full:t])
    assert t == total
    # beam reordering follows the batch
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.keys[0], cache.keys[1]) and torch.equal(cache.pending[0], k[1, :, (total // bs) * bs :])


@pytest.mark.parametrize("k_summaries", [1, 4])
def test_static_compressed_key_cache_equals_prefix(k_summaries):
    """The preallocated (CUDA-graph) state: a prompt, one-token steps through `step` (positions on the
    device), a 3-token append and more steps, across block boundaries; after every step its complete
    blocks equal compressing the whole prefix at once, and the masked compression of a complete block
    is exactly the unmasked one."""
    bs, Hkv, D = 16, 2, 16
    gate = make_gate(bs=bs, Hkv=Hkv, D=D)
    gate.k_summaries, gate.key_stride = k_summaries, bs // k_summaries
    total, prompt, capacity = 75, 21, 80
    k = torch.randn(2, Hkv, total, D)
    pos = torch.arange(total)[None]  # a StaticCache fills slot = position
    rope_fn = lambda p: rope(p, gate.hidden_size)  # noqa: E731
    cache = StaticCompressedKeyCache(capacity)
    steps = [prompt] + [1] * 20 + [3] + [1] * (total - prompt - 23)
    t = 0
    for n in steps:
        if n == 1:
            cache.step(gate, k[:, :, t : t + 1], torch.full((2,), t), rope_fn)
        else:
            cache.append(gate, k[:, :, t : t + n], pos[:, t : t + n], rope_fn)
        t += n
        full = (t // bs) * bs
        assert cache.keys.shape == (2, Hkv, 5 * k_summaries, gate.hidden_size)
        if full:
            ref = gate.compress_keys(k[:, :, :full], *rope_fn(pos[:, : full : gate.key_stride].expand(2, -1)))
            torch.testing.assert_close(cache.keys[:, :, : (t // bs) * k_summaries], ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.block[:, :, : t - full], k[:, :, full:t])
    kb, cos_sin = k[:, :, :32], rope_fn(pos[:, :32 : gate.key_stride].expand(2, -1))
    assert torch.equal(gate.compress_keys(kb, *cos_sin, valid=torch.ones(2, 32, dtype=torch.bool)), gate.compress_keys(kb, *cos_sin))
    with pytest.raises(ValueError, match="do not fit"):
        StaticCompressedKeyCache(20).append(gate, k[:, :, :21], pos[:, :21], rope_fn)
