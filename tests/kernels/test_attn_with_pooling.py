"""`attn_with_pooling` against its PyTorch twin.

Both outputs (attention `o` and the pooled map) are compared with the twin on fp64 inputs; the
kernel's error must stay within 2x the error the twin makes in the kernel's dtype (`upcast=False`),
plus a small atol. CPU runs use the Triton interpreter on tiny shapes (fp16/fp32); the `gpu` tests
cover the full grid in bf16.
"""

import itertools
import math

import pytest
import torch

from seer_attn.kernels import _triton
from seer_attn.kernels import attn_pooling_kernel as pool_mod
from seer_attn.kernels.attn_pooling_kernel import POOL_CONFIGS, attn_with_pooling
from seer_attn.kernels.naive import attn_with_pooling_naive, attn_with_pooling_varlen_naive

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


# ---- pooling-pass tiles (R query blocks per program, C key blocks per step) ----

# (1, 1) is the interpreter's autotune pick, run by every other test; mass on the two largest tiles
TILES = [(r, c, "max") for r, c in sorted({(c["R"], c["C"]) for c in POOL_CONFIGS}) if (r, c) != (1, 1)]
TILES += [(2, 2, "mass"), (2, 4, "mass")]


@pytest.mark.parametrize("R, C, pooling", TILES, ids=[f"R{r}C{c}-{p}" for r, c, p in TILES])
def test_attn_with_pooling_tiles(R, C, pooling, monkeypatch):
    # 5 blocks: every tile shape meets a partial row group, a partial key step and a partial block
    monkeypatch.setattr(pool_mod, "POOL_LAUNCH", {"R": R, "C": C, "num_warps": 4, "num_stages": 2})
    torch.manual_seed(R * 10 + C)
    check(*rand_qkv(1, 4, 2, 263, 64, torch.float32), pooling=pooling)
    if (R, C) == (2, 4):
        check(*rand_qkv(1, 2, 1, 100, 128, torch.float16), pooling=pooling, block_size=32)
        check(*rand_qkv(1, 2, 2, 130, 64, torch.float32), pooling=pooling, is_causal=False)


# ---- packed sequences (cu_seqlens) ----


@pytest.mark.parametrize(
    "lens, D, dtype, pooling", [([63, 130, 1, 65], 64, torch.float32, "max"), ([100, 70], 128, torch.float16, "mass")]
)
def test_attn_with_pooling_varlen(lens, D, dtype, pooling):
    torch.manual_seed(len(lens))
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lens), h, D, dtype=dtype, device=DEVICE) for h in (4, 2, 2))
    o, pooled = attn_with_pooling(q, k, v, pooling=pooling, cu_seqlens=cu)
    ref_o, ref_p = attn_with_pooling_varlen_naive(q.double(), k.double(), v.double(), cu, pooling=pooling)
    low_o, low_p = attn_with_pooling_varlen_naive(q, k, v, cu, pooling=pooling, upcast=False)
    assert o.shape == q.shape and pooled.shape == ref_p.shape
    assert not o.isnan().any() and not pooled.isnan().any()
    for name, out, ref, low, atol in (("o", o, ref_o, low_o, ATOL[dtype]), ("pooled", pooled, ref_p, low_p, POOL_ATOL)):
        err = (out.double() - ref).abs().max().item()
        bound = 2 * (low.double() - ref).abs().max().item() + atol
        assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e}"
    # each sequence alone through the batch path: same numbers, and exact zeros outside its corner
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        n = math.ceil((b - a) / 64)
        one = lambda t: t[a:b].transpose(0, 1).unsqueeze(0)  # noqa: E731
        o1, p1 = attn_with_pooling(one(q), one(k), one(v), pooling=pooling)
        torch.testing.assert_close(o[a:b], o1[0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(pooled[s, :, :n, :n], p1[0], rtol=1e-6, atol=1e-7)
        assert (pooled[s, :, n:] == 0).all() and (pooled[s, :, :, n:] == 0).all()


def test_attn_with_pooling_varlen_errors():
    q = torch.randn(10, 2, 64, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(TypeError, match="cu_seqlens"):
        attn_with_pooling(q, q, q, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        attn_with_pooling(q, q, q, cu_seqlens=torch.tensor([0, 4, 11], dtype=torch.int32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("Hq, Hkv, D", [(32, 8, 128), (9, 3, 64)])
def test_attn_with_pooling_gpu_varlen_bf16(Hq, Hkv, D):
    lens = [1000, 4096, 63, 2049]
    torch.manual_seed(D)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lens), h, D, dtype=torch.bfloat16, device=DEVICE) for h in (Hq, Hkv, Hkv))
    for pooling in ("max", "mass"):
        o, pooled = attn_with_pooling(q, k, v, pooling=pooling, cu_seqlens=cu)
        ref_o, ref_p = attn_with_pooling_varlen_naive(q.double(), k.double(), v.double(), cu, pooling=pooling)
        low_o, low_p = attn_with_pooling_varlen_naive(q, k, v, cu, pooling=pooling, upcast=False)
        for name, out, ref, low, atol in (("o", o, ref_o, low_o, ATOL[q.dtype]), ("pooled", pooled, ref_p, low_p, POOL_ATOL)):
            err = (out.double() - ref).abs().max().item()
            bound = 2 * (low.double() - ref).abs().max().item() + atol
            assert err <= bound, f"{pooling} {name}: max err {err:.3e} > bound {bound:.3e}"
