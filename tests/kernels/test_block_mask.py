import math

import pytest
import torch

from seer_attn.kernels.block_mask import (
    adaptive_block_mask,
    apply_keep_rules,
    causal_block_mask,
    top_p_block_mask,
    topk_budget,
    block_density,
    indices_to_mask,
    mask_to_csr,
    mask_to_indices,
    nz_ratio_to_k,
    select_blocks,
    threshold_block_mask,
    topk_block_mask,
)


@pytest.mark.parametrize("nb,nz,k", [(128, 0.5, 37), (128, 0.1, 6), (512, 0.5, 149), (512, 0.1, 26), (2048, 0.3, 334)])
def test_nz_ratio_to_k_matches_upstream_table(nb, nz, k):
    assert nz_ratio_to_k(nz, nb) == k


def test_nz_ratio_to_k_clamps_and_validates():
    assert nz_ratio_to_k(0.001, 4) == 1
    assert nz_ratio_to_k(1.0, 7) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="nz_ratio"):
            nz_ratio_to_k(bad, 8)


@pytest.mark.parametrize("nz", [0.1, 0.3, 0.5])
def test_realised_density_near_target(nz):
    torch.manual_seed(0)
    scores = torch.randn(1, 4, 128, 128)
    mask = select_blocks(scores, nz_ratio=nz, keep_diagonal=False)
    assert abs(block_density(mask) - nz) < 0.02
    assert (mask.sum(-1) <= nz_ratio_to_k(nz, 128)).all()


def test_topk_is_causal_and_keep_rules():
    scores = torch.randn(2, 3, 10, 10)
    mask = topk_block_mask(scores, 3)
    assert not mask.triu(1).any()
    assert (mask.sum(-1) == torch.clamp(torch.arange(10) + 1, max=3)).all()
    kept = apply_keep_rules(torch.zeros(1, 1, 5, 5, dtype=torch.bool), keep_sink=True, keep_diagonal=True, dense_last_rows=1)
    assert kept[0, 0, :, 0].all() and kept[0, 0].diagonal().all() and kept[0, 0, 4].all()
    assert not kept.triu(1).any()


def test_threshold():
    probs = torch.softmax(torch.randn(1, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf), -1)
    mask = threshold_block_mask(probs, 0.2)
    assert torch.equal(mask, (probs > 0.2))
    assert select_blocks(probs, method="threshold", threshold=1.0, keep_diagonal=True).sum() == 6


def test_conversions_round_trip():
    torch.manual_seed(0)
    mask = apply_keep_rules(torch.rand(2, 3, 9, 9) < 0.4)
    idx = mask_to_indices(mask)
    assert torch.equal(indices_to_mask(idx, 9), mask)
    crow, col = mask_to_csr(mask)
    assert crow.shape == (2, 3, 10) and crow.dtype == torch.int32
    for b in range(2):
        for h in range(3):
            for i in range(9):
                cols = col[b, h, crow[b, h, i] : crow[b, h, i + 1]]
                assert torch.equal(cols.long(), mask[b, h, i].nonzero().squeeze(-1))
    # CSC is the CSR of the transposed mask
    ccol, rrow = mask_to_csr(mask.transpose(-1, -2))
    assert ccol[..., -1].sum() == mask.sum()


def test_block_density_counts_causal_triangle_only():
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    assert block_density(full) == 1.0
    diag = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
    assert block_density(diag) == pytest.approx(4 / 10)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.5, 0.1, 0.4]])[None, None]
    mask = top_p_block_mask(probs, 0.8)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    assert top_p_block_mask(probs, 0.5)[0, 0, 2].tolist() == [True, False, False]


def test_adaptive_budget_and_allocation():
    torch.manual_seed(0)
    nb, H = 16, 3
    logits = torch.randn(2, H, nb, nb) * 3
    probs = logits.masked_fill(~causal_block_mask(nb), float("-inf")).softmax(-1)
    for nz in (0.1, 0.3, 0.5):
        mask = select_blocks(probs, method="adaptive", nz_ratio=nz)
        budget = H * topk_budget(nz, nb)
        assert (mask.sum((1, 2, 3)) == budget).all()  # exactly the top-k budget per batch element
        assert mask[..., torch.arange(nb), torch.arange(nb)].all()  # the diagonal, inside the budget
        assert block_density(mask) <= block_density(select_blocks(probs, method="nz_ratio", nz_ratio=nz)) + 1e-9
        # every dropped off-diagonal block has a probability no higher than any kept one
        off = ~torch.eye(nb, dtype=torch.bool) & causal_block_mask(nb)
        for b in range(2):
            kept, dropped = probs[b][mask[b] & off], probs[b][~mask[b] & off]
            assert kept.numel() == 0 or kept.min() >= dropped.max()
    # a peaked head gives its budget to a diffuse one
    peaked = torch.eye(nb)[None].expand(1, nb, nb) * 50
    flat = torch.zeros(1, nb, nb)
    p2 = torch.stack([peaked, flat], 1).masked_fill(~causal_block_mask(nb), float("-inf")).softmax(-1)
    m2 = adaptive_block_mask(p2, 0.3)
    assert m2[0, 0].sum() == nb and m2[0, 1].sum() > topk_budget(0.3, nb)


def test_adaptive_row_floor():
    torch.manual_seed(1)
    nb, H = 32, 2
    probs = (torch.randn(1, H, nb, nb) * 4).masked_fill(~causal_block_mask(nb), float("-inf")).softmax(-1)
    k = nz_ratio_to_k(0.3, nb)
    full = adaptive_block_mask(probs, 0.3, row_floor=1.0)
    half = adaptive_block_mask(probs, 0.3, row_floor=0.5)
    topk = topk_block_mask(probs, k)
    assert (full & topk).sum() == topk.sum()  # floor 1: every row keeps its own top-k
    assert (half & topk_block_mask(probs, k // 2)).sum() == topk_block_mask(probs, k // 2).sum()
    assert half.sum() == H * topk_budget(0.3, nb)


def test_mask_to_kv_blocks_round_trip_and_bound():
    # FlexAttention-style (kv_num_blocks, kv_indices): ascending kept columns first, -1 after
    torch.manual_seed(0)
    from seer_attn.kernels.block_mask import kv_blocks_to_mask, mask_to_kv_blocks

    mask = apply_keep_rules(torch.rand(2, 3, 9, 9) < 0.4)
    mask[0, 0, 4] = False  # an empty row
    num, idx = mask_to_kv_blocks(mask)
    assert num.dtype == idx.dtype == torch.int32 and idx.shape == (2, 3, 9, 9)
    assert torch.equal(num, mask.sum(-1, dtype=torch.int32))
    assert torch.equal(kv_blocks_to_mask(num, idx, 9), mask)
    live = torch.arange(9) < num[..., None]
    assert (idx[~live] == -1).all() and (idx[..., 1:] > idx[..., :-1])[live[..., 1:]].all()
    # a bound below the longest row keeps each row's lowest columns, and the count says so
    num3, idx3 = mask_to_kv_blocks(mask, max_blocks=3)
    assert idx3.shape[-1] == 3 and torch.equal(num3, num.clamp_max(3))
    assert torch.equal(idx3, torch.where(torch.arange(3) < num3[..., None], idx[..., :3], -1))
    with pytest.raises(TypeError, match="bool"):
        mask_to_kv_blocks(mask.int())
    with pytest.raises(ValueError, match="kv_num_blocks"):
        kv_blocks_to_mask(num[..., :2], idx, 9)
