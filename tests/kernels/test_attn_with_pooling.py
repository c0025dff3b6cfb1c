"""`attn_with_pooling` against its PyTorch twin.

Both outputs (attention `o` and the pooled map) are compared with the twin on fp64 inputs; the
kernel's error must stay within 2x the error the twin makes in the kernel's dtype (`upcast=False`),
plus a small atol. CPU runs use the Triton interpreter on tiny shapes (fp16/fp32); the `gpu` tests
cover the full grid in bf16.
"""

import math

import pytest
import torch

from seer_attn.kernels import _triton
from seer_attn.kernels.attn_pooling_kernel import attn_with_pooling
from seer_attn.kernels.naive import attn_with_pooling_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
POOL_ATOL = 1e-6


def rand_qkv(B, Hq, Hkv, S, D, dtype, transposed=False):
    if transposed:
        q = torch.randn(B, S, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        return q, k, v
    return tuple(torch.randn(B, h, S, D, device=DEVICE, dtype=dtype) for h in (Hq, Hkv, Hkv))


def check(q, k, v, is_causal=True, pooling="max", block_size=64):
    o, pooled = attn_with_pooling(q, k, v, is_causal=is_causal, block_size=block_size, pooling=pooling)
    kw = dict(is_causal=is_causal, block_size=block_size, pooling=pooling)
    ref_o, ref_p = attn_with_pooling_naive(q.double(), k.double(), v.double(), **kw)
    low_o, low_p = attn_with_pooling_naive(q, k, v, upcast=False, **kw)
    nb = math.ceil(q.shape[2] / block_size)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert pooled.shape == (q.shape[0], q.shape[1], nb, nb) and pooled.dtype == torch.float32
    assert not o.isnan().any() and not pooled.isnan().any()
    for name, out, ref, low, atol in (("o", o, ref_o, low_o, ATOL[q.dtype]), ("pooled", pooled, ref_p, low_p, POOL_ATOL)):
        err = (out.double() - ref).abs().max().item()
        bound = 2 * (low.double() - ref).abs().max().item() + atol
        assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e}"
    if is_causal:
        assert (pooled.triu(1) == 0).all()
    torch.testing.assert_close(pooled.sum(-1), torch.ones_like(pooled[..., 0]))
    return o, pooled


@pytest.mark.parametrize("S", [63, 64, 65, 130])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("pooling", ["max", "mass"])
def test_attn_with_pooling(S, Hq, Hkv, dtype, pooling):
    torch.manual_seed(42)
    check(*rand_qkv(1 + (S % 2), Hq, Hkv, S, 64, dtype), pooling=pooling)


@pytest.mark.parametrize("pooling", ["max", "mass"])
def test_attn_with_pooling_not_causal(pooling):
    torch.manual_seed(42)
    check(*rand_qkv(1, 4, 2, 130, 64, torch.float32), is_causal=False, pooling=pooling)


def test_attn_with_pooling_block_size_and_strides():
    torch.manual_seed(42)
    q, k, v = rand_qkv(2, 4, 2, 100, 64, torch.float16, transposed=True)
    o, _ = check(q, k, v, block_size=32)
    assert o.stride() == q.stride()


def test_attn_with_pooling_first_row():
    # block-row 0 only sees its own tile: [1, 0, 0, ...]
    torch.manual_seed(42)
    _, pooled = check(*rand_qkv(1, 2, 2, 130, 64, torch.float32))
    assert (pooled[..., 0, 0] == 1).all()


def test_attn_with_pooling_errors(monkeypatch):
    q, k, v = rand_qkv(1, 4, 2, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        attn_with_pooling(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(ValueError, match="pooling"):
        attn_with_pooling(q, k, v, pooling="avg")
    with pytest.raises(ValueError, match="4-D"):
        attn_with_pooling(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="disagree"):
        attn_with_pooling(q, k[:, :, :32], v[:, :, :32])
    with pytest.raises(TypeError, match="float64"):
        attn_with_pooling(q.double(), k.double(), v.double())
    monkeypatch.setattr(_triton, "is_interpreter", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        attn_with_pooling(q.cpu(), k.cpu(), v.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (32, 8), (4, 4)])
@pytest.mark.parametrize("S", [63, 64, 65, 1000, 4096])
def test_attn_with_pooling_gpu(S, Hq, Hkv, D, B):
    torch.manual_seed(42)
    q, k, v = rand_qkv(B, Hq, Hkv, S, D, torch.bfloat16, transposed=(B == 2))
    for pooling in ("max", "mass"):
        check(q, k, v, pooling=pooling)
