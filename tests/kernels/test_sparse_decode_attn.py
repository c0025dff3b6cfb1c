"""`sparse_decode_attn` (block-sparse decoding over a KV cache) against its twin and fp64.

Error budget as elsewhere: at most 2x the error the twin makes in the kernel's dtype (`upcast=False`)
against the fp64 twin, plus a small atol. The twin itself is checked against dense attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from seer_attn.kernels.naive import sparse_decode_attn_naive
from seer_attn.kernels.sparse_decode_attn import sparse_decode_attn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def rand_case(B, Hq, Hkv, L, n, D, dtype, bs, keep, seed=42):
    """q `[B, Hq, n, D]`, k/v `[B, Hkv, L, D]` and a messy index: per token `keep` random earlier blocks in
    random order, plus -1 padding and entries at or after the own block (all to be ignored)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(DEVICE, dtype)
    nb = math.ceil(L / bs)
    idx = torch.full((B, Hkv, n, keep + 3), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for i in range(n):
                own = (L - n + i) // bs
                pick = torch.randperm(own, generator=g)[:keep]
                idx[b, h, i, : len(pick)] = pick.int()
                idx[b, h, i, -2] = own  # the own block listed again: ignored (it is always attended)
                idx[b, h, i, -1] = nb + 5  # past the cache: ignored
    perm = torch.argsort(torch.rand(idx.shape, generator=g), dim=-1)
    return q, k, v, idx.gather(-1, perm).to(DEVICE)


def check(q, k, v, idx, bs, num_splits=None):
    o = sparse_decode_attn(q, k, v, idx, block_size=bs, num_splits=num_splits)
    ref = sparse_decode_attn_naive(q.double(), k.double(), v.double(), idx, block_size=bs)
    low = sparse_decode_attn_naive(q, k, v, idx, block_size=bs, upcast=False)
    assert o.shape == q.shape and o.dtype == q.dtype and o.stride() == q.stride()
    assert not o.isnan().any()
    err = (o.double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + ATOL[q.dtype]
    assert err <= bound, f"max err {err:.3e} > bound {bound:.3e}"
    return o


def dense_decode(q, k, v):
    """Dense causal attention of the last n positions (fp64 reference)."""
    n, L, G = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    allowed = torch.arange(L)[None, :] <= (torch.arange(n) + L - n)[:, None]
    return F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1), attn_mask=allowed.to(q.device)
    )


def test_sparse_decode_attn_naive_all_blocks_is_dense():
    q, k, v, _ = rand_case(2, 6, 2, 150, 4, 16, torch.float64, 16, 0)
    nb = math.ceil(150 / 16)
    idx = torch.arange(nb).expand(2, 2, 4, nb)
    torch.testing.assert_close(sparse_decode_attn_naive(q, k, v, idx, block_size=16), dense_decode(q, k, v))


@pytest.mark.parametrize(
    "B,Hq,Hkv,L,n,D,dtype,bs,keep,num_splits",
    [
        (1, 4, 2, 63, 1, 64, torch.float16, 16, 2, 1),
        (1, 4, 2, 63, 1, 64, torch.float16, 16, 2, None),
        (2, 3, 1, 65, 1, 64, torch.float32, 16, 3, 2),
        (1, 4, 4, 200, 3, 64, torch.float16, 32, 2, 3),
        (1, 8, 2, 1000, 1, 128, torch.float16, 64, 5, 1),
        (1, 8, 2, 1000, 1, 128, torch.float16, 64, 5, 4),
        (2, 4, 2, 333, 2, 64, torch.float16, 64, 2, None),
    ],
)
def test_sparse_decode_attn(B, Hq, Hkv, L, n, D, dtype, bs, keep, num_splits):
    check(*rand_case(B, Hq, Hkv, L, n, D, dtype, bs, keep), bs, num_splits)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_sparse_decode_attn_budget_covers_context_is_dense(num_splits):
    q, k, v, _ = rand_case(1, 4, 2, 190, 2, 64, torch.float32, 32, 0)
    nb = math.ceil(190 / 32)
    idx = torch.arange(nb, device=DEVICE).flip(0).expand(1, 2, 2, nb).contiguous()
    o = check(q, k, v, idx, 32, num_splits)
    torch.testing.assert_close(o.double(), dense_decode(q, k, v), atol=2e-6, rtol=0)


def test_sparse_decode_attn_own_block_only():
    # K = 0: each token sees only its own block
    q, k, v, _ = rand_case(1, 4, 2, 100, 3, 64, torch.float32, 16, 0)
    check(q, k, v, torch.empty(1, 2, 3, 0, dtype=torch.int32, device=DEVICE), 16, 2)


def test_sparse_decode_attn_never_reads_unselected_keys():
    """Unselected blocks and a preallocated cache tail are NaN: the output must not see them."""
    bs, L, cap = 16, 90, 128
    q, k, v, idx = rand_case(1, 4, 2, L, 1, 64, torch.float16, bs, 2)
    ref = sparse_decode_attn_naive(q, k, v, idx, block_size=bs)
    kbuf = torch.full((1, 2, cap, 64), float("nan"), dtype=k.dtype, device=DEVICE)
    vbuf = kbuf.clone()
    keep = torch.zeros(1, 2, math.ceil(cap / bs), dtype=torch.bool, device=DEVICE)
    own = (L - 1) // bs
    for h in range(2):
        sel = idx[0, h, 0]
        keep[0, h, sel[(sel >= 0) & (sel < own)].long()] = True
    keep[..., own] = True
    tok = keep.repeat_interleave(bs, -1)[..., :L, None]
    kbuf[:, :, :L] = torch.where(tok, k, float("nan"))
    vbuf[:, :, :L] = torch.where(tok, v, float("nan"))
    for ns in (1, 3):
        o = sparse_decode_attn(q, kbuf[:, :, :L], vbuf[:, :, :L], idx, block_size=bs, num_splits=ns)
        assert not o.isnan().any()
        torch.testing.assert_close(o, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (128, torch.float32)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sparse_decode_attn_seqlens_reads_only_the_filled_slots(D, dtype, num_splits):
    """A preallocated cache (StaticCache): each sequence's filled length comes as a device tensor; the
    slots after it are NaN and must never be read; each sequence equals the twin on its filled part."""
    bs, cap, n = 16, 1024, 2
    lens = [63, 65, 1000]
    q, k, v, _ = rand_case(len(lens), 6, 2, cap, n, D, dtype, bs, 0)
    idx = torch.full((len(lens), 2, n, 6), -1, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    for b, L in enumerate(lens):
        for i in range(n):
            own = (L - n + i) // bs
            pick = torch.randperm(own, generator=g)[:4]
            idx[b, :, i, : len(pick)] = pick.int()
            idx[b, :, i, 5] = own + 3  # at or past the own block (past the filled part): ignored
    idx = idx.to(DEVICE)
    for b, L in enumerate(lens):
        k[b, :, L:] = float("nan")
        v[b, :, L:] = float("nan")
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    o = sparse_decode_attn(q, k, v, idx, block_size=bs, num_splits=num_splits, seqlens=seqlens)
    assert not o.isnan().any()
    ref = sparse_decode_attn_naive(q.double(), k.double(), v.double(), idx, block_size=bs, seqlens=seqlens)
    low = sparse_decode_attn_naive(q, k, v, idx, block_size=bs, upcast=False, seqlens=seqlens)
    err = (o.double() - ref).abs().max().item()
    assert err <= 2 * (low.double() - ref).abs().max().item() + ATOL[dtype]
    for b, L in enumerate(lens):  # the twin with seqlens is the twin of each sequence's filled part
        alone = sparse_decode_attn_naive(q[b : b + 1].double(), k[b : b + 1, :, :L].double(), v[b : b + 1, :, :L].double(),
                                         idx[b : b + 1], block_size=bs)  # fmt: skip
        torch.testing.assert_close(ref[b : b + 1], alone, atol=0, rtol=0)
    with pytest.raises(ValueError, match="seqlens"):
        sparse_decode_attn(q, k, v, idx, block_size=bs, seqlens=seqlens[:2])


def test_sparse_decode_attn_errors():
    q, k, v, idx = rand_case(1, 4, 2, 100, 1, 64, torch.float16, 16, 2)
    with pytest.raises(TypeError, match="integer"):
        sparse_decode_attn(q, k, v, idx.float(), block_size=16)
    with pytest.raises(ValueError, match="block_index must be"):
        sparse_decode_attn(q, k, v, idx[:, :1], block_size=16)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_decode_attn(q[..., :32], k[..., :32], v[..., :32], idx, block_size=16)
    with pytest.raises(ValueError, match="new tokens"):
        sparse_decode_attn(q.expand(1, 4, 101, 64), k, v, idx.expand(1, 2, 101, -1), block_size=16)
    with pytest.raises(ValueError, match="multiple"):
        sparse_decode_attn(q[:, :3], k, v, idx, block_size=16)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("L", [1000, 8191, 32768])
@pytest.mark.parametrize("B,n", [(1, 1), (8, 1), (2, 4)])
def test_sparse_decode_attn_gpu(B, n, L, Hq, Hkv, D):
    check(*rand_case(B, Hq, Hkv, L, n, D, torch.bfloat16, 64, 31), 64)


@pytest.mark.gpu
def test_sparse_decode_attn_gpu_many_rows():
    # B * Hkv * n = 4 * 3 * 8192 rows: past the CUDA grid's second axis (65,535), as when the decode-mode
    # layer-budget calibration scores whole 8k documents at once
    B, Hq, Hkv, L, n, D = 4, 9, 3, 8192, 8192, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, n, D, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, generator=g, device="cuda", dtype=torch.bfloat16)
    own = (torch.arange(n, device="cuda") + L - n) // 64
    idx = torch.stack([own // 2, own - 1], -1).clamp_min(-1).int().expand(B, Hkv, n, 2).contiguous()
    o = sparse_decode_attn(q, k, v, idx, block_size=64)
    ref = sparse_decode_attn_naive(q[:1, :, -64:].float(), k[:1].float(), v[:1].float(), idx[:1, :, -64:], block_size=64)
    assert not o.isnan().any()
    torch.testing.assert_close(o[:1, :, -64:].float(), ref, atol=2e-2, rtol=2e-2)
