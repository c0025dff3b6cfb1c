"""Selection diagnostics: recall and overlap arithmetic, and `attention_recall` on real text through the
embedded SmolLM2-135M (oracle_mass keeps all the mass at density 1 and never less than random)."""

import pytest
import torch

from seer_attn.data import boundary_token_ids
from seer_attn.evaluation.recall import attention_recall, block_overlap, block_recall

LENGTH = 512


def test_block_recall_and_overlap_by_hand():
    mass = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.25, 0.25]])[None, None]
    mask = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)[None, None]
    # rows: 1.0, 0.75, 0.5; the last block has 10 of 64 tokens
    torch.testing.assert_close(block_recall(mask, mass), torch.tensor([[2.25 / 3]]))
    torch.testing.assert_close(block_recall(mask, mass, seq_len=138), torch.tensor([[(64 + 48 + 5) / 138]]))
    ref = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)[None, None]
    torch.testing.assert_close(block_overlap(mask, ref), torch.tensor([[(1 + 0.5 + 0.5) / 3]]))
    torch.testing.assert_close(block_overlap(mask, torch.zeros_like(ref)), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="same shape"):
        block_recall(mask, mass[..., :2])


@pytest.fixture(scope="module")
def recall_rows(smollm2, eval_text):
    model, tok = smollm2
    ids = torch.tensor([boundary_token_ids(tok)[0]] + tok(eval_text, add_special_tokens=False).input_ids[: LENGTH - 1])
    model.set_seerattn(seerattn_mode="dense")
    rows = attention_recall(model, ids, methods=("oracle_mass",), budgets=(1.0,))
    rows += attention_recall(model, ids, methods=("oracle_mass", "random", "pooled"), budgets=(0.5,))
    assert model.config.seerattn_mode == "dense"  # settings restored
    return rows


def _row(rows, method, target):
    return next(r for r in rows if (r["method"], r["target"]) == (method, target))


def test_attention_recall_oracle_mass_is_one_at_density_one(recall_rows):
    r = _row(recall_rows, "oracle_mass", 1.0)
    assert r["density"] == 1.0 and len(r["layers"]) == 30 and len(r["layers"][0]["recall"]) == 9
    assert r["recall"] == pytest.approx(1.0, abs=1e-5) and r["overlap"] == 1.0


def test_attention_recall_oracle_mass_never_below_random(recall_rows):
    oracle, random, pooled = (_row(recall_rows, m, 0.5) for m in ("oracle_mass", "random", "pooled"))
    # the same k per row; random's top-k seldom holds the always-kept diagonal, so it keeps more blocks
    assert oracle["density"] <= random["density"] < oracle["density"] + 0.1
    assert oracle["overlap"] == 1.0 and random["overlap"] < 1.0
    assert 0 < random["recall"] < oracle["recall"] < 1
    for lo, lr in zip(oracle["layers"], random["layers"]):
        assert sum(lo["recall"]) >= sum(lr["recall"]) - 1e-6
    assert 0 < pooled["recall"] <= oracle["recall"]
