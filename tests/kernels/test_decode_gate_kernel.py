"""`decode_gate_step` (the decode gate's one-token step as one kernel) against its twin, the PyTorch step
`seer_attn.modules.decode._static_gate_step` (state update, queries, scores, selection).

The partial block and the complete blocks' compressed keys must come out as the twin leaves them (fp32
state: 1e-5 relative; the kernel sums the pools' projections in another order; the partial block's slot is
only written by the step completing it), and the selected blocks must
be the twin's set (random inputs have no ties; the kernel writes them ascending, the twin in score order).
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from seer_attn.kernels.decode_gate_kernel import decode_gate_step
from seer_attn.modules.decode import _static_gate_step
from seer_attn.modules.decode_gate import DecodeGate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gate_rope(dg: int, yarn: bool) -> LlamaRotaryEmbedding:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 10000.0} if yarn \
        else {"rope_type": "default", "rope_theta": 10000.0}
    cfg = LlamaConfig(hidden_size=dg, num_attention_heads=1, head_dim=dg, max_position_embeddings=8192, rope_parameters=rope)
    return LlamaRotaryEmbedding(cfg).to(DEVICE)


def case(B, Hq, Hkv, D, dg, ks, pools, norm, positions, slots_blocks=40, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    gate = DecodeGate(Hq, Hkv, D, "K" + "".join(pools), hidden_size=dg, q_pooling="heads", use_norm=norm, k_summaries=ks)
    gate.reset_parameters(0.3)
    if norm:
        with torch.no_grad():
            gate.q_norm.weight.uniform_(0.5, 1.5)
            gate.k_norm.weight.uniform_(0.5, 1.5)
    gate = gate.to(DEVICE)
    t = torch.tensor(positions, device=DEVICE)
    keys = torch.randn(B, Hkv, slots_blocks * ks, dg, device=DEVICE)
    block = torch.randn(B, Hkv, 64, D, device=DEVICE).to(dtype)
    q_pre = torch.randn(B, Hq, 1, D, device=DEVICE).to(dtype)
    k_pre = torch.randn(B, Hkv, 1, D, device=DEVICE).to(dtype)
    return gate, t, keys, block, q_pre, k_pre


def run_both(gate, rope, t, keys, block, q_pre, k_pre, budget, threshold=None, keep=(False, 0)):
    bs, ks = gate.block_size, gate.k_summaries
    keys_ref, block_ref = keys.clone(), block.clone()
    starts = (t // bs * bs)[:, None] + torch.arange(ks, device=DEVICE) * gate.key_stride
    cos, sin = rope(torch.zeros((), device=DEVICE), torch.cat([starts, t[:, None]], 1))
    ref = _static_gate_step(gate, keys_ref, block_ref, k_pre, q_pre, t, cos, sin, bs, budget, threshold, *keep)
    norm = lambda n: None if n is None else n.weight  # noqa: E731
    idx, cnt = decode_gate_step(
        q_pre, k_pre, t, block, keys, gate.k_linear.weight.detach(), gate.q_linear.weight.detach(),
        norm(gate.q_norm), norm(gate.k_norm), rope.inv_freq, rope.attention_scaling, gate.k_pools, ks,
        token_budget=budget, threshold=threshold, keep_sink=keep[0], keep_recent=keep[1],
    )  # fmt: skip
    torch.testing.assert_close(block, block_ref, atol=0, rtol=0)
    # complete blocks' slots (the only ones a selection reads) as the twin leaves them: the kernel compresses a
    # block once, at the step that completes it, where the twin recompresses the partial block every step
    for b in range(keys.shape[0]):
        done = (int(t[b]) + 1) // bs * ks
        torch.testing.assert_close(keys[b, :, :done], keys_ref[b, :, :done], atol=1e-5, rtol=1e-5)
    return idx, cnt, ref


def same_sets(idx, cnt, ref, t, bs):
    assert idx.shape[:3] == ref.shape[:3] and idx.dtype == torch.int32
    for b in range(idx.shape[0]):
        own = int(t[b]) // bs
        for h in range(idx.shape[1]):
            row, want = idx[b, h, 0].tolist(), sorted(j for j in ref[b, h, 0].tolist() if 0 <= j < own)
            n = int(cnt[b, h])
            assert row[:n] == want and all(j == -1 for j in row[n:]), (b, h, row, want)


@pytest.mark.parametrize(
    "Hq,Hkv,D,dg,ks,pools,norm,yarn",
    [(6, 2, 64, 64, 1, ("max", "min", "avg"), True, True),  # SmolLM2's group of 3, the library default gate
     (4, 2, 64, 32, 2, ("max", "min", "avg"), False, False),
     (4, 1, 128, 64, 4, ("max", "avg"), True, False)],
)
def test_decode_gate_step_matches_twin(Hq, Hkv, D, dg, ks, pools, norm, yarn):
    # a block's first token, a middle one, its last (completing the block), fewer candidates than the budget;
    # the batch shares its position (a StaticCache fills every row alike, and the twin assumes it)
    for seed, pos in enumerate([64 * 30, 64 * 33 + 17, 64 * 35 + 63, 64 * 5 + 3]):
        gate, t, keys, block, q_pre, k_pre = case(2, Hq, Hkv, D, dg, ks, pools, norm, [pos, pos], seed=seed)
        idx, cnt, ref = run_both(gate, gate_rope(dg, yarn), t, keys, block, q_pre, k_pre, budget=640)
        assert idx.shape[-1] == 9  # 640 // 64 - 1
        same_sets(idx, cnt, ref, t, 64)
        assert cnt.flatten().tolist() == [min(9, pos // 64)] * 2 * Hkv


def test_decode_gate_step_ties_go_to_the_lowest_blocks():
    # equal compressed keys: every candidate has the same probability, the top-k search must still keep
    # exactly the budget, the lowest blocks (the twin's order among ties is torch.topk's, so not compared)
    pos = 64 * 30 + 7
    gate, t, keys, block, q_pre, k_pre = case(2, 6, 2, 64, 64, 1, ("max", "min", "avg"), True, [pos, pos])
    keys[:, :, :30] = keys[:, :, :1].clone()
    rope = gate_rope(64, True)
    idx, cnt = decode_gate_step(
        q_pre, k_pre, t, block, keys, gate.k_linear.weight.detach(), gate.q_linear.weight.detach(), gate.q_norm.weight,
        gate.k_norm.weight, rope.inv_freq, rope.attention_scaling, gate.k_pools, token_budget=640,
    )  # fmt: skip
    assert cnt.flatten().tolist() == [9] * 4
    assert (idx[..., 0, :] == torch.arange(9, device=idx.device, dtype=torch.int32)).all()


@pytest.mark.parametrize("threshold", [None, 0.02])
def test_decode_gate_step_keeps_sink_and_recent(threshold):
    # the forced blocks (sink, the 2 most recent complete ones) as the twin keeps them, inside the budget
    pos = 64 * 30 + 9
    gate, t, keys, block, q_pre, k_pre = case(2, 6, 2, 64, 64, 1, ("max", "min", "avg"), True, [pos, pos])
    idx, cnt, ref = run_both(gate, gate_rope(64, True), t, keys, block, q_pre, k_pre, budget=640, threshold=threshold,
                             keep=(True, 2))
    same_sets(idx, cnt, ref, t, 64)
    for row, n in zip(idx.reshape(-1, idx.shape[-1]).tolist(), cnt.flatten().tolist()):
        assert {0, 28, 29} <= set(row[:n])


def test_decode_gate_step_positions_per_sequence():
    # the kernel reads each sequence's own position (the twin takes one for the batch): row by row equal
    positions = [64 * 20 + 5, 64 * 9 + 63, 40]
    gate, t, keys, block, q_pre, k_pre = case(3, 6, 2, 64, 64, 1, ("max", "min", "avg"), True, positions)
    rope = gate_rope(64, True)
    norm = lambda n: None if n is None else n.weight  # noqa: E731
    args = (gate.k_linear.weight.detach(), gate.q_linear.weight.detach(), norm(gate.q_norm), norm(gate.k_norm),
            rope.inv_freq, rope.attention_scaling, gate.k_pools)
    idx, cnt = decode_gate_step(q_pre, k_pre, t, block.clone(), keys.clone(), *args, token_budget=512)
    for b in range(3):
        one = lambda x: x[b : b + 1].clone()  # noqa: E731
        i1, c1 = decode_gate_step(one(q_pre), one(k_pre), t[b : b + 1], one(block), one(keys), *args, token_budget=512)
        assert idx[b].equal(i1[0]) and cnt[b].equal(c1[0])
    assert cnt[2].tolist() == [0, 0]


def test_decode_gate_step_threshold_and_no_candidates():
    for pos in (64 * 20 + 5, 40):  # the second token has no complete block before it
        gate, t, keys, block, q_pre, k_pre = case(2, 6, 2, 64, 64, 1, ("max", "min", "avg"), True, [pos, pos])
        idx, cnt, ref = run_both(gate, gate_rope(64, True), t, keys, block, q_pre, k_pre, budget=2048, threshold=0.02)
        assert idx.shape[-1] == keys.shape[2]
        same_sets(idx, cnt, ref, t, 64)
        if pos == 40:
            assert cnt.flatten().tolist() == [0] * 4 and (idx == -1).all()
        else:
            assert 0 < int(cnt.min())  # some blocks pass the threshold


def test_decode_gate_step_half_precision_state_update():
    # fp16 caches: the block buffer in the model dtype, the compressed keys fp32
    positions = [64 * 12 + 9] * 2
    gate, t, keys, block, q_pre, k_pre = case(2, 6, 2, 64, 64, 1, ("max", "min", "avg"), True, positions, dtype=torch.float16)
    idx, cnt, ref = run_both(gate, gate_rope(64, False), t, keys, block, q_pre, k_pre, budget=256)
    same_sets(idx, cnt, ref, t, 64)


def test_decode_gate_step_state_only_and_bad_inputs():
    positions = [64 * 3 + 1]
    gate, t, keys, block, q_pre, k_pre = case(1, 6, 2, 64, 64, 1, ("max", "min", "avg"), True, positions)
    rope = gate_rope(64, False)
    args = (gate.k_linear.weight.detach(), gate.q_linear.weight.detach(), gate.q_norm.weight, gate.k_norm.weight,
            rope.inv_freq, rope.attention_scaling, gate.k_pools)
    assert decode_gate_step(q_pre, k_pre, t, block, keys, *args, select=False) is None
    assert block[0, :, 1].equal(k_pre[0, :, 0])
    with pytest.raises(ValueError, match="one token per sequence"):
        decode_gate_step(q_pre.expand(1, 6, 2, 64), k_pre, t, block, keys, *args)
    with pytest.raises(ValueError, match="fp32"):
        decode_gate_step(q_pre, k_pre, t, block, keys.half(), *args)
    with pytest.raises(ValueError, match="key pools"):
        decode_gate_step(q_pre, k_pre, t, block, keys, *args[:-1], ("max", "sum", "avg"))


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (32, 8, 128)])  # SmolLM2's and Llama-3-8B's shapes
def test_decode_gate_step_gpu_bf16(Hq, Hkv, D):
    # the model's case on the GPU: bf16 block buffer and queries, a long state (128k tokens)
    for pos in (64 * 500 + 11, 64 * 511 + 63, 64 * 2047 + 1, 64 * 7):
        gate, t, keys, block, q_pre, k_pre = case(4, Hq, Hkv, D, D, 1, ("max", "min", "avg"), True, [pos] * 4,
                                                  slots_blocks=2100, dtype=torch.bfloat16)
        idx, cnt, ref = run_both(gate, gate_rope(64, True), t, keys, block, q_pre, k_pre, budget=2048)
        same_sets(idx, cnt, ref, t, 64)
