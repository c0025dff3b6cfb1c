"""`block_sparse_attn_topk` against its PyTorch twin.

The reference is the twin on fp64 inputs; the kernel's error must stay within 2x the error the twin
itself makes in the kernel's dtype (`upcast=False`), plus a small atol. CPU runs go through the
Triton interpreter on tiny shapes (fp16/fp32); the `gpu` tests cover the full grid in bf16.
"""

import math

import pytest
import torch

from seer_attn.kernels import _triton
from seer_attn.kernels.block_mask import nz_ratio_to_k
from seer_attn.kernels import block_sparse_attn_topk as topk_mod
from seer_attn.kernels.block_sparse_attn_topk import block_sparse_attn_topk
from seer_attn.kernels.naive import block_sparse_attn_topk_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def make_block_index(B, Hq, nb, density, kind="random", device=DEVICE):
    """`torch.topk`-style indices `[B, Hq, nb, K]`, plus repeats and -1 padding to stress the host prep."""
    rows = torch.arange(nb, device=device)
    if kind == "diag":
        idx = rows.view(1, 1, nb, 1).expand(B, Hq, nb, 1)
    elif kind == "all":
        idx = rows.view(1, 1, 1, nb).expand(B, Hq, nb, nb)
    else:
        scores = torch.randn(B, Hq, nb, nb, device=device)
        scores = scores.masked_fill(rows[None, :] > rows[:, None], float("-inf"))
        idx = scores.topk(nz_ratio_to_k(density, nb), dim=-1).indices
        if kind == "empty":
            # every third row keeps nothing
            idx = idx.masked_fill((rows % 3 == 1)[:, None], -1)
    pad = torch.full((B, Hq, nb, 1), -1, dtype=idx.dtype, device=device)
    return torch.cat([idx, idx.flip(-1), pad], dim=-1)


def rand_qkv(B, Hq, Hkv, S, D, dtype, transposed=False):
    if transposed:
        # the HF layout: [B, S, H, D] viewed as [B, H, S, D]
        q = torch.randn(B, S, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        return q, k, v
    return tuple(torch.randn(B, h, S, D, device=DEVICE, dtype=dtype) for h in (Hq, Hkv, Hkv))


def check(q, k, v, idx):
    out = block_sparse_attn_topk(q, k, v, idx)
    ref = block_sparse_attn_topk_naive(q.double(), k.double(), v.double(), idx)
    low = block_sparse_attn_topk_naive(q, k, v, idx, upcast=False)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "NaN in output (unwritten or 0/0)"
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + ATOL[q.dtype]
    assert err <= bound, f"max err {err:.3e} > bound {bound:.3e}"
    return out


@pytest.mark.parametrize("S", [63, 64, 65, 130])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_block_sparse_attn_topk(S, Hq, Hkv, dtype):
    torch.manual_seed(42)
    nb = math.ceil(S / 64)
    q, k, v = rand_qkv(2, Hq, Hkv, S, 64, dtype)
    for density in (0.01, 0.5, 1.0):
        check(q, k, v, make_block_index(2, Hq, nb, density))


@pytest.mark.parametrize("kind", ["diag", "all", "empty"])
def test_block_sparse_attn_topk_special_rows(kind):
    torch.manual_seed(42)
    S = 200
    q, k, v = rand_qkv(1, 4, 2, S, 64, torch.float16)
    out = check(q, k, v, make_block_index(1, 4, math.ceil(S / 64), 0.3, kind))
    if kind == "empty":
        # rows of query block 1 keep nothing: exactly 0
        assert (out[:, :, 64:128] == 0).all()


def test_block_sparse_attn_topk_strided_inputs():
    torch.manual_seed(42)
    q, k, v = rand_qkv(2, 4, 2, 130, 64, torch.float32, transposed=True)
    out = check(q, k, v, make_block_index(2, 4, 3, 0.5))
    # output keeps the input's memory layout, so the HF transpose back is free
    assert out.stride() == q.stride()


@pytest.mark.parametrize("blocks_per_step", [1, 2])
def test_block_sparse_attn_topk_repeats(blocks_per_step, monkeypatch):
    # repeats, -1 padding, above-diagonal entries and odd/even numbers of kept blocks per row
    monkeypatch.setitem(topk_mod.BLOCKS_PER_STEP, 64, blocks_per_step)
    torch.manual_seed(42)
    q, k, v = rand_qkv(1, 2, 2, 320, 64, torch.float32)
    idx = torch.tensor([[0, 0, -1, 4], [1, 0, 0, 0], [0, 1, 0, 2], [2, 2, 1, -1], [3, 1, 0, 1]])
    check(q, k, v, idx.expand(1, 2, 5, 4))


def test_block_sparse_attn_topk_head_dim_128():
    torch.manual_seed(42)
    q, k, v = rand_qkv(1, 4, 2, 130, 128, torch.float32)
    check(q, k, v, make_block_index(1, 4, 3, 0.5))


def test_block_sparse_attn_topk_errors(monkeypatch):
    q, k, v = rand_qkv(1, 4, 2, 64, 64, torch.float16)
    idx = make_block_index(1, 4, 1, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attn_topk(q[..., :32], k[..., :32], v[..., :32], idx)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attn_topk(q[:, :3], k, v, idx[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_attn_topk(q, k.float(), v, idx)
    with pytest.raises(ValueError, match="block_index"):
        block_sparse_attn_topk(q, k, v, idx[:, :2])
    with pytest.raises(TypeError, match="integer"):
        block_sparse_attn_topk(q, k, v, idx.float())
    monkeypatch.setattr(_triton, "is_interpreter", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        block_sparse_attn_topk(q.cpu(), k.cpu(), v.cpu(), idx.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (32, 8), (4, 4)])
@pytest.mark.parametrize("S", [63, 64, 65, 1000, 4096])
def test_block_sparse_attn_topk_gpu(S, Hq, Hkv, D, B):
    torch.manual_seed(42)
    nb = math.ceil(S / 64)
    q, k, v = rand_qkv(B, Hq, Hkv, S, D, torch.bfloat16, transposed=(B == 2))
    for density in (0.01, 0.1, 0.5, 1.0):
        check(q, k, v, make_block_index(B, Hq, nb, density))
    check(q, k, v, make_block_index(B, Hq, nb, 0.3, "diag"))
    check(q, k, v, make_block_index(B, Hq, nb, 0.3, "empty"))
