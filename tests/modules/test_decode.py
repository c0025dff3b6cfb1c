"""Block selection and the reference selectors of decode-stage sparsity (`seer_attn.modules.decode`)."""

import math

import pytest
import torch

from seer_attn.modules.decode import _causal_blocks_before, decode_min_context, select_decode_blocks, token_block_scores

NEG = float("-inf")


def test_select_decode_blocks_budget():
    scores = torch.tensor([[[[0.5, 3.0, NEG, 1.0], [NEG, NEG, NEG, NEG]]]])
    # budget 3 blocks of 16 = own block + the best 2 candidates
    idx = select_decode_blocks(scores, 16, token_budget=48)
    assert idx.shape == (1, 1, 2, 2)
    assert idx[0, 0, 0].tolist() == [1, 3] and idx[0, 0, 1].tolist() == [-1, -1]
    # more budget than candidates: every candidate, -1 for the rest
    idx = select_decode_blocks(scores, 16, token_budget=10**6)
    assert sorted(idx[0, 0, 0].tolist()) == [-1, 0, 1, 3]
    # a budget of one block is the own block alone
    assert select_decode_blocks(scores, 16, token_budget=20).shape[-1] == 0


def test_select_decode_blocks_threshold():
    scores = torch.tensor([[[[0.0, math.log(3.0), NEG], [NEG, NEG, NEG]]]])  # softmax [0.25, 0.75, 0]
    idx = select_decode_blocks(scores, 16, threshold=0.3)
    assert idx[0, 0, 0].tolist() == [-1, 1, -1] and idx[0, 0, 1].tolist() == [-1, -1, -1]
    masses = torch.tensor([[[[0.1, 0.3, NEG]]]])  # renormalised: [0.25, 0.75]
    assert select_decode_blocks(masses, 16, threshold=0.2, probs=True)[0, 0, 0].tolist() == [0, 1, -1]


def test_select_decode_blocks_keeps_sink_and_recent():
    # tokens at positions 70 and 40 (blocks of 16: own blocks 4 and 2); candidates are the blocks before
    rows = torch.tensor([70, 40])
    scores = torch.tensor([[[[0.0, 5.0, 4.0, 0.5, NEG, NEG], [0.0, 5.0, NEG, NEG, NEG, NEG]]]])
    plain = select_decode_blocks(scores, 16, token_budget=48)  # 2 blocks besides the own
    assert [sorted(r) for r in plain[0, 0].tolist()] == [[1, 2], [0, 1]]
    kept = select_decode_blocks(scores, 16, token_budget=48, keep_sink=True, keep_recent=1, rows=rows)
    assert [sorted(r) for r in kept[0, 0].tolist()] == [[0, 3], [0, 1]]  # inside the budget; row 2 had only these
    kept = select_decode_blocks(scores, 16, token_budget=64, keep_recent=1, rows=rows)
    assert [sorted(r) for r in kept[0, 0].tolist()] == [[1, 2, 3], [-1, 0, 1]]
    # with a threshold, on top of it (row 1's probabilities: 0.005, 0.72, 0.27, 0.008: only block 1 passes 0.3)
    kept = select_decode_blocks(scores, 16, threshold=0.3, keep_sink=True, rows=rows)
    assert kept[0, 0, 0].tolist() == [0, 1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="rows"):
        select_decode_blocks(scores, 16, keep_sink=True)


def test_decode_min_context_auto_follows_the_batch():
    # auto: max(16384, 131072 / batch), rounded up; an int is the same for every batch
    assert [decode_min_context("auto", b) for b in (1, 2, 3, 8, 32)] == [131072, 65536, 43691, 16384, 16384]
    assert decode_min_context(0, 1) == 0 and decode_min_context(4096, 8) == 4096


def test_causal_block_count():
    for m in (0, 1, 15, 16, 17, 100):
        assert _causal_blocks_before(m, 16) == sum(t // 16 + 1 for t in range(m))


@pytest.mark.parametrize("selector", ["oracle", "quest", "static"])
def test_reference_scores(selector):
    torch.manual_seed(0)
    B, Hq, Hkv, L, n, D, bs = 1, 4, 2, 70, 3, 8, 16
    q, k, v = torch.randn(B, Hq, n, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    s = token_block_scores(selector, q, k, v, 1 / math.sqrt(D), bs)
    nc = L // bs
    assert s.shape == (B, Hkv, n, nc)
    for i in range(n):
        own = (L - n + i) // bs
        assert (s[..., i, :own] > NEG).all() and torch.isneginf(s[..., i, own:]).all()
    if selector == "quest":
        # an upper bound of every key's q . k in the block, tight for the max over a 1-key "block"
        for h in range(Hq):
            for j in range(nc):
                qk = q[0, h] @ k[0, h // 2, j * bs : (j + 1) * bs].T
                own = (torch.arange(n) + L - n) // bs
                assert ((qk.amax(-1) <= s[0, h // 2, :, j] + 1e-5) | (j >= own)).all()
    if selector == "static":
        assert torch.isposinf(s[0, 0, -1, 0]) and (s[0, 0, -1, 1:3].diff() > 0).all()
    if selector == "oracle":
        future = torch.arange(L)[None, :] > (torch.arange(n) + L - n)[:, None]
        logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D)
        probs = torch.softmax(logits.masked_fill(future, NEG), -1)
        mass = probs[..., : nc * bs].reshape(B, Hq, n, nc, bs).sum(-1).view(B, Hkv, 2, n, nc).mean(2)
        valid = torch.arange(nc)[None] < ((torch.arange(n) + L - n) // bs)[:, None]
        torch.testing.assert_close(s[..., valid], mass[..., valid])
