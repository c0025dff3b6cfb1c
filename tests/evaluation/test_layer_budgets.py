import json

import pytest
import torch

from seer_attn.evaluation.layer_budgets import allocate_layer_densities, concave_envelope, main
from seer_attn.modules.seer_attention import SeerAttentionSettings


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
    out = main(["--model", str(d), "--dataset", str(data), "--length", "512", "--max_docs", "2", "--target", "0.3",
                "--grid", "0.1,0.3,0.6,1.0", "--output", str(tmp_path / "lb.json")])
    assert len(out["scale"]) == 2 and sum(out["densities"]) / 2 == pytest.approx(0.3, rel=0.05)
    assert json.loads((tmp_path / "lb.json").read_text())["target"] == 0.3
