"""`block_sparse_attn_csr` against its PyTorch twin, forward and backward.

The golden is the naive twin on fp64 inputs (autograd through it). The kernel's error on every
output and gradient must stay within 2x the error of the same twin run in the kernel's own dtype
(`upcast=False`), plus the dtype's rounding of the reference: tolerances earned, not tuned.
CPU runs go through the Triton interpreter on tiny shapes (fp16/fp32); the `gpu` grid is bf16.
"""

import itertools
import math

import pytest
import torch

from seer_attn.kernels.block_sparse_attn_csr import block_sparse_attn_csr, block_sparse_csr_lists
from seer_attn.kernels.block_mask import mask_to_csr
from seer_attn.kernels.naive import block_sparse_attn_naive

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 under the interpreter; compiled fp32 dots take minutes to build, so GPUs use bf16
SMALL_DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def make_mask(B, H, nb, density, kind="random", seed=0):
    """Bool `[B, H, nb, nb]`: random causal blocks at `density`, plus the named special rows."""
    g = torch.Generator().manual_seed(seed)
    tril = torch.ones(nb, nb, dtype=torch.bool).tril()
    if kind == "all":
        mask = tril.expand(B, H, nb, nb).clone()
    elif kind == "diag":
        mask = torch.eye(nb, dtype=torch.bool).expand(B, H, nb, nb).clone()
    else:
        mask = (torch.rand(B, H, nb, nb, generator=g) < density) & tril
    if kind == "empty_row":
        # a row with nothing kept next to a diagonal-only row and a full row
        mask[:, :, nb - 1] = False
        mask[:, :, 0, 0] = True
        if nb > 2:
            mask[:, -1, 1] = False
            mask[:, -1, 1, 1] = True
            mask[:, -1, 2] = tril[2]
    return mask.to(DEVICE)


def run_attn(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


def rounding(ref, dtype):
    # what storing the reference in `dtype` costs, as flash-attention's tests measure it
    return (ref.to(dtype) + 0.3 - 0.3 - ref.to(dtype)).abs().max().item() if ref.numel() else 0.0


def assert_close_earned(name, out, ref, low):
    assert not torch.isnan(out).any(), f"{name}: NaN in kernel output"
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    base = (low.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2 * base + 2 * rounding(ref, out.dtype)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (twin in {out.dtype}: {base:.3e})"


def check_against_twin(B, HQ, HKV, S, D, dtype, mask, block_size=64, seed=0, layout="bhsd"):
    torch.manual_seed(seed)
    if layout == "bshd":
        # HF hands over [B, S, H, D].transpose(1, 2) views
        q = torch.randn(B, S, HQ, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        k = torch.randn(B, S, HKV, D, dtype=dtype, device=DEVICE).transpose(1, 2)
        v = torch.randn(B, S, HKV, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    else:
        q = torch.randn(B, HQ, S, D, dtype=dtype, device=DEVICE)
        k = torch.randn(B, HKV, S, D, dtype=dtype, device=DEVICE)
        v = torch.randn(B, HKV, S, D, dtype=dtype, device=DEVICE)
    do = torch.randn(B, HQ, S, D, dtype=dtype, device=DEVICE)

    tri = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask, block_size=block_size), q, k, v, do)
    low = run_attn(
        lambda q, k, v: block_sparse_attn_naive(q, k, v, mask, block_size=block_size, upcast=False), q, k, v, do
    )
    ref = run_attn(
        lambda q, k, v: block_sparse_attn_naive(q, k, v, mask, block_size=block_size),
        q.double(), k.double(), v.double(), do.double(),
    )
    for name in ("o", "dq", "dk", "dv"):
        assert_close_earned(name, tri[name], ref[name], low[name])
    return tri, ref


CPU_CASES = [
    # (B, Hq, Hkv, S, dtype, density, kind)
    (1, 2, 2, 64, torch.float32, 1.0, "all"),
    (2, 4, 2, 65, torch.float16, 0.5, "random"),
    (1, 4, 2, 63, torch.float32, 1.0, "diag"),
    (2, 2, 2, 130, torch.float16, 0.5, "random"),
    (1, 4, 2, 130, torch.float32, 0.1, "random"),
    (2, 4, 2, 130, torch.float16, 0.01, "random"),
    (1, 2, 2, 130, torch.float16, 0.5, "empty_row"),
    (2, 4, 2, 130, torch.float32, 1.0, "all"),
    (1, 4, 2, 64, torch.float16, 0.3, "random"),
]


@pytest.mark.parametrize(
    "B, HQ, HKV, S, dtype, density, kind",
    CPU_CASES,
    ids=[f"B{c[0]}-HQ{c[1]}-HKV{c[2]}-S{c[3]}-{str(c[4])[6:]}-d{c[5]}-{c[6]}" for c in CPU_CASES],
)
def test_csr_small(B, HQ, HKV, S, dtype, density, kind):
    if dtype == torch.float32 and DEVICE == "cuda":
        # compiled fp32 (FMA) dots take minutes to build; fp32 is a test dtype, covered by the interpreter
        pytest.skip("fp32 small cases run under the Triton interpreter only")
    nb = math.ceil(S / 64)
    mask = make_mask(B, HQ, nb, density, kind, seed=S + B)
    check_against_twin(B, HQ, HKV, S, 64, dtype, mask, seed=S)


def test_csr_empty_rows_are_zero():
    B, HQ, HKV, S, D = 1, 2, 2, 130, 64
    mask = make_mask(B, HQ, 3, 0.5, "empty_row", seed=1)
    tri, _ = check_against_twin(B, HQ, HKV, S, D, SMALL_DTYPE, mask)
    empty = ~mask.any(-1)  # [B, H, nb]
    rows = empty.repeat_interleave(64, dim=-1)[..., :S]
    assert rows.any()
    for name in ("o", "dq"):
        assert (tri[name][rows] == 0).all(), f"{name} not exactly 0 on rows that keep nothing"


def test_csr_strided_layout_and_broadcast_mask():
    # [B, S, H, D].transpose(1, 2) inputs, a mask broadcast over B and H, block_size 128
    B, HQ, HKV, S = 2, 4, 2, 130
    mask = make_mask(1, 1, 2, 1.0, "random", seed=3)
    mask[..., 1, 0] = False
    tri, _ = check_against_twin(B, HQ, HKV, S, 64, torch.float16, mask, block_size=128, layout="bshd")
    assert tri["o"].stride() == tri["o"].transpose(1, 2).contiguous().transpose(1, 2).stride()


def test_csr_lists_match_mask_to_csr():
    mask = make_mask(2, 3, 7, 0.4, "empty_row", seed=7)
    lists = block_sparse_csr_lists(mask, 2, 3)
    for (ptr, idx), m in zip(lists, (mask, mask.transpose(-1, -2))):
        ref_ptr, ref_idx = mask_to_csr(m)
        torch.testing.assert_close(ptr, ref_ptr, rtol=0, atol=0)
        n = ref_idx.shape[-1]
        torch.testing.assert_close(idx[..., :n].int(), ref_idx, rtol=0, atol=0)
        assert (idx[..., n:] == -1).all()


def test_csr_precomputed_lists_match_mask():
    B, HQ, HKV, S, D = 1, 4, 2, 130, 64
    mask = make_mask(B, HQ, 3, 0.5, seed=5)
    torch.manual_seed(0)
    q = torch.randn(B, HQ, S, D, dtype=SMALL_DTYPE, device=DEVICE)
    k, v = torch.randn(2, B, HKV, S, D, dtype=SMALL_DTYPE, device=DEVICE)
    do = torch.randn_like(q)
    a = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask), q, k, v, do)
    csr, csc = block_sparse_csr_lists(mask, B, HQ, num_kv_heads=HKV)
    # the compact int32 lists of mask_to_csr are accepted too
    for lists in ((csr, csc), (mask_to_csr(mask), csc)):
        b = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, None, csr=lists[0], csc=lists[1]), q, k, v, do)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def dense_causal_reference(q, k, v):
    # independent of the twin: plain causal softmax attention with repeated K/V
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    S = q.shape[2]
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def _check_all_kept_is_dense(B, HQ, HKV, S, D, dtype):
    torch.manual_seed(0)
    q = torch.randn(B, HQ, S, D, dtype=dtype, device=DEVICE)
    k, v = torch.randn(2, B, HKV, S, D, dtype=dtype, device=DEVICE)
    do = torch.randn_like(q)
    mask = torch.ones(1, 1, math.ceil(S / 64), math.ceil(S / 64), dtype=torch.bool, device=DEVICE)
    tri = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask), q, k, v, do)
    low = run_attn(dense_causal_reference, q, k, v, do)
    ref = run_attn(dense_causal_reference, q.double(), k.double(), v.double(), do.double())
    for name in tri:
        assert_close_earned(name, tri[name], ref[name], low[name])


def test_csr_all_kept_equals_dense_causal():
    _check_all_kept_is_dense(2, 4, 2, 130, 64, SMALL_DTYPE)


def test_csr_errors(monkeypatch):
    q = torch.randn(1, 4, 64, 64, device=DEVICE)
    k = torch.randn(1, 2, 64, 64, device=DEVICE)
    mask = torch.ones(1, 4, 1, 1, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attn_csr(q[..., :32], k[..., :32], k[..., :32], mask)
    with pytest.raises(ValueError, match="multiple"):
        block_sparse_attn_csr(q[:, :3], k, k, mask[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_attn_csr(q, k.half(), k, mask)
    with pytest.raises(TypeError, match="block_mask"):
        block_sparse_attn_csr(q, k, k, mask.float())
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attn_csr(q, k, k, mask[..., :0])
    with pytest.raises(ValueError, match="4-D"):
        block_sparse_attn_csr(q[0], k, k, mask)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        block_sparse_attn_csr(q.cpu(), k.cpu(), k.cpu(), mask.cpu())


GPU_CASES = []
for _i, (_S, (_hq, _hkv), _D) in enumerate(
    (S, h, D) for S in (63, 64, 65, 1000, 4096) for h in ((9, 3), (32, 8), (4, 4)) for D in (64, 128)
):
    _B = 2 if _S <= 1000 and _i % 2 == 0 else 1
    _density, _kind = [(0.01, "random"), (0.1, "random"), (0.5, "random"), (1.0, "all"), (0.3, "empty_row"),
                       (1.0, "diag")][_i % 6]
    GPU_CASES.append((_B, _hq, _hkv, _S, _D, _density, _kind))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, HQ, HKV, S, D, density, kind",
    GPU_CASES,
    ids=[f"B{c[0]}-HQ{c[1]}-HKV{c[2]}-S{c[3]}-D{c[4]}-d{c[5]}-{c[6]}" for c in GPU_CASES],
)
def test_csr_gpu_bf16(B, HQ, HKV, S, D, density, kind):
    nb = math.ceil(S / 64)
    mask = make_mask(B, HQ, nb, density, kind, seed=S + HQ + D)
    check_against_twin(B, HQ, HKV, S, D, torch.bfloat16, mask, seed=S + D)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_csr_gpu_layout_block_size(layout, block_size):
    S = 1000
    nb = math.ceil(S / block_size)
    mask = make_mask(2, 8, nb, 0.4, "random", seed=11)
    check_against_twin(2, 8, 2, S, 128, torch.bfloat16, mask, block_size=block_size, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_csr_gpu_all_kept_equals_dense_causal(D):
    _check_all_kept_is_dense(1, 8, 2, 1000, D, torch.bfloat16)


# ---- backward variants: dQ by atomics or a separate pass, 64- or 128-key dK/dV tiles ----

# the default (atomic, 64-key tiles) runs in every other test
BWD_VARIANTS = [("atomic", 2), ("separate", 1), ("separate", 2)]


@pytest.fixture
def bwd_variant(request, monkeypatch):
    from seer_attn.kernels import block_sparse_attn_csr as mod

    mode, key_blocks = request.param
    for D in (64, 128):
        monkeypatch.setitem(mod._CONFIGS["dq"], D, {**mod._CONFIGS["dq"][D], "MODE": mode})
        monkeypatch.setitem(mod._CONFIGS["dkdv"], D, {**mod._CONFIGS["dkdv"][D], "KEY_BLOCKS": key_blocks})
    return mode, key_blocks


VARIANT_CASES = [
    # (B, Hq, Hkv, S, D, dtype, density, kind): odd block counts leave a pair half empty
    (2, 4, 2, 200, 64, torch.float16, 0.5, "random"),
    (1, 4, 2, 150, 64, torch.float32, 0.6, "empty_row"),
    (1, 2, 1, 130, 128, torch.float32, 1.0, "all"),
]


# every variant on every case, except (separate, 2): its first case only
VARIANT_GRID = [(v, *c) for v in BWD_VARIANTS for c in VARIANT_CASES if v != ("separate", 2) or c is VARIANT_CASES[0]]


@pytest.mark.parametrize(
    "bwd_variant, B, HQ, HKV, S, D, dtype, density, kind", VARIANT_GRID, indirect=["bwd_variant"],
    ids=[f"{g[0][0]}-kb{g[0][1]}-S{g[4]}-D{g[5]}-{g[8]}" for g in VARIANT_GRID],
)
def test_csr_backward_variants(bwd_variant, B, HQ, HKV, S, D, dtype, density, kind):
    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 small cases run under the Triton interpreter only")
    nb = math.ceil(S / 64)
    mask = make_mask(B, HQ, nb, density, kind, seed=S + D)
    check_against_twin(B, HQ, HKV, S, D, dtype, mask, seed=S)


@pytest.mark.parametrize("key_blocks", [1, 2])
def test_csr_prebuilt_paired_lists(key_blocks):
    # the csc layout passed in picks the key tile, whatever the default
    B, HQ, HKV, S, D = 1, 4, 2, 200, 64
    mask = make_mask(B, HQ, 4, 0.5, seed=9)
    torch.manual_seed(0)
    q = torch.randn(B, HQ, S, D, dtype=SMALL_DTYPE, device=DEVICE)
    k, v = torch.randn(2, B, HKV, S, D, dtype=SMALL_DTYPE, device=DEVICE)
    do = torch.randn_like(q)
    a = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask), q, k, v, do)
    csr, csc = block_sparse_csr_lists(mask, B, HQ, num_kv_heads=HKV, key_blocks=key_blocks)
    assert len(csc) == 1 + key_blocks
    b = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, None, csr=csr, csc=csc), q, k, v, do)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


# ---- packed sequences (cu_seqlens) ----


def packed_inputs(lens, HQ, HKV, D, dtype, seed=0):
    torch.manual_seed(seed)
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=DEVICE)
    q = torch.randn(total, HQ, D, dtype=dtype, device=DEVICE)
    k = torch.randn(total, HKV, D, dtype=dtype, device=DEVICE)
    v = torch.randn(total, HKV, D, dtype=dtype, device=DEVICE)
    return q, k, v, torch.randn_like(q), cu


VARLEN_CASES = [
    # (lens, Hq, Hkv, D, dtype)
    ([63, 130, 65], 4, 2, 64, torch.float32),
    ([200, 1, 64], 2, 2, 64, torch.float16),
    ([70, 129], 2, 1, 128, torch.float32),
]


@pytest.mark.parametrize("lens, HQ, HKV, D, dtype", VARLEN_CASES, ids=[f"{c[0]}-D{c[3]}" for c in VARLEN_CASES])
def test_csr_varlen_matches_twin_and_per_sequence(lens, HQ, HKV, D, dtype):
    from seer_attn.kernels.naive import block_sparse_attn_varlen_naive

    if dtype == torch.float32 and DEVICE == "cuda":
        pytest.skip("fp32 small cases run under the Triton interpreter only")
    q, k, v, do, cu = packed_inputs(lens, HQ, HKV, D, dtype, seed=len(lens))
    nb = math.ceil(max(lens) / 64)
    mask = make_mask(len(lens), HQ, nb, 0.6, seed=sum(lens))
    # entries past a sequence's own blocks are ignored: fill them to prove it
    for s, n in enumerate(lens):
        mask[s, :, math.ceil(n / 64):] = True
    fn = lambda q, k, v: block_sparse_attn_csr(q, k, v, mask, cu_seqlens=cu)  # noqa: E731
    tri = run_attn(fn, q, k, v, do)
    low = run_attn(lambda q, k, v: block_sparse_attn_varlen_naive(q, k, v, mask, cu, upcast=False), q, k, v, do)
    ref = run_attn(lambda q, k, v: block_sparse_attn_varlen_naive(q, k, v, mask, cu), q.double(), k.double(),
                   v.double(), do.double())
    for name in ("o", "dq", "dk", "dv"):
        assert tri[name].shape == ref[name].shape
        assert_close_earned(name, tri[name], ref[name], low[name])
    # each sequence run alone through the batch path gives the same numbers
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        n = math.ceil((b - a) / 64)
        one = lambda t: t[a:b].transpose(0, 1).unsqueeze(0)  # noqa: E731
        alone = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask[s : s + 1, :, :n, :n]),
                         one(q), one(k), one(v), one(do))
        for name in ("o", "dq"):
            torch.testing.assert_close(tri[name][a:b], alone[name][0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        for name in ("dk", "dv"):
            torch.testing.assert_close(tri[name][a:b], alone[name][0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_csr_varlen_lists_and_errors():
    lens, HQ, HKV, D = [65, 130], 2, 1, 64
    q, k, v, do, cu = packed_inputs(lens, HQ, HKV, D, SMALL_DTYPE)
    mask = make_mask(2, HQ, 3, 0.5, seed=4)
    a = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask, cu_seqlens=cu, max_seqlen=130), q, k, v, do)
    csr, csc = block_sparse_csr_lists(mask, 2, HQ, HKV, key_blocks=2, cu_seqlens=cu, block_size=64)
    b = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, None, csr=csr, csc=csc, cu_seqlens=cu), q, k, v, do)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="cu_seqlens"):
        block_sparse_attn_csr(q, k, v, mask, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attn_csr(q, k, v, mask[..., :2, :2], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"\[total, H, D\]"):
        block_sparse_attn_csr(q[None], k, v, mask, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        block_sparse_attn_csr(q, k, v, mask, cu_seqlens=cu.flip(0))


@pytest.mark.gpu
@pytest.mark.parametrize("bwd_variant", [("atomic", 1), ("atomic", 2), ("separate", 1)], indirect=True,
                         ids=["atomic-kb1", "atomic-kb2", "separate-kb1"])
@pytest.mark.parametrize("HQ, HKV, D", [(32, 8, 128), (9, 3, 64)])
def test_csr_gpu_varlen_bf16(bwd_variant, HQ, HKV, D):
    from seer_attn.kernels.naive import block_sparse_attn_varlen_naive

    lens = [1000, 4096, 63, 2049]
    q, k, v, do, cu = packed_inputs(lens, HQ, HKV, D, torch.bfloat16, seed=D)
    mask = make_mask(len(lens), HQ, math.ceil(max(lens) / 64), 0.3, seed=HQ)
    tri = run_attn(lambda q, k, v: block_sparse_attn_csr(q, k, v, mask, cu_seqlens=cu), q, k, v, do)
    low = run_attn(lambda q, k, v: block_sparse_attn_varlen_naive(q, k, v, mask, cu, upcast=False), q, k, v, do)
    ref = run_attn(lambda q, k, v: block_sparse_attn_varlen_naive(q, k, v, mask, cu), q.double(), k.double(),
                   v.double(), do.double())
    for name in ("o", "dq", "dk", "dv"):
        assert_close_earned(name, tri[name], ref[name], low[name])


@pytest.mark.parametrize("key_blocks", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_list_kernels_match_twin(key_blocks, packed):
    # the Triton list builders against their PyTorch twin: broadcast masks, GQA groups, odd block
    # counts, rows past a packed sequence's end
    from seer_attn.kernels import block_sparse_attn_csr as mod

    B, HQ, HKV, nb = 3, 6, 2, 7
    for shape in ((B, HQ, nb, nb), (1, HQ, nb, nb), (B, 1, nb, nb)):
        mask = make_mask(*shape, 0.4, seed=sum(shape))
        cu = torch.tensor([0, 400, 401, 600], dtype=torch.int32, device=DEVICE) if packed else None
        nb_seq = mod.varlen_block_counts(cu, 64) if packed else None
        full = mod._causal_mask(mask, B, HQ, nb, nb_seq)
        ref_csr = mod._lists_from_mask(full)
        ref_csc = mod._csc_lists(full, HKV, key_blocks)
        got_csr = mod.build_csr_lists(mask, B, HQ, nb, cu, 64)
        got_csc = mod.build_csc_lists(mask, B, HQ, HKV, nb, key_blocks, cu, 64)
        for got, ref in zip((*got_csr, *got_csc), (*ref_csr, *ref_csc)):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            if got.dtype == torch.int8:  # flags: only the listed entries are defined
                n = ref_csc[0][..., -1:]
                listed = torch.arange(got.shape[-1], device=DEVICE) < n
                assert torch.equal(got[listed], ref[listed])
            else:
                assert torch.equal(got, ref)
