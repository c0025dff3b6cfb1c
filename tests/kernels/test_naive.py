"""The PyTorch twins against brute force written independently (loops over tiles, full S x S)."""

import math

import pytest
import torch

from seer_attn.kernels.block_mask import apply_keep_rules, expand_block_mask, indices_to_mask, mask_to_indices
from seer_attn.kernels.naive import attn_with_pooling_naive, block_sparse_attn_naive, block_sparse_attn_topk_naive


def brute(q, k, v, token_mask=None):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    S = q.shape[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    if token_mask is not None:
        allowed = allowed & token_mask
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return p @ v, p


def brute_pool(p, bs, kind):
    S = p.shape[-1]
    nb = math.ceil(S / bs)
    out = torch.zeros(*p.shape[:2], nb, nb, dtype=p.dtype)
    for i in range(nb):
        for j in range(nb):
            tile = p[..., i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]
            out[..., i, j] = tile.amax((-1, -2)) if kind == "max" else tile.sum(-1).mean(-1)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("S", [63, 64, 65, 130, 1000])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("pooling", ["max", "mass"])
def test_attn_with_pooling_naive(S, heads, pooling):
    torch.manual_seed(42)
    Hq, Hkv = heads
    q = torch.randn(2, Hq, S, 16, dtype=torch.float64)
    k, v = torch.randn(2, Hkv, S, 16, dtype=torch.float64), torch.randn(2, Hkv, S, 16, dtype=torch.float64)
    o, pooled = attn_with_pooling_naive(q, k, v, block_size=64, pooling=pooling)
    o_ref, p = brute(q, k, v)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(pooled, brute_pool(p, 64, pooling))
    torch.testing.assert_close(pooled.sum(-1), torch.ones_like(pooled.sum(-1)))
    assert (pooled.triu(1) == 0).all()


@pytest.mark.parametrize("S", [63, 65, 200])
def test_block_sparse_attn_naive(S):
    torch.manual_seed(42)
    q = torch.randn(2, 4, S, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, S, 16, dtype=torch.float64), torch.randn(2, 2, S, 16, dtype=torch.float64)
    nb = math.ceil(S / 64)
    mask = torch.rand(2, 4, nb, nb) < 0.5
    mask[0, 0] = False  # a head with nothing kept: output 0, not NaN
    o = block_sparse_attn_naive(q, k, v, mask)
    o_ref, _ = brute(q, k, v, expand_block_mask(mask, S))
    torch.testing.assert_close(o, o_ref)
    assert (o[0, 0] == 0).all()
    # all blocks kept == dense; top-k indices == mask
    full = block_sparse_attn_naive(q, k, v, torch.ones(1, 1, nb, nb, dtype=torch.bool))
    torch.testing.assert_close(full, brute(q, k, v)[0])
    mask = apply_keep_rules(mask)
    torch.testing.assert_close(block_sparse_attn_topk_naive(q, k, v, mask_to_indices(mask)), block_sparse_attn_naive(q, k, v, mask))


def test_indices_ignore_negative_and_future():
    idx = torch.tensor([[[[0, -1, 2], [1, 1, -5], [2, 0, 1]]]])
    mask = indices_to_mask(idx, 3)
    expected = torch.tensor([[[[True, False, False], [False, True, False], [True, True, True]]]])
    assert torch.equal(mask, expected)


def test_naive_rejects_bad_shapes():
    q = torch.randn(1, 3, 64, 16)
    with pytest.raises(ValueError, match="multiple"):
        attn_with_pooling_naive(q, torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16))
    with pytest.raises(ValueError, match="pooling"):
        attn_with_pooling_naive(q, q, q, pooling="mean")
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attn_naive(q, q, q, torch.ones(1, 3, 2, 2, dtype=torch.bool))
