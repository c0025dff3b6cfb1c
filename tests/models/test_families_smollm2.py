"""The Qwen2 path on real pretrained weights: SmolLM2-135M (a Llama) moved into a Qwen2 architecture
with zero q/k/v biases computes the same function, dense and sparse, as the Llama it came from."""

import math

import pytest
import torch

from seer_attn.models import SEERATTN_FIELDS, SeerQwen2Config, SeerQwen2ForCausalLM

S = 320  # 5 gate blocks per row: nz 0.5 keeps 1-2 of them


@pytest.fixture(scope="module")
def llama_and_qwen2(smollm2):
    llama, tok = smollm2
    fields = {k: v for k, v in llama.config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    qwen2 = SeerQwen2ForCausalLM(SeerQwen2Config(**fields)).eval()
    missing, unexpected = qwen2.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing)
    with torch.no_grad():
        for k in missing:
            qwen2.get_parameter(k).zero_()
    saved = {k: getattr(llama.config, k) for k in SEERATTN_FIELDS}
    yield llama, qwen2, tok
    llama.set_seerattn(**saved)


def run(model, x, **fields):
    model.set_seerattn(seerattn_min_sparse_length=0, **fields)
    with torch.no_grad():
        return model(x, labels=x, logits_to_keep=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        dict(seerattn_mode="dense"),
        dict(seerattn_mode="sparse", seerattn_nz_ratio=0.5, seerattn_selector="gate", seerattn_sparsity_method="nz_ratio"),
    ],
    ids=["dense", "gate"],
)
def test_smollm2_as_qwen2_equals_llama(llama_and_qwen2, eval_text, fields):
    llama, qwen2, tok = llama_and_qwen2
    x = tok(eval_text, return_tensors="pt").input_ids[:, :S]
    a, b = run(llama, x, **fields), run(qwen2, x, **fields)
    assert type(qwen2.model.layers[0].self_attn.q_proj.bias) is torch.nn.Parameter
    ppl_llama, ppl_qwen2 = math.exp(a.lm_loss.item()), math.exp(b.lm_loss.item())
    if fields["seerattn_mode"] == "dense":
        assert 3 < ppl_llama < 40
    assert ppl_qwen2 == pytest.approx(ppl_llama, rel=1e-5)
    assert b.density == pytest.approx(a.density)
    if fields["seerattn_mode"] == "sparse":
        assert 0.2 < a.density < 0.8  # really sparse (5 blocks: one top-k block plus the diagonal per row)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0)
