import logging
from types import SimpleNamespace

from seer_attn.modules import crossover
from seer_attn.modules.crossover import DEFAULT_MIN_SPARSE_LENGTH, crossover_length, resolve_min_sparse_length

TABLE = {(32, 8, 128, 4096): {0.1: 4096, 0.5: 16384}, (9, 3, 64, 576): {0.1: 16384, 0.5: 65536}}


def test_crossover_length_measured_shape_interpolates_in_density():
    assert crossover_length(32, 8, 128, 4096, 0.1, TABLE) == 4096
    assert crossover_length(32, 8, 128, 4096, 0.05, TABLE) == 4096  # clamped
    assert crossover_length(32, 8, 128, 4096, 0.9, TABLE) == 16384
    assert crossover_length(32, 8, 128, 4096, 0.3, TABLE) == 8192  # geometric midpoint


def test_crossover_length_fit_for_unmeasured_shapes():
    # log-linear in Hq * D through the two measured shapes: more attention work per token, earlier crossover
    mid = crossover_length(16, 4, 128, 2048, 0.1, TABLE)
    assert 4096 < mid < 16384 and mid % 1024 == 0
    assert crossover_length(16, 4, 128, 2048, 0.1, {(32, 8, 128, 4096): {0.1: 4096}}) is None


def test_resolve_min_sparse_length(monkeypatch, caplog):
    cfg = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=4096,
                          seerattn_nz_ratio=0.1, seerattn_min_sparse_length="auto")  # fmt: skip
    assert resolve_min_sparse_length(SimpleNamespace(seerattn_min_sparse_length=123)) == 123
    crossover._resolve.cache_clear()
    monkeypatch.setattr(crossover, "MEASURED_CROSSOVERS", {})
    with caplog.at_level(logging.WARNING, logger="seer_attn.modules.crossover"):
        assert resolve_min_sparse_length(cfg) == DEFAULT_MIN_SPARSE_LENGTH
    assert "no measured crossover" in caplog.text
    crossover._resolve.cache_clear()
    monkeypatch.setattr(crossover, "MEASURED_CROSSOVERS", TABLE)
    assert resolve_min_sparse_length(cfg) == 4096
    crossover._resolve.cache_clear()
