"""Decode-stage sparsity in the model, on a tiny random Llama (block size 16 so that short sequences
span many blocks): generation with an unlimited budget == dense generation (greedy and beam search),
sparse generation == teacher-forced decode mode over the same tokens (so the incremental
compressed-K cache and the selection match the whole-sequence path), distillation trains the decode
gate, gate-only checkpoints carry it, and the dense rules (start layer, min context, padding)."""

import logging
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import seer_attn.modules.decode as decode_module
from seer_attn import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.models.cuda_graphs import DecodingRule, GraphedDecoder
from seer_attn.modules.decode import decode_states
from seer_attn.modules.decode_gate import DecodeGate, StaticCompressedKeyCache

BS = 16
DECODE = dict(
    seerattn_decode_gate_type="Kmaxminavg", seerattn_gate_block_size=BS, seerattn_decode_min_context=0,
    seerattn_min_sparse_length=1 << 20,  # dense prefill: these tests are about decoding
    # random decode gates (reset_gates(std=0.3) below): decisive scores, no near-ties between selection paths
    seerattn_decode_gate_init="random",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(42)
    d = tmp_path_factory.mktemp("tiny_llama_decode")
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).save_pretrained(d)
    return str(d)


@pytest.fixture
def sparse_steps(monkeypatch):
    """One entry per call of the block-sparse decoding attention (each layer's sparse decoding step)."""
    calls = []
    real = decode_module._attend
    monkeypatch.setattr(decode_module, "_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def load(tiny_dir, **kw):
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, **{**DECODE, **kw}).eval()
    torch.manual_seed(0)
    model.reset_gates(std=0.3)  # decisive gate scores: no near-ties between selection paths
    return model


def prompt(B=1, S=20, seed=0):
    # no token 0: it is the pad id below, and generate() would read it as padding (dense decoding)
    return torch.randint(1, 128, (B, S), generator=torch.Generator().manual_seed(seed))


def greedy(model, x, n=40, **kw):
    kw.setdefault("attention_mask", torch.ones_like(x))  # an unpadded batch, whatever its tokens
    out = model.generate(
        x, max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kw
    )
    return out.sequences, torch.stack(out.scores, 1), out.past_key_values


def test_decode_config_fields():
    c = SeerLlamaConfig()
    assert c.seerattn_decode_gate_type is None and c.seerattn_decode_token_budget == 2048
    assert c.seerattn_decode_selector == "gate" and c.seerattn_decode_threshold is None
    for bad, match in (
        (dict(seerattn_decode_gate_type="Kminmax"), "decode gate type"),
        (dict(seerattn_decode_selector="best"), "seerattn_decode_selector"),
        (dict(seerattn_decode_token_budget=-1), "seerattn_decode_token_budget"),
        (dict(seerattn_decode_selector="quest", seerattn_decode_threshold=0.1), "probabilities"),
        (dict(seerattn_decode_q_pooling="max"), "seerattn_decode_q_pooling"),
    ):
        with pytest.raises(ValueError, match=match):
            SeerLlamaConfig(**bad)


def test_sparse_decoding_on_a_static_cache_equals_the_dynamic_cache(tiny_dir, sparse_steps):
    # generate(cache_implementation="static"): the decode gate sees the filled slots only, block by block
    model = load(tiny_dir, seerattn_decode_token_budget=2 * BS)
    x = prompt(B=2)
    seq, scores, cache = greedy(model, x)
    sseq, sscores, scache = greedy(model, x, cache_implementation="static")
    assert len(sparse_steps) == 2 * 39 * 2  # both runs decoded sparsely, every step of both layers
    assert torch.equal(sseq, seq)
    torch.testing.assert_close(sscores, scores, atol=1e-5, rtol=0)
    # the one-token steps ran the graph-safe form: a preallocated state, updated in place, whose complete
    # blocks hold what the growing cache compressed (59 tokens: 3 blocks of 16)
    dynamic, static = decode_states(cache), decode_states(scache)
    assert set(static) == {0, 1} and all(isinstance(s, StaticCompressedKeyCache) for s in static.values())
    for i in (0, 1):
        nc = dynamic[i].keys.shape[2]
        assert nc == 3 and static[i].keys.shape[2] == 60 // BS + 1  # capacity 60 slots
        torch.testing.assert_close(static[i].keys[:, :, :nc], dynamic[i].keys, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fields", [dict(seerattn_decode_token_budget=2 * BS), dict(seerattn_decode_threshold=0.3),
                                    dict(seerattn_decode_token_budget=2 * BS, seerattn_decode_start_layer=1),
                                    dict(seerattn_decode_token_budget=2 * BS, seerattn_decode_min_context=40),
                                    dict(seerattn_decode_token_budget=4 * BS, seerattn_decode_keep_sink=True,
                                         seerattn_decode_keep_recent=1),
                                    dict(seerattn_mode="dense")])  # fmt: skip
def test_graph_form_decoding_equals_generate(tiny_dir, fields):
    # GraphedDecoder's step (the one it captures on a GPU; run eagerly here): every length on the device,
    # fixed-shape selection over the preallocated compressed keys, dense layers masked over the slots
    model = load(tiny_dir, **fields)
    x = prompt(B=2)
    seq, _, _ = greedy(model, x, n=40)
    dec = GraphedDecoder(model, max_cache_len=64, graphs=False)
    assert torch.equal(dec.generate(x, 40), seq)
    assert torch.equal(dec.generate(x[:, :13], 40), greedy(model, x[:, :13], n=40)[0])  # reused buffers, new prompt


def test_graph_form_dense_splitk_equals_generate(tiny_dir, monkeypatch):
    # the stronger dense baseline of bench_decode --graphed: every filled block through the split-K kernel (its twin here)
    model = load(tiny_dir, seerattn_mode="dense")
    x = prompt(B=2)
    seq, _, _ = greedy(model, x, n=30)
    monkeypatch.setattr(decode_module, "DENSE_SLOTS_KERNEL", "splitk")
    assert torch.equal(GraphedDecoder(model, max_cache_len=64, graphs=False).generate(x, 30), seq)
    monkeypatch.setattr(decode_module, "DENSE_SLOTS_KERNEL", "flash")
    with pytest.raises(ValueError, match="DENSE_SLOTS_KERNEL"):
        GraphedDecoder(model, max_cache_len=64, graphs=False).generate(x, 3)


# (a budget, with min_context crossed mid-generation: state-only steps, then selecting ones; the threshold
# form is compared with its twin in tests/kernels/test_decode_gate_kernel.py)
@pytest.mark.parametrize("fields", [dict(seerattn_decode_token_budget=2 * BS, seerattn_decode_min_context=40)])
def test_fused_decode_gate_step_decodes_as_the_pytorch_step(tmp_path, fields, monkeypatch):
    # the Triton kernels (interpreted here): the gate's one-kernel step against its twin, the PyTorch step,
    # token for token; head dim 64 (the decoding kernel's), the gate's RoPE from the model's YaRN
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import seer_attn.kernels.decode_gate_kernel as kernel_module

    torch.manual_seed(42)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, intermediate_size=128,
        vocab_size=128, max_position_embeddings=2048, rope_parameters={"rope_type": "yarn", "factor": 2.0,
        "original_max_position_embeddings": 1024, "rope_theta": 10000.0},
    )).save_pretrained(tmp_path)  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(str(tmp_path), seerattn_kernel_implementation="TopK", **fields).to(device)
    calls = []
    real = kernel_module.decode_gate_step
    monkeypatch.setattr(kernel_module, "decode_gate_step", lambda *a, **k: calls.append(k["select"]) or real(*a, **k))
    x = prompt(B=2).to(device)
    fused = GraphedDecoder(model, max_cache_len=64, graphs=False).generate(x, 30)
    assert len(calls) == 2 * 29 and any(calls) and not all(calls)  # both kinds of step ran
    decode_module.set_fused_decode_gate(False)
    try:
        twin = GraphedDecoder(model, max_cache_len=64, graphs=False).generate(x, 30)
    finally:
        decode_module.set_fused_decode_gate(True)
    assert len(calls) == 2 * 29
    assert torch.equal(fused, twin)


def test_decoding_rule_samples_the_restricted_softmax():
    # Gumbel-max on the device: frequencies match softmax(logits / T), restricted by top_k / top_p
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(40000, 4)
    for rule, expect in (
        (DecodingRule(do_sample=True), [0.5, 0.3, 0.15, 0.05]),
        (DecodingRule(do_sample=True, temperature=2.0), torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt() / torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt().sum()),
        (DecodingRule(do_sample=True, top_k=2), [0.625, 0.375, 0, 0]),
        (DecodingRule(do_sample=True, top_p=0.7), [0.625, 0.375, 0, 0]),  # 0.5 + 0.3 reach 0.7
        (DecodingRule(do_sample=True, top_k=1), [1, 0, 0, 0]),
    ):
        freq = torch.bincount(rule.pick(logits), minlength=4).float() / logits.shape[0]
        torch.testing.assert_close(freq, torch.as_tensor(expect, dtype=torch.float32), atol=0.01, rtol=0)
    assert torch.equal(DecodingRule().pick(logits), torch.zeros(40000, dtype=torch.long))
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            DecodingRule(do_sample=True, **bad)


def test_graph_form_sampling_and_eos(tiny_dir):
    model = load(tiny_dir, seerattn_decode_token_budget=2 * BS)
    x = prompt(B=2)
    dec = GraphedDecoder(model, max_cache_len=64, graphs=False)
    greedy_seq = dec.generate(x, 40)
    assert torch.equal(dec.generate(x, 40, do_sample=True, top_k=1), greedy_seq)
    torch.manual_seed(1)
    a = dec.generate(x, 40, do_sample=True, temperature=1.5)
    torch.manual_seed(1)
    assert torch.equal(dec.generate(x, 40, do_sample=True, temperature=1.5), a) and not torch.equal(a, greedy_seq)
    # EOS: row 0's 6th greedy token; row 0 then pads, row 1 runs on (unless it meets the same token)
    S, eos = x.shape[1], int(greedy_seq[0, x.shape[1] + 5])
    out = dec.generate(x, 40, eos_token_id=eos, pad_token_id=0)
    first = int((greedy_seq[0, S:] == eos).nonzero()[0])
    assert torch.equal(out[0, : S + first + 1], greedy_seq[0, : S + first + 1]) and (out[0, S + first + 1 :] == 0).all()
    # one sequence: generation stops at the first check after its EOS
    out1 = dec.generate(x[:1], 40, eos_token_id=eos, check_every=4)
    assert out1.shape[1] <= S + first + 1 + 4 and (out1[0, S + first :] == eos).all()


def test_graph_form_decoder_misuse(tiny_dir):
    model = load(tiny_dir, seerattn_decode_token_budget=2 * BS)
    dec = GraphedDecoder(model, max_cache_len=24, graphs=False)
    with pytest.raises(RuntimeError, match="before prefill"):
        dec.step()
    with pytest.raises(ValueError, match="no slot"):
        dec.prefill(prompt(S=24))
    assert dec.generate(prompt(S=20), 4).shape == (1, 24)  # the cache holds prompt + generated tokens
    with pytest.raises(ValueError, match="slots are full"):
        dec.step()


def test_compiled_decode_gate_generation_equals_eager(tiny_dir):
    # seerattn_compile_decode_gate: the gate's queries, scores and selection as one torch.compile'd graph
    # (with a preallocated cache: the state update too, static shapes)
    torch._dynamo.reset()
    x = prompt(B=2)
    seq, scores, _ = greedy(load(tiny_dir, seerattn_decode_token_budget=2 * BS), x, n=24)
    model = load(tiny_dir, seerattn_decode_token_budget=2 * BS, seerattn_compile_decode_gate=True)
    cseq, cscores, _ = greedy(model, x, n=24)
    assert torch.equal(cseq, seq)
    torch.testing.assert_close(cscores, scores, atol=1e-5, rtol=0)
    assert torch.equal(GraphedDecoder(model, max_cache_len=48, graphs=False).generate(x, 24), seq)


def test_unlimited_budget_generation_equals_dense(tiny_dir, sparse_steps):
    model = load(tiny_dir, seerattn_decode_token_budget=10**6)
    x = prompt(B=2)
    seq, scores, cache = greedy(model, x)
    assert len(sparse_steps) == 39 * 2  # every decoding step of both layers went through the sparse path
    states = decode_states(cache)
    assert {i: (s.num_tokens, s.num_blocks) for i, s in states.items()} == {0: (59, 59 // BS), 1: (59, 59 // BS)}
    model.set_seerattn(seerattn_mode="dense")
    dseq, dscores, _ = greedy(model, x)
    assert torch.equal(seq, dseq)
    torch.testing.assert_close(scores, dscores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fields", [dict(seerattn_decode_token_budget=48), dict(seerattn_decode_threshold=0.3),
                                    dict(seerattn_decode_token_budget=48, seerattn_decode_q_pooling="proj"),
                                    dict(seerattn_decode_token_budget=48, seerattn_decode_k_summaries=2),
                                    dict(seerattn_decode_token_budget=48, seerattn_decode_keep_recent=1)])
def test_sparse_generation_equals_teacher_forced_decode_mode(tiny_dir, fields):
    """Budget 48 = own block + 2 blocks: the 20-token prompt is dense either way, every later token is
    truly sparse. Teacher-forced decode mode compresses the whole prefix at once; generation grows the
    compressed cache block by block: the logits must agree at every step (also with a threshold)."""
    model = load(tiny_dir, **fields)
    x = prompt()
    seq, scores, _ = greedy(model, x, n=60)
    model.set_seerattn(seerattn_mode="decode_eval")
    with torch.no_grad():
        out = model(seq[:, :-1], use_cache=False)
    torch.testing.assert_close(out.logits[:, x.shape[1] - 1 :], scores, atol=1e-4, rtol=0)
    assert out.density is not None and out.density < 0.9
    # and it is really sparse: dense decoding gives other logits
    model.set_seerattn(seerattn_mode="dense")
    with torch.no_grad():
        dense = model(seq[:, :-1], use_cache=False).logits
    assert (dense[:, -20:] - out.logits[:, -20:]).abs().max() > 1e-3


def test_multi_token_step_equals_teacher_forced_decode_mode(tiny_dir):
    # a 30-token step over a 40-token cache (speculative decoding): per-token selection, blocks
    # completed inside the step are compressed before they are scored
    model = load(tiny_dir, seerattn_decode_token_budget=48)
    x = prompt(S=70)
    with torch.no_grad():
        cache = model(x[:, :40], use_cache=True).past_key_values
        step = model(x[:, 40:], past_key_values=cache, use_cache=True).logits
        model.set_seerattn(seerattn_mode="decode_eval")
        tf = model(x, use_cache=False).logits
    torch.testing.assert_close(step, tf[:, 40:], atol=1e-4, rtol=0)
    assert decode_states(cache)[1].num_blocks == 70 // BS


@pytest.mark.parametrize("selector", ["oracle", "quest", "static"])
def test_reference_selectors(tiny_dir, selector):
    # no decode gate needed; unlimited budget == dense, a small one differs from dense
    model = load(tiny_dir, seerattn_decode_gate_type=None, seerattn_decode_selector=selector, seerattn_decode_token_budget=10**6)
    x = prompt()
    seq, scores, _ = greedy(model, x, n=30)
    model.set_seerattn(seerattn_mode="dense")
    dseq, dscores, _ = greedy(model, x, n=30)
    torch.testing.assert_close(scores, dscores, atol=1e-4, rtol=0)
    model.set_seerattn(seerattn_mode="sparse", seerattn_decode_token_budget=32)
    sseq, sscores, _ = greedy(model, x, n=30)
    model.set_seerattn(seerattn_mode="decode_eval")
    with torch.no_grad():
        tf = model(sseq[:, :-1], use_cache=False).logits
    torch.testing.assert_close(tf[:, x.shape[1] - 1 :], sscores, atol=1e-4, rtol=0)


def test_beam_search_unlimited_budget_equals_dense(tiny_dir):
    model = load(tiny_dir, seerattn_decode_token_budget=10**6)
    x = prompt(seed=1)
    kw = dict(max_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    seq = model.generate(x, **kw)
    model.set_seerattn(seerattn_mode="dense")
    assert torch.equal(seq, model.generate(x, **kw))


def test_dense_rules(tiny_dir, caplog):
    model = load(tiny_dir, seerattn_decode_token_budget=32)
    x = prompt()
    model.set_seerattn(seerattn_mode="dense")
    _, dense, _ = greedy(model, x, n=30)
    for fields in (dict(seerattn_decode_start_layer=2), dict(seerattn_decode_min_context=10**6)):
        model.set_seerattn(**{"seerattn_mode": "sparse", "seerattn_decode_start_layer": 0, "seerattn_decode_min_context": 0, **fields})
        _, scores, _ = greedy(model, x, n=30)
        torch.testing.assert_close(scores, dense, atol=1e-4, rtol=0)
    # padded batches decode densely, and say so
    model.set_seerattn(seerattn_mode="sparse", seerattn_decode_start_layer=0, seerattn_decode_min_context=0)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with caplog.at_level(logging.WARNING):
        decode_module._logged.clear()
        model.generate(prompt(B=2), attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert "padded batch decodes densely" in caplog.text


def test_decode_gate_misuse(tiny_dir):
    model = load(tiny_dir, seerattn_decode_gate_type=None)
    model.set_seerattn(seerattn_decode_gate_type="Kmax")
    with pytest.raises(RuntimeError, match="when loading the model"):
        model(prompt())
    model = load(tiny_dir)
    model.set_seerattn(seerattn_mode="decode_eval")
    with pytest.raises(ValueError, match="whole sequences"):
        greedy(model, prompt(), n=2)


@pytest.mark.parametrize("design", [dict(seerattn_decode_q_pooling="proj"),
                                    dict(seerattn_decode_q_pooling="heads", seerattn_decode_gate_init="pooled",
                                         seerattn_decode_k_summaries=4)])
def test_distill_trains_decode_gate_and_checkpoint_carries_it(tiny_dir, tmp_path, design, monkeypatch):
    model = load(tiny_dir, seerattn_mode="distill", **design)
    model.freeze_base()
    decode_params = {n: p for n, p in model.named_parameters() if ".decode_gate." in n}
    assert decode_params and all(p.requires_grad for p in decode_params.values())
    x = prompt(B=2, S=100)
    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = model(x, logits_to_keep=1)
    assert len(calls) == 2  # each layer's decode loss is checkpointed
    no_decode = load(tiny_dir, seerattn_mode="distill", seerattn_decode_gate_type=None, **design)
    no_decode.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        prefill_only = no_decode(x, logits_to_keep=1).gate_losses
    assert (out.gate_losses.detach() > prefill_only + 1e-4).all()  # the decode loss is added per layer
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decode_params.values())
    # the decode loss recomputes the gate's logits in the backward (decode.DECODE_LOSS_CHECKPOINT): same gradients
    grads = {n: p.grad.clone() for n, p in decode_params.items()}
    model.zero_grad()
    monkeypatch.setattr(decode_module, "DECODE_LOSS_CHECKPOINT", False)
    model(x, logits_to_keep=1).loss.backward()
    for n, p in decode_params.items():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7)
    # padded batches: per-sequence decode loss, finite
    mask = torch.ones_like(x)
    mask[0, :30] = 0
    padded = model(x, attention_mask=mask, logits_to_keep=1)
    assert torch.isfinite(padded.gate_losses).all()

    model.save_pretrained(tmp_path, save_base=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(".decode_gate." in k for k in saved)
    reloaded = SeerLlamaForCausalLM.from_pretrained(str(tmp_path), base_model=tiny_dir, dtype=torch.float32)
    assert isinstance(reloaded.model.layers[1].self_attn.attn_gate.decode_gate, DecodeGate)
    for name, p in reloaded.named_parameters():
        if ".decode_gate." in name:
            torch.testing.assert_close(p, decode_params[name].detach())


@pytest.mark.slow
def test_smollm2_unlimited_budget_generation_equals_dense(smollm2, eval_text):
    """The real model with (untrained) decode gates: greedy decoding across block boundaries with an
    unlimited budget is token-for-token the dense decoding."""
    from seer_attn.modules.decode import attach_decode_gate

    model, tok = smollm2
    x = tok(eval_text, return_tensors="pt").input_ids[:, :186]
    fields = ("seerattn_mode", "seerattn_decode_gate_type", "seerattn_decode_token_budget", "seerattn_decode_min_context")
    saved = {k: getattr(model.config, k) for k in fields}
    model.set_seerattn(seerattn_decode_gate_type="Kmaxminavg", seerattn_decode_token_budget=10**6, seerattn_decode_min_context=0)
    for layer in model.model.layers:
        attach_decode_gate(layer.self_attn.attn_gate, model.config, layer.self_attn.head_dim).reset_parameters()
    try:
        model.set_seerattn(seerattn_mode="sparse")
        seq, scores, cache = greedy(model, x, n=14)
        assert decode_states(cache)[29].num_blocks == 199 // 64 == 3
        model.set_seerattn(seerattn_mode="dense")
        dseq, dscores, _ = greedy(model, x, n=14)
        assert torch.equal(seq, dseq)
        torch.testing.assert_close(scores, dscores, atol=2e-3, rtol=0)
    finally:
        for layer in model.model.layers:
            del layer.self_attn.attn_gate.decode_gate
        model.set_seerattn(**saved)


@pytest.mark.gpu
def test_smollm2_triton_decoding_gpu(eval_text):
    """On CUDA the Triton kernels run (decode kernel, token-pooling oracle): unlimited budget == dense
    token for token, and budget-256 generation == teacher-forced decode mode."""
    from seer_attn import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    model = SeerLlamaForCausalLM.from_pretrained(
        "smollm2-135m", dtype=torch.float32, seerattn_decode_gate_type="Kmaxminavg", seerattn_decode_min_context=0,
        seerattn_decode_token_budget=10**6, seerattn_decode_gate_init="random",
    ).cuda().eval()
    # decisive untrained gate scores, as in the CPU tests: no near-ties between the generated and the
    # teacher-forced selection (the first GPU runs of this test failed; the cause was not captured)
    torch.manual_seed(0)
    model.reset_gates(std=0.3)
    x = tok(eval_text, return_tensors="pt").input_ids[:, :200].cuda()
    seq, scores, _ = greedy(model, x, n=150)
    model.set_seerattn(seerattn_mode="dense")
    dseq, dscores, _ = greedy(model, x, n=150)
    if not torch.equal(seq, dseq):  # say where and how close the dense top two were there (a GPU run failed here or below)
        i = int((seq != dseq).nonzero()[0, 1]) - x.shape[1]
        top2 = dscores[0, i].topk(2).values
        pytest.fail(f"unlimited-budget generation leaves dense at new token {i}: dense top-2 margin "
                    f"{float(top2[0] - top2[1]):.3g}, max |sparse - dense| score before it "
                    f"{float((scores[:, :i + 1] - dscores[:, :i + 1]).abs().max()):.3g}")
    for selector in ("gate", "oracle"):
        model.set_seerattn(seerattn_mode="sparse", seerattn_decode_token_budget=256, seerattn_decode_selector=selector)
        seq, scores, _ = greedy(model, x, n=150)
        model.set_seerattn(seerattn_mode="decode_eval")
        with torch.no_grad():
            tf = model(seq[:, :-1], use_cache=False).logits
        diff = (tf[:, x.shape[1] - 1 :] - scores).abs().amax(-1)[0]  # per generated token
        assert float(diff.max()) <= 2e-3, (
            f"{selector}: teacher-forced decode mode vs generation, max |diff| {float(diff.max()):.3g} at new token "
            f"{int(diff.argmax())} of {diff.numel()}; tokens above 2e-3: {int((diff > 2e-3).sum())}")


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [dict(seerattn_decode_token_budget=2 * BS), dict(seerattn_mode="dense"),
                                    dict(seerattn_decode_token_budget=2 * BS, seerattn_decode_min_context=40)])  # fmt: skip
def test_graphed_decoder_gpu(tmp_path, fields):
    """On CUDA the decoding step is captured (no host sync may hide in it) and its replays decode
    exactly what the same step run eagerly decodes, and what generate() decodes; a second prompt
    reuses the graph (and a min-context crossing captures the second one). Head dim 64: the Triton kernels."""
    torch.manual_seed(42)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, intermediate_size=128,
        vocab_size=128, max_position_embeddings=2048,
    )).save_pretrained(tmp_path)  # fmt: skip
    model = load(str(tmp_path), **fields).cuda()
    x = prompt(B=2).cuda()
    eager = GraphedDecoder(model, max_cache_len=64, graphs=False).generate(x, 40)
    dec = GraphedDecoder(model, max_cache_len=64)
    assert torch.equal(dec.generate(x, 40), eager)
    assert torch.equal(eager, greedy(model, x, n=40)[0])
    assert torch.equal(dec.generate(x[:, :13], 40), GraphedDecoder(model, 64, graphs=False).generate(x[:, :13], 40))
    assert len(dec._graphs) == (2 if "seerattn_decode_min_context" in fields else 1)
    # sampling inside the graph: top_k=1 is greedy; replays draw fresh noise (the generator advances per replay)
    assert torch.equal(dec.generate(x, 40, do_sample=True, top_k=1), eager)
    a, b = dec.generate(x, 40, do_sample=True, temperature=2.0), dec.generate(x, 40, do_sample=True, temperature=2.0)
    assert not torch.equal(a, b)
