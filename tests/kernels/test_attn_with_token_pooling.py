"""`attn_with_token_pooling` (the decode gate's target) against its PyTorch twin.

The twin is checked against a brute-force definition first; the kernel then must stay within 2x the
error the twin makes in the kernel's dtype (`upcast=False`) of the fp64 twin, plus a small atol.
"""

import math

import pytest
import torch

from seer_attn.kernels.attn_token_pooling_kernel import attn_with_token_pooling
from seer_attn.kernels.naive import attn_with_token_pooling_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
POOL_ATOL = 1e-6


def rand_qkv(B, Hq, Hkv, S, D, dtype, transposed=False):
    if transposed:
        return tuple(torch.randn(B, S, h, D, device=DEVICE, dtype=dtype).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    return tuple(torch.randn(B, h, S, D, device=DEVICE, dtype=dtype) for h in (Hq, Hkv, Hkv))


@pytest.mark.parametrize("pooling", ["max", "mass"])
def test_attn_with_token_pooling_naive_definition(pooling):
    torch.manual_seed(42)
    q, k, v = rand_qkv(1, 6, 2, 45, 8, torch.float64)
    bs, G = 16, 3
    o, pooled = attn_with_token_pooling_naive(q, k, v, block_size=bs, pooling=pooling)
    nb = math.ceil(45 / bs)
    ref = torch.zeros(1, 2, 45, nb, dtype=torch.float64)
    for h in range(6):
        s = (q[0, h] @ k[0, h // G].T) / math.sqrt(8)
        p = torch.softmax(s.masked_fill(torch.ones(45, 45, dtype=torch.bool).triu(1), float("-inf")), -1)
        torch.testing.assert_close(o[0, h], p @ v[0, h // G])
        for j in range(nb):
            blk = p[:, j * bs : (j + 1) * bs]
            val = blk.amax(-1) if pooling == "max" else blk.sum(-1) / G
            ref[0, h // G, :, j] = torch.maximum(ref[0, h // G, :, j], val) if pooling == "max" else ref[0, h // G, :, j] + val
    torch.testing.assert_close(pooled, ref / ref.sum(-1, keepdim=True))
    # decoding rows (queries = the last positions of the keys) are the same rows of the full map
    o_tail, tail = attn_with_token_pooling_naive(q[:, :, -5:], k, v, block_size=bs, pooling=pooling)
    torch.testing.assert_close(tail, pooled[:, :, -5:])
    torch.testing.assert_close(o_tail, o[:, :, -5:])


def check(q, k, v, pooling="max", block_size=64):
    o, pooled = attn_with_token_pooling(q, k, v, block_size=block_size, pooling=pooling)
    kw = dict(block_size=block_size, pooling=pooling)
    ref_o, ref_p = attn_with_token_pooling_naive(q.double(), k.double(), v.double(), **kw)
    low_o, low_p = attn_with_token_pooling_naive(q, k, v, upcast=False, **kw)
    B, Hq, S, _ = q.shape
    assert o.shape == q.shape and o.dtype == q.dtype and o.stride() == q.stride()
    assert pooled.shape == (B, k.shape[1], S, math.ceil(S / block_size)) and pooled.dtype == torch.float32
    assert not o.isnan().any() and not pooled.isnan().any()
    for name, out, ref, low, atol in (("o", o, ref_o, low_o, ATOL[q.dtype]), ("pooled", pooled, ref_p, low_p, POOL_ATOL)):
        err = (out.double() - ref).abs().max().item()
        bound = 2 * (low.double() - ref).abs().max().item() + atol
        assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e}"
    own = torch.arange(S, device=q.device) // block_size
    after = torch.arange(pooled.shape[-1], device=q.device)[None, :] > own[:, None]
    assert (pooled[..., after] == 0).all()
    torch.testing.assert_close(pooled.sum(-1), torch.ones_like(pooled[..., 0]))


@pytest.mark.parametrize("S,Hq,Hkv,dtype", [(63, 4, 2, torch.float16), (65, 3, 1, torch.float32), (130, 2, 2, torch.float16)])
@pytest.mark.parametrize("pooling", ["max", "mass"])
def test_attn_with_token_pooling(S, Hq, Hkv, dtype, pooling):
    torch.manual_seed(42)
    check(*rand_qkv(1 + (S % 2), Hq, Hkv, S, 64, dtype), pooling=pooling)


def test_attn_with_token_pooling_block_size_strides_d128():
    torch.manual_seed(42)
    check(*rand_qkv(1, 4, 2, 100, 128, torch.float16, transposed=True), block_size=32)


def test_attn_with_token_pooling_errors():
    q, k, v = rand_qkv(1, 4, 2, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="pooling"):
        attn_with_token_pooling(q, k, v, pooling="avg")
    with pytest.raises(ValueError, match="head_dim"):
        attn_with_token_pooling(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(ValueError, match="more queries"):
        attn_with_token_pooling_naive(q, k[:, :, :10], v[:, :, :10])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (32, 8)])
@pytest.mark.parametrize("S", [65, 1000, 4096])
def test_attn_with_token_pooling_gpu(S, Hq, Hkv, D):
    torch.manual_seed(42)
    q, k, v = rand_qkv(1, Hq, Hkv, S, D, torch.bfloat16)
    for pooling in ("max", "mass"):
        check(q, k, v, pooling=pooling)
