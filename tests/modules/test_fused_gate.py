"""The fused inference gate behind `AttnGate.forward` and the sparse branch of `seer_attention`.

On CPU the Triton kernels run under the interpreter; the automatic dispatch only fires on CUDA, so
these tests call the fused entry points directly or force the dispatch with monkeypatch.
"""

import logging
import math

import pytest
import torch

from seer_attn.kernels.block_mask import indices_to_mask
from seer_attn.modules import fused_gate
from seer_attn.modules.attn_gate import AttnGate
from seer_attn.modules.seer_attention import SeerAttentionSettings, seer_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rope_tables(B, n, d, stride=64, device=DEVICE):
    pos = torch.arange(n, device=device).float() * stride
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, device=device).float() / d)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, -1)
    return emb.cos().expand(B, n, d), emb.sin().expand(B, n, d)


def setup(S=200, Hq=4, Hkv=2, D=64, gate_type="Qavg_Kmaxminavg", dtype=torch.float16, seed=0, n_q=1):
    torch.manual_seed(seed)
    gate = AttnGate(Hq, Hkv, D, gate_type, q_summaries=n_q).to(DEVICE).eval()
    for p in gate.parameters():
        p.data.normal_(0, 0.2)
    q, k = torch.randn(1, Hq, S, D, device=DEVICE, dtype=dtype), torch.randn(1, Hkv, S, D, device=DEVICE, dtype=dtype)
    stride = gate.rope_stride
    return gate, q, k, *rope_tables(1, math.ceil(S / stride), gate.hidden_size, stride=stride)


@pytest.mark.parametrize("gate_type", ["Qavg_Kmaxminavg", "Qmaxmin_Kavg"])
def test_gate_logits(gate_type):
    gate, q, k, cos, sin = setup(gate_type=gate_type)
    for output in ("logits", "probs"):
        ref = gate.score(*gate.pool_inputs(q, k), cos, sin, output=output)
        out = fused_gate.gate_logits(gate, q, k, cos, sin, output)
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(out))
        torch.testing.assert_close(out[fin], ref[fin], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "method,keep_sink,dense_rows,n_q",
    [("nz_ratio", False, 0, 1), ("nz_ratio", True, 1, 2), ("threshold", True, 0, 1), ("top_p", False, 0, 2),
     ("adaptive", True, 0, 1), ("adaptive_floor", False, 1, 2)],  # fmt: skip
)
def test_gate_block_index(method, keep_sink, dense_rows, n_q):
    gate, q, k, cos, sin = setup(S=600, seed=3, n_q=n_q)
    floor = 0.5 if method == "adaptive_floor" else 0.0
    st = SeerAttentionSettings(sparsity_method=method.replace("_floor", ""), nz_ratio=0.4, threshold=0.08, top_p=0.8,
                               keep_sink=keep_sink, dense_last_rows=dense_rows, adaptive_row_floor=floor)  # fmt: skip
    idx = fused_gate.gate_block_index(gate, q, k, cos, sin, st)
    ref = fused_gate.gate_block_index_twin(gate, q, k, cos, sin, st)
    nb = idx.shape[-2]
    # random weights at this size have no near ties: the sets are identical
    assert torch.equal(indices_to_mask(idx.long(), nb), indices_to_mask(ref.long(), nb))
    # canonical rows (ascending from column 0, then -1) and, with return_count, the same lists
    live = idx >= 0
    assert torch.equal(live, torch.arange(idx.shape[-1]) < live.sum(-1, keepdim=True))
    assert (idx[..., 1:] > idx[..., :-1])[live[..., 1:]].all()
    idx_c, count = fused_gate.gate_block_index(gate, q, k, cos, sin, st, return_count=True)
    assert torch.equal(count, live.sum(-1).int()) and torch.equal(torch.where(live, idx_c, -1), idx)


@pytest.mark.parametrize("method,n_q", [("nz_ratio", 1), ("adaptive", 2), ("threshold", 1)])
def test_gate_block_index_shared_per_gqa_group(method, n_q):
    # seerattn_share_gqa_blocks: one list per GQA group (selected on the group's mean probability),
    # the same blocks as the twin, identical for the heads of a group
    gate, q, k, cos, sin = setup(S=600, Hq=6, Hkv=2, seed=4, n_q=n_q)
    st = SeerAttentionSettings(sparsity_method=method, nz_ratio=0.4, threshold=0.08, adaptive_row_floor=0.5,
                               share_gqa_blocks=True)
    idx, count = fused_gate.gate_block_index(gate, q, k, cos, sin, st, return_count=True)
    ref = fused_gate.gate_block_index_twin(gate, q, k, cos, sin, st)
    nb = idx.shape[-2]
    live = torch.arange(idx.shape[-1]) < count[..., None]
    mask = indices_to_mask(torch.where(live, idx, -1).long(), nb)
    assert torch.equal(mask, indices_to_mask(ref.long(), nb))
    grouped = mask.view(1, 2, 3, nb, nb)
    assert (grouped == grouped[:, :, :1]).all()
    per_head = fused_gate.gate_block_index_twin(gate, q, k, cos, sin, SeerAttentionSettings(
        sparsity_method=method, nz_ratio=0.4, threshold=0.08, adaptive_row_floor=0.5))
    assert not torch.equal(mask, indices_to_mask(per_head.long(), nb))


@pytest.mark.parametrize("n_q", [1, 4])
def test_gate_block_index_passes_the_gate_precision(n_q, monkeypatch):
    # `seerattn_gate_precision` reaches every product of the fused gate (summaries, then logits or the
    # mixture); the benchmarks' module-level override still wins
    from seer_attn.kernels import gate_kernel
    from seer_attn.models.configuration_seer import SeerAttnConfigMixin

    seen = []

    def spy(name):
        real = getattr(gate_kernel, name)

        def wrapped(*a, **kw):
            seen.append((name, kw.get("precision", a[-1] if name == "gate_summaries" else None)))
            return real(*a, **kw)

        return wrapped

    for name in ("gate_summaries", "gate_scores", "gate_mixture_scores"):
        monkeypatch.setattr(gate_kernel, name, spy(name))
    gate, q, k, cos, sin = setup(S=300, n_q=n_q)
    assert SeerAttnConfigMixin.seerattn_gate_precision == "tf32x3"
    st = SeerAttentionSettings(sparsity_method="nz_ratio", nz_ratio=0.3, gate_precision="tf32")
    fused_gate.gate_block_index(gate, q, k, cos, sin, st)
    assert [p for _, p in seen] == ["tf32"] * 3
    seen.clear()
    monkeypatch.setattr(fused_gate, "GATE_PRECISION_OVERRIDE", "ieee")
    fused_gate.gate_block_index(gate, q, k, cos, sin, st)
    assert [p for _, p in seen] == ["ieee"] * 3


def test_unsupported_designs_are_named():
    assert fused_gate.unsupported_reason(AttnGate(4, 2, 64)) is None
    assert "hidden size 48" in fused_gate.unsupported_reason(AttnGate(4, 2, 64, "Qavg_Kavg", hidden_size=48))
    assert fused_gate.unsupported_reason(AttnGate(4, 2, 64, q_summaries=4, k_summaries=2), "adaptive") is None
    assert "bogus" in fused_gate.unsupported_reason(AttnGate(4, 2, 64), "bogus")
    assert "not an AttnGate" in fused_gate.unsupported_reason(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not support"):
        gate, q, k, cos, sin = setup()
        fused_gate.gate_block_index(gate, q, k, cos, sin, SeerAttentionSettings(sparsity_method="bogus"))


def test_use_fused_logs_fallback_once(monkeypatch, caplog):
    # pretend to be on CUDA: the dispatch decision is what is tested here, nothing runs
    gate = AttnGate(4, 2, 64, "Qavg_Kavg", hidden_size=48).eval()
    fake = torch.empty(0, device="meta")
    monkeypatch.setattr(fused_gate, "_on_cuda", lambda t: True)
    with caplog.at_level(logging.WARNING, logger="seer_attn.modules.fused_gate"), torch.no_grad():
        assert not fused_gate.use_fused(gate, fake)
        assert not fused_gate.use_fused(gate, fake)
    assert sum("hidden size 48" in r.message for r in caplog.records) == 1
    with torch.no_grad():
        assert fused_gate.use_fused(AttnGate(4, 2, 64).eval(), fake)
    # autograd needed (trainable gate, grad mode): always the twin
    assert not fused_gate.use_fused(AttnGate(4, 2, 64), fake)
    fused_gate.set_fused_gate(False)
    try:
        with torch.no_grad():
            assert not fused_gate.use_fused(AttnGate(4, 2, 64).eval(), fake)
    finally:
        fused_gate.set_fused_gate(True)


@pytest.mark.parametrize("method,shared", [("nz_ratio", False), ("adaptive", False), ("adaptive", True)])
def test_seer_attention_through_fused_gate(monkeypatch, method, shared):
    # the sparse branch with the fused gate (canonical lists + counts straight into the TopK kernel)
    # gives the same output and kept count as with the twin gate
    gate, q_pre, k_pre, cos, sin = setup(S=260, dtype=torch.float32, seed=5)
    v = torch.randn_like(k_pre)
    st = SeerAttentionSettings(mode="sparse", nz_ratio=0.5, kernel="TopK", keep_sink=True, sparsity_method=method,
                               adaptive_row_floor=0.5, share_gqa_blocks=shared)  # fmt: skip
    scale = 1 / 8
    with torch.no_grad():
        ref, ref_stats = seer_attention(q_pre, k_pre, v, q_pre, k_pre, gate, cos, sin, scale, st)
        monkeypatch.setattr(fused_gate, "use_fused", lambda gate, q, method=None: True)
        calls = []
        real = fused_gate.gate_block_index
        monkeypatch.setattr(fused_gate, "gate_block_index", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        out, stats = seer_attention(q_pre, k_pre, v, q_pre, k_pre, gate, cos, sin, scale, st)
    assert calls and stats.sparse
    assert int(stats.kept) == int(ref_stats.kept)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nz_ratio", "threshold", "top_p", "adaptive"])
@pytest.mark.parametrize("n_q,n_k,shared", [(1, 1, False), (2, 2, False), (4, 2, True)])
def test_gate_block_index_gpu(method, n_q, n_k, shared):
    # bf16 inputs at a realistic size: the fused selection equals the twin's up to near ties
    torch.manual_seed(0)
    S, Hq, Hkv, D = 4000, 32, 8, 128
    gate = AttnGate(Hq, Hkv, D, q_summaries=n_q, k_summaries=n_k).to(DEVICE, torch.bfloat16).eval()
    q = torch.randn(1, S, Hq, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, S, Hkv, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = rope_tables(1, math.ceil(S / gate.rope_stride), D, stride=gate.rope_stride)
    st = SeerAttentionSettings(sparsity_method=method, nz_ratio=0.2, threshold=0.02, top_p=0.7, keep_sink=True,
                               share_gqa_blocks=shared)
    with torch.no_grad():
        nb = math.ceil(S / 64)
        m = indices_to_mask(fused_gate.gate_block_index(gate, q, k, cos, sin, st).long(), nb)
        ref = indices_to_mask(fused_gate.gate_block_index_twin(gate, q, k, cos, sin, st).long(), nb)
    assert (m != ref).sum() <= 1e-3 * ref.sum()
