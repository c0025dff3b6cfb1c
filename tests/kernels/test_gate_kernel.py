"""The fused gate kernels against their twin, the PyTorch `AttnGate` and block selection.

Summaries and logits must match the twin to fp32 rounding (both compute in fp32; the kernels sum in
another order). Selected blocks must be identical except at near ties: a block chosen by one side
only must sit within the logit tolerance of the row's k-th value (top-k) or of the threshold. CPU
runs go through the Triton interpreter on tiny shapes; the `gpu` test runs the default gate at a
realistic size.
"""

import math

import pytest
import torch

from seer_attn.kernels.block_mask import indices_to_mask, nz_ratio_to_k, select_blocks, topk_budget
from seer_attn.kernels.gate_kernel import fused_gate_index, gate_mixture_scores, gate_scores, gate_select, gate_summaries
from seer_attn.modules.attn_gate import AttnGate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# logits of the kernels vs the fp32 twin (different summation order; tf32x3 dots on the GPU)
LOGIT_TOL = 2e-5


def rope_tables(B, n, d, stride=64, theta=10000.0, device=DEVICE):
    pos = torch.arange(n, device=device).float() * stride
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=device).float() / d)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, -1)
    return emb.cos().expand(B, n, d), emb.sin().expand(B, n, d)


def make_gate(Hq, Hkv, D, gate_type, hidden=None, seed=0):
    torch.manual_seed(seed)
    gate = AttnGate(Hq, Hkv, D, gate_type, hidden_size=hidden).to(DEVICE).eval()
    for p in gate.parameters():
        # larger than the init std so that logits are spread (fewer near ties at tiny sizes)
        p.data.normal_(0, 0.2)
    return gate


def fused_summaries(gate, q, k, cos, sin):
    Hq, Hkv = q.shape[1], k.shape[1]
    if gate.mask_linear_q is None:
        qg = gate_summaries(q, None, cos, sin, gate.q_pools, gate.block_size)
        kg = gate_summaries(k, gate.mask_linear_k.weight.detach(), cos, sin, gate.k_pools, gate.block_size, Hq // Hkv)
    else:
        qg = gate_summaries(q, gate.mask_linear_q.weight.detach(), cos, sin, gate.q_pools, gate.block_size)
        kg = gate_summaries(k, gate.mask_linear_k.weight.detach(), cos, sin, gate.k_pools, gate.block_size)
    return qg, kg


def assert_canonical(idx, count=None):
    """Rows as `gate_select` promises them: kept blocks ascending from column 0, each once, causal, then -1
    (with `count`: the counts match and only the entries before them are compared)."""
    nb, W = idx.shape[-2], idx.shape[-1]
    live = torch.arange(W, device=idx.device) < (count[..., None] if count is not None else (idx >= 0).sum(-1, keepdim=True))
    if count is None:
        assert torch.equal(idx >= 0, live), "-1 entries must all come after the kept blocks"
    x = torch.where(live, idx.long(), -1)
    rows = torch.arange(nb, device=idx.device)[:, None]
    assert ((x <= rows) | ~live).all() and ((x >= 0) | ~live).all()
    step = x[..., 1:] - x[..., :-1]
    assert ((step > 0) | ~live[..., 1:]).all(), "kept blocks must be strictly ascending"


def assert_same_blocks_up_to_ties(mask, ref_mask, scores, edge, tol):
    """Blocks kept by one side only must score within `tol` of the row's selection edge `[B, H, nb]`."""
    diff = mask != ref_mask
    if diff.any():
        gap = (scores - edge[..., None]).abs()[diff]
        assert gap.max() <= tol, f"{int(diff.sum())} blocks differ, not near ties (max gap {gap.max():.3g})"


def kth_causal(scores, k):
    nb = scores.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=scores.device).tril()
    s = scores.masked_fill(~causal, float("-inf"))
    rows = torch.arange(nb, device=scores.device)
    kk = torch.clamp(rows + 1, max=k)
    return s.sort(-1, descending=True).values.gather(-1, (kk - 1).view(1, 1, nb, 1).expand(*s.shape[:2], nb, 1))[..., 0]


CASES = [
    # Hq, Hkv, D, gate_type, hidden, S, dtype
    (4, 2, 64, "Qavg_Kmaxminavg", None, 63, torch.float16),
    (4, 2, 64, "Qavg_Kmaxminavg", None, 300, torch.bfloat16),
    (2, 1, 128, "Qavg_Kmaxminavg", None, 65, torch.float32),
    (4, 2, 64, "Qmaxavg_Kmin", None, 200, torch.float16),
    (3, 3, 128, "Qavg_Kmax", 64, 129, torch.float32),
    (4, 1, 64, "Qmin_Kavg", 32, 64, torch.bfloat16),
]


@pytest.mark.parametrize("Hq,Hkv,D,gate_type,hidden,S,dtype", CASES)
def test_gate_summaries_and_scores(Hq, Hkv, D, gate_type, hidden, S, dtype):
    gate = make_gate(Hq, Hkv, D, gate_type, hidden)
    B, nb = 2, math.ceil(S / 64)
    # q in the HF layout ([B, S, H, D] viewed as [B, H, S, D]), k contiguous
    q = torch.randn(B, S, Hq, D, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    cos, sin = rope_tables(B, nb, gate.hidden_size)
    ref = gate.score(*gate.pool_inputs(q, k), cos, sin, output="logits")
    s = gate_scores(*fused_summaries(gate, q, k, cos, sin), fill_upper=True)
    assert s.shape == ref.shape and s.dtype == torch.float32
    assert torch.equal(torch.isinf(s), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(s[fin], ref[fin], atol=LOGIT_TOL, rtol=LOGIT_TOL)


def test_gate_scores_leaves_upper_tiles_alone():
    # without fill_upper, only tiles touching the lower triangle are written (the rest stays poisoned)
    qg, kg = torch.randn(1, 2, 130, 32, device=DEVICE), torch.randn(1, 1, 130, 32, device=DEVICE)
    s = gate_scores(qg, kg)
    ref = (qg @ kg.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(32)
    tri = torch.ones(130, 130, dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(s[..., tri], ref[..., tri], atol=LOGIT_TOL, rtol=LOGIT_TOL)
    assert torch.isnan(s[..., :64, 64:]).all()


@pytest.mark.parametrize(
    "nb,method,nz,keep_sink,keep_diag,dense_rows",
    [(33, "nz_ratio", 0.5, False, True, 0), (33, "nz_ratio", 0.1, True, True, 0), (33, "nz_ratio", 0.3, True, False, 2),
     (1, "nz_ratio", 0.5, True, True, 0), (20, "nz_ratio", 1.0, False, False, 0), (33, "threshold", None, False, True, 0),
     (1, "threshold", None, True, False, 1)],
)  # fmt: skip
def test_gate_select(nb, method, nz, keep_sink, keep_diag, dense_rows):
    torch.manual_seed(nb)
    scores = torch.randn(1, 2, nb, nb, device=DEVICE) * 3
    # exact ties: the top-k must still keep exactly k blocks (the lowest indices among the tied)
    scores[:, 0, :, ::3] = 1.0
    k = nz_ratio_to_k(nz, nb) if nz else 1
    idx = gate_select(scores, method, k, 0.05, keep_sink, keep_diag, dense_rows)
    assert idx.dtype == torch.int32 and idx.shape[:3] == (1, 2, nb)
    # canonical rows: what block_sparse_attn_topk(canonical=True) reads
    assert_canonical(idx)
    idx_c, count = gate_select(scores, method, k, 0.05, keep_sink, keep_diag, dense_rows, return_count=True)
    assert_canonical(idx_c, count)
    assert torch.equal(count, (idx >= 0).sum(-1).int())
    assert torch.equal(torch.where(idx >= 0, idx_c, -1), idx)
    mask = indices_to_mask(idx.long(), nb)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    ref = select_blocks(
        probs if method == "threshold" else scores, method, nz or 1.0, 0.05, keep_sink, keep_diag, dense_rows
    )
    if method == "threshold":
        assert_same_blocks_up_to_ties(mask, ref, probs, torch.full_like(probs[..., 0], 0.05), 1e-6)
    else:
        assert_same_blocks_up_to_ties(mask, ref, scores, kth_causal(scores, k), 0.0)
        # exactly min(i + 1, k) top-k blocks per row, before the keep rules
        bare = indices_to_mask(gate_select(scores, method, k, keep_diagonal=False).long(), nb).sum(-1)
        assert torch.equal(bare, torch.clamp(torch.arange(nb, device=DEVICE) + 1, max=k).expand_as(bare))


@pytest.mark.parametrize("nb,method,param,keep_sink,keep_diag,dense_rows",
                         [(33, "top_p", 0.9, False, True, 0), (33, "top_p", 0.5, True, False, 2),
                          (1, "top_p", 1.0, False, True, 0), (33, "adaptive", 0.3, False, True, 0),
                          (33, "adaptive", 0.1, True, True, 1), (1, "adaptive", 0.5, False, False, 0),
                          (20, "adaptive", 1.0, True, False, 0)])  # fmt: skip
def test_gate_select_top_p_and_adaptive(nb, method, param, keep_sink, keep_diag, dense_rows):
    torch.manual_seed(nb + 1)
    B, H = 2, 3
    scores = torch.randn(B, H, nb, nb, device=DEVICE) * 2
    causal = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    idx = gate_select(scores, method, keep_sink=keep_sink, keep_diagonal=keep_diag, dense_last_rows=dense_rows,
                      top_p=param, budget=H * topk_budget(param, nb))  # fmt: skip
    assert_canonical(idx)
    idx_c, count = gate_select(scores, method, keep_sink=keep_sink, keep_diagonal=keep_diag, dense_last_rows=dense_rows,
                               top_p=param, budget=H * topk_budget(param, nb), return_count=True)  # fmt: skip
    assert_canonical(idx_c, count)
    assert torch.equal(torch.where(idx >= 0, idx_c, -1), idx)
    ref = select_blocks(probs, method, nz_ratio=param, keep_sink=keep_sink, keep_diagonal=keep_diag,
                        dense_last_rows=dense_rows, top_p=param)  # fmt: skip
    # random scores, identical probabilities up to rounding: the same blocks
    assert torch.equal(indices_to_mask(idx.long(), nb), ref)


@pytest.mark.parametrize("floor", [0.5, 1.0])
def test_gate_select_adaptive_row_floor(floor):
    torch.manual_seed(7)
    B, H, nb, nz = 2, 2, 24, 0.3
    scores = torch.randn(B, H, nb, nb, device=DEVICE) * 2
    causal = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    floor_k = int(floor * nz_ratio_to_k(nz, nb))
    idx = gate_select(scores, "adaptive", keep_sink=True, budget=H * topk_budget(nz, nb), row_floor_k=floor_k)
    ref = select_blocks(probs, "adaptive", nz_ratio=nz, keep_sink=True, adaptive_row_floor=floor)
    assert torch.equal(indices_to_mask(idx.long(), nb), ref)


@pytest.mark.parametrize("bits", [10, 8, 7, 6, 4])
def test_gate_select_adaptive_digit_width(bits, monkeypatch):
    # the radix digit width only trades histogram cost against passes: the kept set never changes
    # (8 and 7 bits make the first pass's shift reach past the int32 width; 4 bits take 8 passes)
    from seer_attn.kernels import gate_kernel

    torch.manual_seed(bits)
    B, H, nb, nz = 2, 2, 24, 0.3
    scores = torch.randn(B, H, nb, nb, device=DEVICE) * 3
    causal = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    monkeypatch.setattr(gate_kernel, "ADAPTIVE_BITS", bits)
    floor_k = int(0.5 * nz_ratio_to_k(nz, nb))
    idx = gate_select(scores, "adaptive", keep_sink=True, budget=H * topk_budget(nz, nb), row_floor_k=floor_k)
    ref = select_blocks(probs, "adaptive", nz_ratio=nz, keep_sink=True, adaptive_row_floor=0.5)
    assert torch.equal(indices_to_mask(idx.long(), nb), ref)


def test_gate_select_adaptive_rejects_bad_digit_width(monkeypatch):
    from seer_attn.kernels import gate_kernel

    monkeypatch.setattr(gate_kernel, "ADAPTIVE_BITS", 11)
    with pytest.raises(ValueError, match="ADAPTIVE_BITS"):
        gate_select(torch.zeros(1, 1, 4, 4, device=DEVICE), "adaptive", budget=2)


def test_gate_select_adaptive_ties_keep_the_exact_budget():
    # every row uniform: the threshold sits on a huge tie; exactly `budget` blocks must be kept
    nb, H = 20, 2
    scores = torch.zeros(2, H, nb, nb, device=DEVICE)
    scores[1, :, :, 3] = 1.0
    budget = H * topk_budget(0.3, nb)
    idx = gate_select(scores, "adaptive", budget=budget)
    kept = indices_to_mask(idx.long(), nb).sum((1, 2, 3))
    assert kept.tolist() == [budget, budget]


@pytest.mark.parametrize(
    "n_q,n_k,S,gate_type", [(2, 1, 300, "Qavg_Kmaxminavg"), (4, 2, 263, "Qmaxavg_Kmin"), (1, 8, 130, "Qavg_Kavg")]
)
def test_gate_mixture_scores(n_q, n_k, S, gate_type):
    from seer_attn.modules import fused_gate

    torch.manual_seed(0)
    gate = AttnGate(4, 2, 64, gate_type, q_summaries=n_q, k_summaries=n_k).to(DEVICE).eval()
    for p in gate.parameters():
        p.data.normal_(0, 0.2)
    q = torch.randn(1, 4, S, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, 2, S, 64, device=DEVICE, dtype=torch.float16)
    cos, sin = rope_tables(1, math.ceil(S / gate.rope_stride), 64, stride=gate.rope_stride)
    ref = gate.score(*gate.pool_inputs(q, k), cos, sin, output="logits")
    nb = math.ceil(S / 64)
    out = gate_mixture_scores(*fused_gate.gate_summaries_fused(gate, q, k, cos, sin), n_q, n_k, nb, fill_upper=True)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    torch.testing.assert_close(out[fin], ref[fin], atol=LOGIT_TOL, rtol=LOGIT_TOL)


@pytest.mark.parametrize("tile", [(128, 64, 8, 2), (64, 128, 4, 3)])
def test_gate_mixture_scores_every_tile_agrees(tile):
    # the wide tiles the GPU uses (gate_kernel.MIXTURE_TILE) compute what the small one does
    torch.manual_seed(0)
    nb = 16
    qg = torch.randn(1, 4, 4 * nb, 64, device=DEVICE)
    kg = torch.randn(1, 2, 2 * nb, 64, device=DEVICE)
    small = gate_mixture_scores(qg, kg, 4, 2, nb, fill_upper=True, tile=(32, 64, 4, 2))
    wide = gate_mixture_scores(qg, kg, 4, 2, nb, fill_upper=True, tile=tile)
    fin = torch.isfinite(small)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=DEVICE).tril()
    assert torch.equal(fin, torch.isfinite(wide)) and torch.equal(fin[0, 0], causal)
    torch.testing.assert_close(wide[fin], small[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (4, 2)])
def test_gate_scores_in_bf16_round_the_summaries(n_q, n_k):
    # precision "bf16": the products of summaries rounded to bf16, accumulated in fp32; on the rounded
    # summaries that is exact, so fp32 ("ieee") scoring of the rounded summaries is its reference
    torch.manual_seed(0)
    nb = 9
    qg = torch.randn(1, 4, n_q * nb - (n_q > 1), 64, device=DEVICE)
    kg = torch.randn(1, 2, n_k * nb, 64, device=DEVICE)

    def run(a, b, precision):
        if n_q == n_k == 1:
            return gate_scores(a, b, fill_upper=True, precision=precision)
        return gate_mixture_scores(a, b, n_q, n_k, nb, fill_upper=True, precision=precision)

    def to_bf16(x):  # the GPU rounds to nearest even; the interpreter's cast truncates
        if DEVICE == "cuda":
            return x.bfloat16().float()
        return (x.view(torch.int32) & -65536).view(torch.float32)

    out = run(qg, kg, "bf16")
    ref = run(to_bf16(qg), to_bf16(kg), "ieee")
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[fin], run(qg, kg, "ieee")[fin], atol=1e-5, rtol=1e-5)  # it did round
    with pytest.raises(ValueError, match="precision"):
        run(qg, kg, "fp8")


def test_gate_select_input_errors():
    with pytest.raises(ValueError, match="fp32"):
        gate_select(torch.randn(1, 1, 4, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="method"):
        gate_select(torch.randn(1, 1, 4, 4, device=DEVICE), "top_k")
    with pytest.raises(ValueError, match="fp32"):
        gate_select(torch.randn(1, 1, 4, 5, device=DEVICE))


def test_gate_summaries_input_errors():
    q = torch.randn(1, 2, 70, 64, device=DEVICE)
    cos, sin = rope_tables(1, 2, 64)
    with pytest.raises(ValueError, match="cos/sin"):
        gate_summaries(q, None, cos[:, :1], sin[:, :1], ("avg",))
    with pytest.raises(ValueError, match="weight must be"):
        gate_summaries(q, torch.randn(2, 64, 64, device=DEVICE), cos, sin, ("max", "avg"))
    with pytest.raises(ValueError, match="single pool"):
        gate_summaries(q, None, cos, sin, ("max", "avg"))
    with pytest.raises(ValueError, match="ordered subset"):
        gate_summaries(q, None, cos, sin, ("avg", "max"))


@pytest.mark.parametrize("Hq,Hkv,D,gate_type,hidden,S,dtype", [CASES[1], CASES[3]])
@pytest.mark.parametrize("nz", [0.5, 0.2])
def test_fused_gate_index(Hq, Hkv, D, gate_type, hidden, S, dtype, nz):
    gate = make_gate(Hq, Hkv, D, gate_type, hidden, seed=1)
    B, nb = 1, math.ceil(S / 64)
    q = torch.randn(B, Hq, S, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    cos, sin = rope_tables(B, nb, gate.hidden_size)
    w_q = gate.mask_linear_q.weight.detach() if gate.mask_linear_q is not None else None
    kk = nz_ratio_to_k(nz, nb)
    idx = fused_gate_index(q, k, w_q, gate.mask_linear_k.weight.detach(), cos, sin, gate.q_pools, gate.k_pools,
                           k_blocks=kk, keep_sink=True)  # fmt: skip
    logits = gate.score(*gate.pool_inputs(q, k), cos, sin, output="logits")
    ref = select_blocks(logits, "nz_ratio", nz, keep_sink=True)
    assert_same_blocks_up_to_ties(indices_to_mask(idx.long(), nb), ref, logits, kth_causal(logits, kk), LOGIT_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("S", [8192, 8191])
def test_fused_gate_index_gpu(Hq, Hkv, D, S):
    gate = make_gate(Hq, Hkv, D, "Qavg_Kmaxminavg").to(torch.bfloat16)
    nb = math.ceil(S / 64)
    q = torch.randn(1, S, Hq, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, S, Hkv, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = rope_tables(1, nb, D)
    kk = nz_ratio_to_k(0.1, nb)
    idx = fused_gate_index(q, k, None, gate.mask_linear_k.weight.detach(), cos, sin, gate.q_pools, gate.k_pools, k_blocks=kk)
    logits = gate.score(*gate.pool_inputs(q, k), cos, sin, output="logits")
    ref = select_blocks(logits, "nz_ratio", 0.1)
    scale = logits[torch.isfinite(logits)].abs().max()
    assert_same_blocks_up_to_ties(indices_to_mask(idx.long(), nb), ref, logits, kth_causal(logits, kk), 1e-5 * scale)
