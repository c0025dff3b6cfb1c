"""The per-layer SeerAttention core: the fast TopK dispatch selects exactly what select_blocks does,
and the Triton kernels (interpreter on CPU) agree with the twins through the whole layer path."""

import itertools
import math

import pytest
import torch

from seer_attn.kernels.block_mask import select_blocks
from seer_attn.modules.attn_gate import AttnGate
from seer_attn.modules.seer_attention import SeerAttentionSettings, _topk_index, seer_attention


@pytest.mark.parametrize("keep_sink,keep_diagonal", [(False, True), (True, True), (False, False), (True, False)])
@pytest.mark.parametrize("nz", [0.1, 0.5])
def test_topk_index_matches_select_blocks(keep_sink, keep_diagonal, nz):
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 17, 17)
    settings = SeerAttentionSettings(nz_ratio=nz, keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    from seer_attn.kernels.block_mask import indices_to_mask

    mask = indices_to_mask(_topk_index(scores, settings), 17)
    ref = select_blocks(scores, "nz_ratio", nz, keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    assert torch.equal(mask, ref)


def rope(B, nb, d):
    pos = torch.arange(nb).float() * 64
    f = pos[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))[None]
    emb = torch.cat([f, f], -1)
    return emb.cos().expand(B, nb, d), emb.sin().expand(B, nb, d)


@pytest.mark.parametrize("kernel", ["TopK", "CSR"])
@pytest.mark.parametrize("S", [65, 200])
def test_layer_path_triton_matches_naive(kernel, S):
    torch.manual_seed(0)
    B, Hq, Hkv, D = 1, 4, 2, 64
    q, k, v = (torch.randn(B, h, S, D, dtype=torch.float16) for h in (Hq, Hkv, Hkv))
    gate = AttnGate(Hq, Hkv, D)
    cos, sin = rope(B, math.ceil(S / 64), D)
    outs = {}
    for name in ("naive", kernel):
        settings = SeerAttentionSettings(nz_ratio=0.5, min_sparse_length=0, kernel=name)
        with torch.no_grad():
            outs[name], stats = seer_attention(q, k, v, q, k, gate, cos, sin, 1 / math.sqrt(D), settings)
        assert stats.sparse and 0 < stats.density <= 1
    torch.testing.assert_close(outs[kernel].float(), outs["naive"].float(), atol=2e-3, rtol=2e-3)


# ---- packed sequences: seer_attention_varlen == seer_attention on each sequence alone ----


def block_rope(starts, d):
    # RoPE tables at given block-start positions, [n, nb, d]
    f = starts.float()[..., None] * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def run_both(settings, lens, train_gate=False, seed=0, Hq=4, Hkv=2, D=64, dtype=torch.float16, summaries=(1, 1)):
    """(packed output, packed stats, per-sequence outputs, per-sequence stats)."""
    from seer_attn.modules.seer_attention import seer_attention_varlen, varlen_block_starts

    torch.manual_seed(seed)
    total = sum(lens)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    q, k, v, qp, kp = (torch.randn(total, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv, Hq, Hkv))
    gate = AttnGate(Hq, Hkv, D, q_summaries=summaries[0], k_summaries=summaries[1])
    stride = gate.rope_stride  # one RoPE entry per gate summary start
    nb = math.ceil(max(lens) / 64)
    # positions restart at every sequence, as when each runs alone
    pos = torch.cat([torch.arange(n) for n in lens])
    cos, sin = block_rope(pos[varlen_block_starts(cu, nb * (64 // stride), stride)], D)
    o, stats = seer_attention_varlen(q, k, v, qp, kp, gate, cos, sin, 1 / math.sqrt(D), settings, cu, lens,
                                     train_gate=train_gate)
    outs, singles = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = lambda t: t[a:b].transpose(0, 1).unsqueeze(0)  # noqa: E731
        c1, s1 = block_rope(torch.arange(0, b - a, stride)[None], D)
        ob, sb = seer_attention(one(q), one(k), one(v), one(qp), one(kp), gate, c1, s1, 1 / math.sqrt(D), settings,
                                train_gate=train_gate)
        outs.append(ob[0].transpose(0, 1))
        singles.append(sb)
    return o, stats, torch.cat(outs), singles


VARLEN_SETTINGS = [
    dict(nz_ratio=0.5),
    dict(nz_ratio=0.1, keep_sink=True, dense_last_rows=1),
    dict(sparsity_method="threshold", threshold=0.05),
    dict(nz_ratio=0.3, min_sparse_length=150),  # the 65- and 130-token sequences run dense
    dict(mode="distill"),
    dict(mode="dense"),
    # the default recipe: several summaries per block, adaptive selection with a row floor, top-p
    dict(nz_ratio=0.3, summaries=(4, 2)),
    dict(sparsity_method="adaptive", nz_ratio=0.3, adaptive_row_floor=0.5, summaries=(4, 2)),
    dict(sparsity_method="adaptive", nz_ratio=0.2, keep_sink=True),
    dict(sparsity_method="top_p", top_p=0.8, summaries=(2, 1)),
    dict(mode="distill", summaries=(4, 2)),
    # one block set per GQA group
    dict(nz_ratio=0.3, share_gqa_blocks=True),
    dict(sparsity_method="adaptive", nz_ratio=0.3, adaptive_row_floor=0.5, share_gqa_blocks=True, summaries=(4, 2)),
]


@pytest.mark.parametrize("kernel", ["naive", "CSR", "TopK"])
@pytest.mark.parametrize("kw", VARLEN_SETTINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_varlen_equals_one_by_one(kernel, kw):
    if kernel != "naive" and kw.get("mode") == "dense":
        pytest.skip("dense mode runs SDPA whatever the kernel")
    if kernel == "TopK" and kw.get("mode") == "distill":
        pytest.skip("distillation runs the pooling kernel, as with CSR")
    kw = dict(kw)
    summaries = kw.pop("summaries", (1, 1))
    settings = SeerAttentionSettings(**{"min_sparse_length": 0, "kernel": kernel, **kw})
    with torch.no_grad():
        o, stats, ref, singles = run_both(settings, [65, 200, 130], summaries=summaries)
    torch.testing.assert_close(o.float(), ref.float(), atol=2e-3, rtol=2e-3)
    assert int(stats.kept) == sum(int(s.kept) for s in singles)
    assert stats.causal_blocks == sum(s.causal_blocks for s in singles)
    if kw.get("mode") == "distill":
        torch.testing.assert_close(stats.gate_loss, torch.stack([s.gate_loss for s in singles]).mean())


def test_varlen_train_gate_loss_and_grads():
    # fine-tuning path: ground truth + gate loss per sequence, gradients through the CSR kernel
    settings = SeerAttentionSettings(nz_ratio=0.5, min_sparse_length=0, kernel="CSR", loss="kl")
    for summaries in ((1, 1), (4, 2)):
        o, stats, ref, singles = run_both(settings, [63, 130], train_gate=True, dtype=torch.float32, summaries=summaries)
        torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(stats.gate_loss, torch.stack([s.gate_loss for s in singles]).mean(), atol=1e-5, rtol=1e-5)
        assert stats.gate_loss.requires_grad


def test_varlen_kernel_choice_follows_one_sequence():
    # every kernel has a packed path now: `auto` and explicit choices resolve as for one sequence
    from seer_attn.modules.seer_attention import resolve_kernel, resolve_kernel_varlen

    for kernel in ("auto", "naive"):
        for grad in (False, True):
            assert resolve_kernel_varlen(kernel, torch.device("cpu"), grad) == resolve_kernel(kernel, torch.device("cpu"), grad)
    with pytest.raises(RuntimeError, match="forward-only"):
        resolve_kernel_varlen("TopK", torch.device("cpu"), needs_grad=True)


def test_kl_top_loss_is_a_coarser_kl():
    # kl_top is the KL on the partition {target's top blocks} + {the rest}: zero when the gate equals the
    # target, never above the full KL (coarsening cannot increase a KL), equal to it when the tail is empty
    from seer_attn.modules.seer_attention import gate_loss

    torch.manual_seed(0)
    nb = 12
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    t = torch.rand(2, 3, nb, nb).pow(4).masked_fill(~causal, 0.0)
    t = t / t.sum(-1, keepdim=True)
    logits = torch.randn(2, 3, nb, nb, requires_grad=True)
    full, top = gate_loss(logits, t, "kl"), gate_loss(logits, t, "kl_top")
    assert 0 < top < full
    top.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert gate_loss(t.clamp_min(1e-30).log(), t, "kl_top") == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.eye(nb)[None, None].expand(2, 3, nb, nb)  # all the mass on one block: no tail mass
    assert gate_loss(logits, one_hot, "kl_top").item() == pytest.approx(gate_loss(logits, one_hot, "kl").item(), rel=1e-5)
    with pytest.raises(ValueError, match="kl_top"):
        gate_loss(logits, t, "l1")


@pytest.mark.parametrize("selector,method", [("gate", "nz_ratio"), ("gate", "adaptive"), ("oracle_mass", "nz_ratio"),
                                             ("gate", "threshold")])
def test_share_gqa_blocks_gives_each_group_one_block_set(selector, method):
    # seerattn_share_gqa_blocks: the heads of a GQA group attend to the same blocks, those selection picks
    # from the group's mean block probability; at the same nz_ratio the density is the per-head one's
    from seer_attn.kernels.block_mask import causal_block_mask
    from seer_attn.modules.seer_attention import baseline_scores, group_block_scores

    torch.manual_seed(0)
    B, Hq, Hkv, D, S = 2, 6, 2, 64, 1280  # 20 blocks: a budget of 3 per row at nz 0.3, besides the diagonal
    G, nb = Hq // Hkv, S // 64
    q, k, v = (torch.randn(B, h, S, D) for h in (Hq, Hkv, Hkv))
    gate = AttnGate(Hq, Hkv, D)
    with torch.no_grad():
        for w in gate.parameters():
            w.normal_(0.0, 0.5)  # peaked, head-specific block probabilities: the heads of a group disagree
    cos, sin = rope(B, nb, D)
    kw = dict(selector=selector, sparsity_method=method, nz_ratio=0.3, threshold=0.05, min_sparse_length=0, kernel="naive")
    masks = {}
    for share in (False, True):
        settings = SeerAttentionSettings(share_gqa_blocks=share, **kw)
        with torch.no_grad():
            _, stats = seer_attention(q, k, v, q, k, gate, cos, sin, 1 / math.sqrt(D), settings, record=True)
        masks[share] = stats.mask
    grouped = masks[True].view(B, Hkv, G, nb, nb)
    assert (grouped == grouped[:, :, :1]).all()
    assert not (masks[False].view(B, Hkv, G, nb, nb) == masks[False].view(B, Hkv, G, nb, nb)[:, :, :1]).all()
    # the reference: select_blocks on the group mean of the per-head probabilities
    with torch.no_grad():
        if selector == "gate":
            scores = gate(q, k, cos, sin, output="probs")
        else:
            scores = baseline_scores(selector, q, k, v, 1 / math.sqrt(D), 64, "naive")
    ref = select_blocks(group_block_scores(scores, Hkv, probs=True), method=method, nz_ratio=0.3, threshold=0.05,
                        adaptive_row_floor=kw.get("adaptive_row_floor", 0.0))
    assert torch.equal(grouped[:, :, 0], ref)
    if method != "threshold":
        causal = causal_block_mask(nb, nb)
        dens = [m[..., causal].float().mean().item() for m in (masks[False], masks[True])]
        assert dens[1] == pytest.approx(dens[0], abs=0.02)


def test_group_block_scores():
    from seer_attn.modules.seer_attention import group_block_scores

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5, 5)
    p = group_block_scores(logits, 2, probs=False)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    ref = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).view(1, 2, 2, 5, 5).mean(2)
    torch.testing.assert_close(p, ref)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 5))
    assert torch.equal(group_block_scores(ref, 2, probs=True), ref)  # one head per group: unchanged
    with pytest.raises(ValueError, match="multiple"):
        group_block_scores(logits, 3, probs=False)
