"""`--decode_arms`: decode-gate designs distilled beside the decode gate in one run (`seer_attn.training.decode_arms`)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seer_attn import AutoSeerForCausalLM
from seer_attn.training.decode_arms import parse_decode_arms
from seer_attn.training.distill import main


def test_parse_decode_arms():
    arms = parse_decode_arms("k2:k_summaries=2; plain: seerattn_decode_gate_norm=false, gate_type=Kmaxavg ;")
    assert arms == {"k2": {"seerattn_decode_k_summaries": 2},
                    "plain": {"seerattn_decode_gate_norm": False, "seerattn_decode_gate_type": "Kmaxavg"}}
    for bad, match in [("k2", "name:field"), ("k2:k_summaries=3", "seerattn_decode_k_summaries"),
                       ("a:budget=2", "fields are"), ("a:k_summaries=2;a:k_summaries=4", "new identifier"), (";", "no arm")]:
        with pytest.raises(ValueError, match=match):
            parse_decode_arms(bad)


def test_decode_arms_train_beside_the_decode_gate_and_export(tiny_llama_dir, tiny_text_jsonl, tmp_path):
    out = tmp_path / "run"
    common = ["--model", tiny_llama_dir, "--dataset", tiny_text_jsonl, "--train_length", "512", "--warmup_steps", "0",
              "--seed", "0", "--dataloader_pin_memory", "false", "--seerattn_decode_gate_type", "Kmaxminavg",
              "--learning_rate", "1e-2", "--max_steps", "3", "--per_device_train_batch_size", "2"]
    main([*common, "--output_dir", str(out), "--decode_arms", "same:k_summaries=1;k2:k_summaries=2"])
    gates = load_file(str(out / "model.safetensors"))
    assert not any("decode_arms" in k for k in gates)  # the run's own checkpoint: the main gates only
    decode = {k: v for k, v in gates.items() if ".decode_gate." in k}
    assert decode
    init = AutoSeerForCausalLM.from_pretrained(tiny_llama_dir, seerattn_decode_gate_type="Kmaxminavg").gate_state_dict()
    assert any(not torch.equal(v, init[k].to(v)) for k, v in decode.items())  # the decode gate trained
    # an arm of the main decode gate's design trains exactly as the main gate: same batches, target, init, update
    same = load_file(str(out / "arms" / "same" / "model.safetensors"))
    assert same.keys() == gates.keys() and all(torch.equal(same[k], v) for k, v in gates.items())
    # the k2 arm: an ordinary gate-only checkpoint with its own design, the prefill gate shared, its weights trained
    k2 = AutoSeerForCausalLM.from_pretrained(out / "arms" / "k2")
    assert k2.config.seerattn_decode_k_summaries == 2
    k2_gates = load_file(str(out / "arms" / "k2" / "model.safetensors"))
    assert all(torch.equal(k2_gates[k], v) for k, v in gates.items() if ".decode_gate." not in k)
    fresh = AutoSeerForCausalLM.from_pretrained(tiny_llama_dir, seerattn_decode_gate_type="Kmaxminavg",
                                                seerattn_decode_k_summaries=2).gate_state_dict()
    moved = [k for k in k2_gates if ".decode_gate." in k and not torch.equal(k2_gates[k], fresh[k].to(k2_gates[k]))]
    assert moved
    with pytest.raises(ValueError, match="cannot resume"):
        main([*common, "--output_dir", str(out), "--decode_arms", "k2:k_summaries=2", "--resume_from_checkpoint", str(out)])
    with pytest.raises(ValueError, match="seerattn_decode_gate_type"):
        main([*[a for a in common if a not in ("--seerattn_decode_gate_type", "Kmaxminavg")], "--output_dir",
              str(tmp_path / "none"), "--decode_arms", "k2:k_summaries=2"])
