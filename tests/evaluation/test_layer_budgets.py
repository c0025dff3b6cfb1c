import json
import math

import pytest
import torch

from seer_attn.evaluation.layer_budgets import main
from seer_attn.evaluation.ppl import sweep_points
from seer_attn.modules.layer_budget import allocate_layer_densities, concave_envelope, layer_nz_ratios
from seer_attn.modules.seer_attention import SeerAttentionSettings

GRID = [0.05, 0.1, 0.2, 0.4, 1.0]
STEEP = [[d, min(1.0, 0.3 + 2.0 * d)] for d in GRID]  # an early layer: recall keeps rising
FLAT = [[d, 0.95 + 0.05 * d] for d in GRID]  # a late layer: already near 1


def test_concave_envelope_drops_points_below_the_chords():
    pts = [(0.1, 0.5), (0.2, 0.52), (0.3, 0.8), (0.5, 0.9)]
    assert concave_envelope(pts) == [(0.1, 0.5), (0.3, 0.8), (0.5, 0.9)]


def test_allocation_spends_the_target_where_recall_rises_most():
    grid = [0.05, 0.1, 0.2, 0.4]
    steep = [(d, min(1.0, 0.3 + 2.0 * d)) for d in grid]  # an early layer: recall keeps rising
    flat = [(d, 0.95 + 0.05 * d) for d in grid]  # a late layer: already near 1
    dens = allocate_layer_densities([steep, flat, flat], 0.1)
    assert sum(dens) / 3 == pytest.approx(0.1)
    assert dens[0] > 0.1 > dens[1] and dens[1] == pytest.approx(dens[2])
    # identical curves: the target everywhere
    assert allocate_layer_densities([steep, steep], 0.2) == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError, match="outside the measured range"):
        allocate_layer_densities([steep], 0.9)


def test_layer_density_scale_sets_each_layer_budget():
    from seer_attn import SeerLlamaConfig

    c = SeerLlamaConfig(num_hidden_layers=3, seerattn_nz_ratio=0.2, seerattn_layer_density_scale=[2.0, 0.5, 10.0])
    assert [SeerAttentionSettings.from_config(c, i).nz_ratio for i in range(3)] == pytest.approx([0.4, 0.1, 1.0])
    assert SeerAttentionSettings.from_config(c).nz_ratio == pytest.approx(0.2)
    with pytest.raises(ValueError, match="3 layers"):
        SeerLlamaConfig(num_hidden_layers=3, seerattn_layer_density_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="numbers > 0"):
        SeerLlamaConfig(num_hidden_layers=1, seerattn_layer_density_scale=[0.0])


def test_layer_nz_ratios_keep_the_requested_mean():
    curves = [STEEP, FLAT, FLAT]
    for nz in (0.05, 0.1, 0.3, 0.7):
        dens = layer_nz_ratios(curves, nz)
        assert sum(dens) / 3 == pytest.approx(nz) and all(0 < d <= 1 for d in dens)
    assert layer_nz_ratios(curves, 0.1)[0] > 0.1
    # outside the measured range: the nearest end's proportions, scaled
    assert layer_nz_ratios(curves, 0.02) == pytest.approx([0.02, 0.02, 0.02])
    assert layer_nz_ratios(curves, 1.0) == pytest.approx([1.0, 1.0, 1.0])


def test_layer_budget_curves_set_each_layer_budget():
    from seer_attn import SeerLlamaConfig

    c = SeerLlamaConfig(num_hidden_layers=3, seerattn_nz_ratio=0.1, seerattn_layer_budget_curves=[STEEP, FLAT, FLAT])
    per_layer = [SeerAttentionSettings.from_config(c, i).nz_ratio for i in range(3)]
    assert per_layer == pytest.approx(layer_nz_ratios([STEEP, FLAT, FLAT], 0.1)) and per_layer[0] > per_layer[1]
    # above seerattn_layer_budget_max_nz (default 0.2) every layer gets the request
    c.seerattn_nz_ratio = 0.3
    assert [SeerAttentionSettings.from_config(c, i).nz_ratio for i in range(3)] == pytest.approx([0.3] * 3)
    c.seerattn_layer_budget_max_nz = 0.5
    assert SeerAttentionSettings.from_config(c, 0).nz_ratio > 0.3
    with pytest.raises(ValueError, match="seerattn_layer_budget_max_nz"):
        c.seerattn_layer_budget_max_nz = 0.0
    c.seerattn_nz_ratio = 0.1
    c.seerattn_nz_ratio = 1.0  # dense stays dense everywhere
    assert [SeerAttentionSettings.from_config(c, i).nz_ratio for i in range(3)] == [1.0, 1.0, 1.0]
    c.seerattn_layer_density_scale = [1.0, 1.0, 1.0]  # explicit scales take precedence
    c.seerattn_nz_ratio = 0.1
    assert [SeerAttentionSettings.from_config(c, i).nz_ratio for i in range(3)] == pytest.approx([0.1] * 3)
    assert SeerLlamaConfig.from_dict(c.to_dict()).seerattn_layer_budget_curves == [STEEP, FLAT, FLAT]
    with pytest.raises(ValueError, match="2 curves for 3 layers"):
        SeerLlamaConfig(num_hidden_layers=3, seerattn_layer_budget_curves=[STEEP, FLAT])
    with pytest.raises(ValueError, match=r"seerattn_layer_budget_curves\[1\]"):
        SeerLlamaConfig(num_hidden_layers=2, seerattn_layer_budget_curves=[STEEP, [[0.0, 0.5]]])


def test_ppl_sweep_runs_layer_budgets_only_where_asked():
    pts = sweep_points(["seer", "oracle_mass"], [0.1], [0.01], ("adaptive", "adaptive+layers"), layer_curves=[STEEP, FLAT])
    by = {(p.method, p.sparsity_method): p.fields for p in pts}
    assert by[("seer", "adaptive+layers")]["seerattn_layer_budget_curves"] == [STEEP, FLAT]
    assert by[("seer", "adaptive+layers")]["seerattn_sparsity_method"] == "adaptive"
    # every other row: the same density in every layer, whatever the checkpoint's config says
    assert by[("seer", "adaptive")]["seerattn_layer_budget_curves"] is None
    assert by[("oracle_mass", "threshold")]["seerattn_layer_budget_curves"] is None
    with pytest.raises(ValueError, match="need layer budget curves"):
        sweep_points(["seer"], [0.1], [], ("adaptive+layers",))
    with pytest.raises(ValueError, match="budget methods must be among"):
        sweep_points(["seer"], [0.1], [], ("top_k",))


def test_layer_budgets_cli_on_a_tiny_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    d = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                 intermediate_size=128, vocab_size=300, max_position_embeddings=1024)).save_pretrained(d)
    vocab = {f"w{i}": i for i in range(298)} | {"<|endoftext|>": 298, "<unk>": 299}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(d)
    data = tmp_path / "calib.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for _ in range(2):
            f.write(json.dumps({"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 298, (700,), generator=g))}) + "\n")
    gates = tmp_path / "gates"
    from seer_attn.models import AutoSeerForCausalLM

    AutoSeerForCausalLM.from_pretrained(str(d)).save_pretrained(gates, save_base=False)
    args = ["--model", str(gates), "--dataset", str(data), "--length", "512", "--max_docs", "2", "--grid", "0.1,0.3,0.6,1.0", "--show", "0.3"]
    rec = main(args + ["--objective", "recall", "--output", str(tmp_path / "recall.json")])["curves"]
    assert len(rec) == 2 and [p[0] for p in rec[0]] == [0.1, 0.3, 0.6, 1.0]
    # the oracle keeps everything at density 1 and more with more blocks
    assert all(c[-1][1] == pytest.approx(1.0, abs=1e-4) and c[0][1] <= c[-1][1] for c in rec)
    out = main(args + ["--write_config"])  # the default objective: minus the loss rise of each layer alone
    curves = out["curves"]
    assert out["objective"] == "loss" and len(curves) == 2 and all([p[0] for p in c] == [0.1, 0.3, 0.6, 1.0] for c in curves)
    assert all(c[-1][1] == 0.0 and all(math.isfinite(p[1]) for p in c) for c in curves)  # a random model may gain from sparsity
    assert sum(out["allocations"]["0.3"]) / 2 == pytest.approx(0.3)
    assert json.loads((gates / "layer_budgets.json").read_text())["curves"] == curves
    reloaded = AutoSeerForCausalLM.from_pretrained(str(gates))
    assert reloaded.config.seerattn_layer_budget_curves == curves
    assert reloaded.config.seerattn_mode == "sparse" and reloaded.config.seerattn_layer_density_scale is None
    # decode token budgets: their own curves and config field, the prefill curves untouched
    dec = main(["--model", str(gates), "--dataset", str(data), "--length", "512", "--max_docs", "2", "--stage", "decode",
                "--grid", "128,256", "--show", "192", "--output", str(tmp_path / "decode.json"), "--write_config"])
    assert dec["stage"] == "decode" and dec["selector"] == "oracle"
    assert [[p[0] for p in c] for c in dec["curves"]] == [[128, 256, 512]] * 2
    assert sum(dec["allocations"]["192"]) / 2 == pytest.approx(192, abs=32)
    reloaded = AutoSeerForCausalLM.from_pretrained(str(gates))
    assert reloaded.config.seerattn_decode_layer_budget_curves == dec["curves"]
    assert reloaded.config.seerattn_layer_budget_curves == curves
    with pytest.raises(ValueError, match="not a decode selector"):
        main(["--model", str(gates), "--dataset", str(data), "--stage", "decode", "--selector", "oracle_mass"])


def test_loss_curve_is_zero_where_only_that_layer_changes_nothing(tmp_path):
    # one layer sparse and every other exact: at density 1 (and with every block kept) nothing changes
    from seer_attn import SeerLlamaConfig, SeerLlamaForCausalLM
    from seer_attn.evaluation.layer_budgets import measure_loss_curves

    torch.manual_seed(0)
    cfg = SeerLlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                          intermediate_size=128, vocab_size=100, max_position_embeddings=1024)
    model = SeerLlamaForCausalLM(cfg).eval()
    docs = [torch.randint(0, 100, (512,)) for _ in range(2)]
    curves = measure_loss_curves(model, docs, grid=(0.05, 0.99), sparsity_method="nz_ratio", progress=False)
    assert [[p[0] for p in c] for c in curves] == [[0.05, 0.99, 1.0]] * 3
    # per-row top-k at 0.99 keeps all 8 blocks of a row: no change; at 0.05 one block per row: a change
    assert all(c[1][1] == pytest.approx(0.0, abs=1e-5) and abs(c[0][1]) > 1e-4 for c in curves)
    assert model.config.seerattn_layer_density_scale is None and model.config.seerattn_mode == "sparse"
    # the gates' own blocks instead of the oracle's
    by_gate = measure_loss_curves(model, docs, grid=(0.05,), selector="gate", progress=False)
    assert [[p[0] for p in c] for c in by_gate] == [[0.05, 1.0]] * 3 and model.config.seerattn_selector == "gate"


def test_layer_token_budgets_keep_the_mean_in_whole_blocks():
    from seer_attn.modules.layer_budget import layer_token_budgets

    steep = [[128, -0.5], [512, -0.1], [2048, -0.01], [8192, 0.0]]
    flat = [[128, -0.02], [512, -0.01], [2048, -0.001], [8192, 0.0]]
    b = layer_token_budgets([steep, flat, flat, flat], 512)
    assert all(x % 64 == 0 and x >= 64 for x in b)
    assert sum(b) / 4 == pytest.approx(512, abs=32) and b[0] > b[1] == b[2] == b[3]
    # outside the measured range: the nearest end's proportions, scaled
    assert layer_token_budgets([steep, flat], 64) == [64, 64]
    assert layer_token_budgets([steep, flat], 16384) == [16384, 16384]


def test_decode_layer_budgets_set_each_layer_token_budget():
    from seer_attn import SeerLlamaConfig
    from seer_attn.modules.decode import DecodeSettings
    from seer_attn.modules.layer_budget import layer_token_budgets

    steep = [[128, -0.5], [512, -0.1], [2048, 0.0]]
    flat = [[128, -0.02], [512, -0.01], [2048, 0.0]]
    c = SeerLlamaConfig(num_hidden_layers=3, seerattn_decode_token_budget=512, seerattn_decode_layer_budget_curves=[steep, flat, flat])
    per_layer = [DecodeSettings.from_config(c, i).token_budget for i in range(3)]
    assert per_layer == layer_token_budgets([steep, flat, flat], 512) and per_layer[0] > per_layer[1]
    assert DecodeSettings.from_config(c).token_budget == 512  # no layer: the request
    c.seerattn_decode_layer_budget_scale = [2.0, 0.5, 1.0]  # explicit scales take precedence
    assert [DecodeSettings.from_config(c, i).token_budget for i in range(3)] == [1024, 256, 512]
    c.seerattn_decode_token_budget = 0  # 0 stays 0 (the own block only)
    assert DecodeSettings.from_config(c, 1).token_budget == 0
    assert SeerLlamaConfig.from_dict(c.to_dict()).seerattn_decode_layer_budget_curves == [steep, flat, flat]
    with pytest.raises(ValueError, match="2 curves for 3 layers"):
        SeerLlamaConfig(num_hidden_layers=3, seerattn_decode_layer_budget_curves=[steep, flat])
    with pytest.raises(ValueError, match=r"seerattn_decode_layer_budget_curves\[1\]"):
        SeerLlamaConfig(num_hidden_layers=2, seerattn_decode_layer_budget_curves=[steep, [[0, 0.5]]])
    with pytest.raises(ValueError, match="seerattn_decode_layer_budget_scale has 2 entries for 3 layers"):
        SeerLlamaConfig(num_hidden_layers=3, seerattn_decode_layer_budget_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="seerattn_decode_layer_budget_scale must be"):
        c.seerattn_decode_layer_budget_scale = [1.0, -1.0, 1.0]


def test_decode_loss_curves_are_zero_where_the_layer_keeps_everything():
    from seer_attn import SeerLlamaConfig, SeerLlamaForCausalLM
    from seer_attn.evaluation.decode_ppl import sweep_points as decode_points
    from seer_attn.evaluation.layer_budgets import measure_decode_loss_curves

    torch.manual_seed(0)
    cfg = SeerLlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                          intermediate_size=128, vocab_size=100, max_position_embeddings=1024)
    model = SeerLlamaForCausalLM(cfg).eval()
    docs = [torch.randint(0, 100, (512,)) for _ in range(2)]
    # 512 tokens = 8 blocks; a budget of 128 keeps one earlier block per token
    curves = measure_decode_loss_curves(model, docs, grid=(128, 4096), progress=False)
    assert [[p[0] for p in c] for c in curves] == [[128, 512]] * 3  # budgets >= the context are dropped
    assert all(abs(c[0][1]) > 1e-4 and c[-1][1] == 0.0 for c in curves)
    assert model.config.seerattn_mode == "sparse" and model.config.seerattn_decode_layer_budget_scale is None
    # the reference of the rises: a budget covering the context is exactly dense attention
    ids = torch.stack(docs)
    with torch.no_grad():
        dense = model(input_ids=ids, labels=ids, logits_to_keep=1).lm_loss
        model.set_seerattn(seerattn_mode="decode_eval", seerattn_decode_selector="oracle", seerattn_decode_token_budget=1024,
                           seerattn_decode_min_context=0)
        full = model(input_ids=ids, labels=ids, logits_to_keep=1).lm_loss
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    # the evaluator's '+layers' rows carry the curves, the plain rows none
    pts = {p.method: p.fields for p in decode_points(["oracle", "oracle+layers"], [256], curves)}
    assert pts["oracle+layers"]["seerattn_decode_layer_budget_curves"] == curves
    assert pts["oracle"]["seerattn_decode_layer_budget_curves"] is None
    assert pts["oracle+layers"]["seerattn_decode_selector"] == "oracle"
    with pytest.raises(ValueError, match="'\\+layers' methods need decode layer curves"):
        decode_points(["seer+layers"], [256])
