"""The per-layer SeerAttention core: the fast TopK dispatch selects exactly what select_blocks does,
and the Triton kernels (interpreter on CPU) agree with the twins through the whole layer path."""

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
