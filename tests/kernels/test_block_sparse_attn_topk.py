"""`block_sparse_attn_topk` against its PyTorch twin.

The reference is the twin on fp64 inputs; the kernel's error must stay within 2x the error the twin
itself makes in the kernel's dtype (`upcast=False`), plus a small atol. CPU runs go through the
Triton interpreter on tiny shapes (fp16/fp32); the `gpu` tests cover the full grid in bf16.
"""

import math

import pytest
import torch

from seer_attn.kernels import _triton
from seer_attn.kernels.block_mask import indices_to_mask, kv_blocks_to_mask, mask_to_kv_blocks, nz_ratio_to_k
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


# every kernel variant the sweep (benchmarks/sweep_topk.py) can select
VARIANTS = {
    "row": dict(kernel="row"),
    "row_nj2": dict(kernel="row", nj=2),
    "row_tma_persistent_lpt": dict(kernel="row", tma=True, persistent=1, lpt=1),
    "row_lpt_global": dict(kernel="row", lpt=2),
    "dual": dict(kernel="dual"),
    "dual_tma_persistent_lpt": dict(kernel="dual", tma=True, persistent=1, lpt=1),
    "pair": dict(kernel="pair", num_warps=8),
    "pair_tma_persistent_lpt": dict(kernel="pair", tma=True, persistent=2, lpt=True),
    "headpair": dict(kernel="headpair", num_warps=8),
    "headpair_tma_persistent_lpt": dict(kernel="headpair", tma=True, persistent=1, lpt=True),
    "legacy": dict(kernel="legacy"),
}


def make_kv_blocks(B, Hq, nb, device=DEVICE, seed=0):
    """Variable-count lists `(count, index)` with empty, full, diagonal-only and random rows, the
    valid prefix of every row shuffled and the entries past the count filled with in-range junk."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = torch.arange(nb)
    kind = (rows[None, None, :] + torch.arange(Hq)[None, :, None] + torch.arange(B)[:, None, None]) % 4
    causal = rows[None, :] <= rows[:, None]
    mask = torch.rand(B, Hq, nb, nb, generator=g) < 0.4
    mask = torch.where((kind == 1)[..., None], True, mask)
    mask = torch.where((kind == 2)[..., None], torch.eye(nb, dtype=torch.bool), mask)
    mask = torch.where((kind == 0)[..., None], False, mask) & causal
    count, index = mask_to_kv_blocks(mask)
    live = torch.arange(nb) < count[..., None]
    perm = torch.where(live, torch.rand(index.shape, generator=g), 2.0).argsort(-1)
    index = index.gather(-1, perm)
    index = torch.where(live, index, torch.randint(0, nb, index.shape, generator=g, dtype=index.dtype))
    return count.to(device), index.to(device)


def check(q, k, v, idx, count=None, config=None):
    out = block_sparse_attn_topk(q, k, v, idx, block_count=count, config=config)
    ref = block_sparse_attn_topk_naive(q.double(), k.double(), v.double(), idx, block_count=count)
    low = block_sparse_attn_topk_naive(q, k, v, idx, upcast=False, block_count=count)
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_sparse_attn_topk_variants(variant):
    # variable counts (empty/full/diagonal-only/random rows, shuffled, junk past the count) on an
    # odd number of blocks in fp32, then top-k indices with repeats on strided fp16 inputs
    torch.manual_seed(42)
    cfg = VARIANTS[variant]
    q, k, v = rand_qkv(1, 4, 2, 130, 64, torch.float32)
    check(q, k, v, *reversed(make_kv_blocks(1, 4, 3)), config=cfg)
    q, k, v = rand_qkv(1, 4, 2, 200, 64, torch.float16, transposed=True)
    check(q, k, v, make_block_index(1, 4, 4, 0.3), config=cfg)


@pytest.mark.parametrize("variant", ["row_tma_persistent_lpt", "dual_tma_persistent_lpt", "pair_tma_persistent_lpt", "headpair"])
def test_block_sparse_attn_topk_variants_head_dim_128(variant):
    torch.manual_seed(42)
    q, k, v = rand_qkv(1, 4, 2, 63, 128, torch.float32)
    check(q, k, v, *reversed(make_kv_blocks(1, 4, 1)), config=VARIANTS[variant])
    q, k, v = rand_qkv(1, 2, 2, 130, 128, torch.float32)
    check(q, k, v, *reversed(make_kv_blocks(1, 2, 3, seed=1)), config=VARIANTS[variant] | {"kernel": "pair"})


def test_block_sparse_attn_topk_canonical_lists():
    # the plan's row lists: ascending, unique, causal, -1 padded; same blocks as the input's rules
    torch.manual_seed(0)
    nb, K = 5, 11
    idx = torch.randint(-3, nb + 3, (1, 2, nb, K), device=DEVICE)
    for count in (None, torch.randint(0, K + 1, (1, 2, nb), device=DEVICE, dtype=torch.int32)):
        num, lists = topk_mod._canonical_lists(idx, count, nb)
        want = indices_to_mask(idx, nb) if count is None else kv_blocks_to_mask(count, idx, nb)
        assert torch.equal(num, want.sum(-1, dtype=torch.int32))
        assert torch.equal(kv_blocks_to_mask(num, lists, nb), want)
        live = torch.arange(K, device=DEVICE) < num[..., None]
        assert (lists[~live] == -1).all()
        assert (lists[..., 1:] > lists[..., :-1])[live[..., 1:]].all()


@pytest.mark.parametrize("nq, nk, kmax", [(9, 9, None), (5, 70, None), (9, 9, 3), (65, 65, None)])
def test_kv_blocks_from_mask(nq, nk, kmax):
    # the one-launch kernel against its PyTorch twin, bit for bit: any mask, the causal cut, a bound
    # below the longest row, empty rows, size-1 (broadcast) batch and head dimensions, a strided view
    from seer_attn.kernels.block_sparse_attn_topk import kv_blocks_from_mask

    torch.manual_seed(nq + nk)
    mask = torch.rand(2, 3, nq, nk, device=DEVICE) < 0.4
    mask[0, 1, 2] = False
    mask[1, 2, -1] = True
    causal = torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril()
    for m in (mask, mask[:1, :1].expand(2, 3, nq, nk), mask.transpose(0, 1)):
        for is_causal in (False, True):
            num, idx = kv_blocks_from_mask(m, max_blocks=kmax, causal=is_causal)
            want = mask_to_kv_blocks(m & causal if is_causal else m, max_blocks=kmax)
            assert num.dtype == idx.dtype == torch.int32
            assert torch.equal(num, want[0]) and torch.equal(idx, want[1])
    with pytest.raises(TypeError, match="bool"):
        kv_blocks_from_mask(mask.int())
    with pytest.raises(ValueError, match="max_blocks"):
        kv_blocks_from_mask(mask, max_blocks=0)


@pytest.mark.parametrize("variant", ["row", "pair"])
def test_block_sparse_attn_topk_canonical_input(variant):
    # canonical=True (the fused gate's lists) reads the lists as they are: same output as the general
    # path, whatever lies past each row's count
    q, k, v = rand_qkv(1, 4, 2, 200, 64, torch.float16)
    nb = 4
    count, index = make_kv_blocks(1, 4, nb, seed=3)
    num, lists = topk_mod._canonical_lists(index, count, nb)
    junk = torch.where(torch.arange(nb, device=DEVICE) < num[..., None], lists, nb + 7)
    config = VARIANTS[variant]
    ref = block_sparse_attn_topk(q, k, v, index, block_count=count, config=config)
    out = block_sparse_attn_topk(q, k, v, junk, block_count=num, config=config, canonical=True)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("heads", [False, True])
def test_block_sparse_attn_topk_pair_lists(heads):
    # merged lists of row pairs (two query blocks, or two heads of one KV group), with keep flags
    torch.manual_seed(0)
    B, H, G, nb = 1, 4, 2, 5
    count, index = make_kv_blocks(B, H, nb)
    num, lists = topk_mod._canonical_lists(index, count, nb)
    u_num, u_idx, NP = topk_mod._pair_lists(num, lists, heads, G)
    mask = kv_blocks_to_mask(count, index, nb)
    if heads:
        a, b = mask.view(B, H // 2, 2, nb, nb).unbind(2)
    else:
        mask = torch.cat([mask, torch.zeros_like(mask[:, :, :1])], 2)
        a, b = mask[:, :, 0::2], mask[:, :, 1::2]
    flags = (a.int() + 2 * b.int()).reshape(len(u_num), nb)
    for i in range(len(u_num)):
        e = u_idx[i, : u_num[i]].long()
        assert (e[1:] > e[:-1]).all() and (u_idx[i, u_num[i] :] == -1).all()
        want = flags[i].nonzero().squeeze(-1)
        assert torch.equal(e >> 2, want) and torch.equal(e & 3, flags[i, want].long())


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
    count = torch.ones(1, 4, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_count"):
        block_sparse_attn_topk(q, k, v, idx, block_count=count[:, :2])
    with pytest.raises(TypeError, match="block_count"):
        block_sparse_attn_topk(q, k, v, idx, block_count=count.float())
    with pytest.raises(ValueError, match="canonical=True needs block_count"):
        block_sparse_attn_topk(q, k, v, idx, canonical=True)
    with pytest.raises(ValueError, match="even"):
        block_sparse_attn_topk(q[:, :3], k[:, :1], v[:, :1], idx[:, :3], config={"kernel": "headpair"})
    with pytest.raises(ValueError, match="unknown config"):
        block_sparse_attn_topk(q, k, v, idx, config={"kernl": "row"})
    with pytest.raises(ValueError, match="kernel must be"):
        block_sparse_attn_topk(q, k, v, idx, config={"kernel": "rows"})
    with pytest.raises(ValueError, match="lpt"):
        block_sparse_attn_topk(q, k, v, idx, config={"lpt": 3})
    with pytest.raises(ValueError, match="sm_scale"):
        block_sparse_attn_topk(q, k, v, idx, sm_scale=-0.1)
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


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(9, 3), (32, 8)])
@pytest.mark.parametrize("S", [65, 1000, 4096])
def test_block_sparse_attn_topk_variants_gpu(S, Hq, Hkv, D, variant):
    if VARIANTS[variant]["kernel"] == "headpair" and (Hq // Hkv) % 2:
        pytest.skip("headpair needs an even GQA group")
    torch.manual_seed(42)
    nb = math.ceil(S / 64)
    q, k, v = rand_qkv(1, Hq, Hkv, S, D, torch.bfloat16, transposed=(S == 1000))
    for density in (0.01, 0.1, 0.5, 1.0):
        check(q, k, v, make_block_index(1, Hq, nb, density), config=VARIANTS[variant])
    check(q, k, v, *reversed(make_kv_blocks(1, Hq, nb)), config=VARIANTS[variant])


# ---- packed sequences (cu_seqlens) ----


def packed_qkv(lens, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lens)
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(total, h, D, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))
    return q, k, v, cu


def packed_lists(lens, Hq, seed=0):
    """Variable-count lists `[n, Hq, nb, nb]` for packed sequences, with junk in the rows past each
    sequence's end and in entries past a sequence's own blocks (both must be ignored)."""
    nb = math.ceil(max(lens) / 64)
    count, index = make_kv_blocks(len(lens), Hq, nb, device="cpu", seed=seed)
    for s, n in enumerate(lens):
        nb_s = math.ceil(n / 64)
        count[s, :, nb_s:] = nb
        index[s, :, nb_s:] = torch.arange(nb, dtype=index.dtype)
    return count.to(DEVICE), index.to(DEVICE)


def check_varlen(q, k, v, cu, idx, count=None, config=None):
    from seer_attn.kernels.naive import block_sparse_attn_topk_varlen_naive

    out = block_sparse_attn_topk(q, k, v, idx, block_count=count, config=config, cu_seqlens=cu)
    ref = block_sparse_attn_topk_varlen_naive(q.double(), k.double(), v.double(), idx, cu, block_count=count)
    low = block_sparse_attn_topk_varlen_naive(q, k, v, idx, cu, upcast=False, block_count=count)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any(), "NaN in output (unwritten or 0/0)"
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + ATOL[q.dtype]
    assert err <= bound, f"max err {err:.3e} > bound {bound:.3e}"
    return out


TOPK_VARLEN_CASES = [
    # (lens, Hq, Hkv, D, dtype): odd lengths, a 1-token and an empty sequence, GQA, head_dim 128
    ([63, 130, 65], 4, 2, 64, torch.float32),
    ([200, 1, 0, 64], 2, 2, 64, torch.float16),
    ([70, 129], 2, 1, 128, torch.float32),
]


@pytest.mark.parametrize("variant", ["row", "row_nj2", "row_tma_persistent_lpt", "dual_tma_persistent_lpt", "pair",
                                     "headpair_tma_persistent_lpt"])
@pytest.mark.parametrize("lens, Hq, Hkv, D, dtype", TOPK_VARLEN_CASES, ids=[f"{c[0]}-D{c[3]}" for c in TOPK_VARLEN_CASES])
def test_block_sparse_attn_topk_varlen(lens, Hq, Hkv, D, dtype, variant):
    # one launch over packed sequences == the twin on each sequence == the padded kernel on each alone
    cfg = VARIANTS[variant]
    if cfg["kernel"] == "headpair" and (Hq // Hkv) % 2:
        pytest.skip("headpair needs an even GQA group")
    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 small cases run under the Triton interpreter only")
    q, k, v, cu = packed_qkv(lens, Hq, Hkv, D, dtype, seed=len(lens))
    count, index = packed_lists(lens, Hq, seed=sum(lens))
    out = check_varlen(q, k, v, cu, index, count, config=cfg)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if b == a:
            continue
        n = math.ceil((b - a) / 64)
        one = lambda t: t[a:b].transpose(0, 1).unsqueeze(0)  # noqa: E731
        alone = block_sparse_attn_topk(one(q), one(k), one(v), index[s : s + 1, :, :n], block_count=count[s : s + 1, :, :n],
                                       config=cfg)
        torch.testing.assert_close(out[a:b], alone[0].transpose(0, 1), rtol=0, atol=0)


def test_block_sparse_attn_topk_varlen_index_formats_and_errors():
    # torch.topk-style indices (no count, repeats, -1) and max_seqlen given; clear errors
    lens, Hq, Hkv = [65, 130], 4, 2
    q, k, v, cu = packed_qkv(lens, Hq, Hkv, 64, torch.float16, seed=7)
    idx = make_block_index(2, Hq, 3, 0.5)
    a = check_varlen(q, k, v, cu, idx)
    b = block_sparse_attn_topk(q, k, v, idx, cu_seqlens=cu, max_seqlen=130)
    assert torch.equal(a, b)
    # the plan empties the rows past each sequence's last block, so no program reads past its sequence
    nb_seq = torch.tensor([2, 3], device=DEVICE)
    plan = topk_mod.plan_topk_fwd(idx, None, 3, 2, topk_mod.resolve_config(64), nb_seq=nb_seq)
    assert (plan["num"][0, :, 2] == 0).all() and (plan["num"][:, :, :2] > 0).all()
    with pytest.raises(TypeError, match="cu_seqlens"):
        block_sparse_attn_topk(q, k, v, idx, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match=r"\[total, H, D\]"):
        block_sparse_attn_topk(q[None], k, v, idx, cu_seqlens=cu)
    with pytest.raises(ValueError, match="block_index"):
        block_sparse_attn_topk(q, k, v, idx[:, :, :2], cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        block_sparse_attn_topk(q, k, v, idx, cu_seqlens=cu.flip(0))
    with pytest.raises(ValueError, match="legacy"):
        block_sparse_attn_topk(q, k, v, idx, cu_seqlens=cu, config={"kernel": "legacy"})


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "legacy"])
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (9, 3, 64)])
def test_block_sparse_attn_topk_varlen_gpu(Hq, Hkv, D, variant):
    if VARIANTS[variant]["kernel"] == "headpair" and (Hq // Hkv) % 2:
        pytest.skip("headpair needs an even GQA group")
    lens = [1000, 4096, 63, 2049]
    q, k, v, cu = packed_qkv(lens, Hq, Hkv, D, torch.bfloat16, seed=D)
    count, index = packed_lists(lens, Hq, seed=Hq)
    check_varlen(q, k, v, cu, index, count, config=VARIANTS[variant])
    nb = math.ceil(max(lens) / 64)
    check_varlen(q, k, v, cu, make_block_index(len(lens), Hq, nb, 0.1), config=VARIANTS[variant])
