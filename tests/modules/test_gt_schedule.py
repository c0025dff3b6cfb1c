import pytest

from seer_attn.modules.gt_schedule import gt_active


def test_gt_active_every_n_steps():
    assert [gt_active(s, 0, 4, every_n_steps=3) for s in range(7)] == [True, False, False, True, False, False, True]


def test_gt_active_layers_rotate():
    # 5 layers, 2 per ground-truth forward: every layer gets its turn, 2 layers per forward
    seen = []
    for step in range(5):
        layers = [i for i in range(5) if gt_active(step, i, 5, layers_per_step=2)]
        assert len(layers) == 2
        seen += layers
    assert sorted(set(seen)) == list(range(5))
    assert all(gt_active(0, i, 5, layers_per_step=0) for i in range(5))
    # both knobs: forwards 0, 2, 4 have ground truth, in rotating layers
    assert [i for i in range(4) if gt_active(2, i, 4, 2, 1)] == [1]
    assert not any(gt_active(3, i, 4, 2, 1) for i in range(4))


def test_gt_active_rejects_bad_values():
    with pytest.raises(ValueError, match="every_n_steps"):
        gt_active(0, 0, 2, every_n_steps=0)
