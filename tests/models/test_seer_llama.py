"""Model invariants on a tiny random Llama: dense == HF Llama, density 1.0 == dense, all blocks
kept == dense, padded == unpadded, save -> load gives identical logits, bad input -> clear errors."""

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from seer_attn import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.kernels.naive import block_sparse_attn_naive
import seer_attn.modules.seer_attention as seer_attention_module


def tiny_llama_config(**kw):
    base = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=2048,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(42)
    d = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    return str(d)


@pytest.fixture()
def base(tiny_dir):
    return LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


CLASSIC_GATE = dict(
    seerattn_gate_q_summaries=1, seerattn_gate_k_summaries=1, seerattn_gate_init="random", seerattn_sparsity_method="nz_ratio"
)


def load(tiny_dir, **kw):
    kw.setdefault("seerattn_min_sparse_length", 0)  # short test inputs must still take the sparse path
    # the mechanics below are checked on the classic gate (one summary per side, random init,
    # per-row top-k); the default recipe has its own tests (test_gate_designs_*, test_default_recipe_*)
    for key, value in CLASSIC_GATE.items():
        kw.setdefault(key, value)
    return SeerLlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, **kw).eval()


def test_short_inputs_run_dense_by_default(tiny_dir, base):
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, seerattn_nz_ratio=0.1).eval()
    assert model.config.seerattn_min_sparse_length == "auto"
    from seer_attn.modules.crossover import resolve_min_sparse_length

    assert resolve_min_sparse_length(model.config) > 300  # the measured crossover, fitted to this shape
    x = ids()
    with torch.no_grad():
        out = model(x)
    assert out.density == 1.0
    torch.testing.assert_close(out.logits, base(x).logits, atol=1e-5, rtol=0)


def ids(B=2, S=300, seed=0):
    return torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(seed))


def test_dense_equals_llama(tiny_dir, base):
    model = load(tiny_dir, seerattn_mode="dense")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)


def test_nz_ratio_one_equals_dense(tiny_dir, base):
    model = load(tiny_dir, seerattn_mode="sparse", seerattn_nz_ratio=1.0)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, atol=1e-5, rtol=0)


def test_all_blocks_selected_equals_dense(tiny_dir, base):
    # threshold 0 keeps every causal block: the block-sparse path itself must reproduce dense
    model = load(tiny_dir, seerattn_mode="sparse", seerattn_sparsity_method="threshold", seerattn_threshold=0.0)
    x = ids()
    with torch.no_grad():
        out = model(x)
    assert out.density == 1.0
    torch.testing.assert_close(out.logits, base(x).logits, atol=1e-5, rtol=0)


def test_sparse_really_sparse(tiny_dir):
    model = load(tiny_dir, seerattn_nz_ratio=0.3)
    with torch.no_grad():
        out = model(ids(S=1000), labels=ids(S=1000))
    assert 0.2 < out.density < 0.45 and torch.isfinite(out.loss)


def test_distill_loss_and_grads_only_reach_gates(tiny_dir):
    model = load(tiny_dir, seerattn_mode="distill")
    model.freeze_base()
    out = model(ids(S=200))
    assert out.gate_losses.shape == (2,) and torch.isfinite(out.gate_losses).all()
    torch.testing.assert_close(out.loss, model.config.seerattn_gate_loss_scale * out.gate_losses.sum())
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".attn_gate." in name), name
    # the layer output is exact dense attention
    dense = load(tiny_dir, seerattn_mode="dense")
    with torch.no_grad():
        torch.testing.assert_close(model(ids(S=200)).logits, dense(ids(S=200)).logits, atol=1e-5, rtol=0)


def test_mse_loss_option(tiny_dir):
    model = load(tiny_dir, seerattn_mode="distill", seerattn_loss="mse")
    out = model(ids(S=130))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("mode", ["dense", "distill", "sparse"])
def test_padding_equals_unpadded(tiny_dir, mode):
    model = load(tiny_dir, seerattn_mode=mode, seerattn_nz_ratio=0.5)
    x = ids(S=300)
    mask = torch.ones_like(x)
    mask[1, :77] = 0  # left padding
    mask[0, 250:] = 0  # right padding
    with torch.no_grad():
        padded = model(x, attention_mask=mask)
        alone1 = model(x[1:, 77:]).logits
        alone0 = model(x[:1, :250]).logits
    torch.testing.assert_close(padded.logits[1:, 77:], alone1, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.logits[:1, :250], alone0, atol=1e-5, rtol=0)
    if mode == "distill":
        assert torch.isfinite(padded.loss)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_decode_with_cache(tiny_dir, mode):
    # prefill (sparse in sparse mode) then one dense decode step over the cache
    model = load(tiny_dir, seerattn_mode=mode, seerattn_nz_ratio=0.5)
    x = ids(B=1, S=200)
    with torch.no_grad():
        pre = model(x[:, :199], use_cache=True)
        torch.testing.assert_close(pre.logits, model(x[:, :199]).logits)
        step = model(x[:, 199:], past_key_values=pre.past_key_values, use_cache=True).logits
        if mode == "dense":
            torch.testing.assert_close(step[:, -1], model(x).logits[:, -1], atol=1e-5, rtol=0)
    assert torch.isfinite(step).all()
    gen = model.generate(x[:, :100], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 104)


def test_save_load_round_trip_gate_only(tiny_dir, tmp_path):
    model = load(tiny_dir, seerattn_nz_ratio=0.4)
    with torch.no_grad():
        for g in model.gate_modules():
            g.mask_linear_k.weight.normal_()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and "config.json" in files
    gate_bytes = os.path.getsize(tmp_path / "model.safetensors")
    base_bytes = sum(os.path.getsize(os.path.join(tiny_dir, f)) for f in os.listdir(tiny_dir) if f.endswith(".safetensors"))
    assert gate_bytes < 0.2 * base_bytes
    x = ids(S=400)
    for cls in (SeerLlamaForCausalLM, AutoModelForCausalLM):
        again = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert type(again) is SeerLlamaForCausalLM and again.config.seerattn_nz_ratio == 0.4
        with torch.no_grad():
            assert torch.equal(again(x).logits, model(x).logits)
    # keyword overrides reach the config
    again = SeerLlamaForCausalLM.from_pretrained(tmp_path, seerattn_nz_ratio=0.2)
    assert again.config.seerattn_nz_ratio == 0.2


def test_full_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SeerLlamaForCausalLM(SeerLlamaConfig(**tiny_llama_config().to_dict(), seerattn_min_sparse_length=0)).eval()
    assert model.config.base_model is None
    model.save_pretrained(tmp_path)  # no base_model: everything is saved
    again = SeerLlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(S=150)
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_fresh_gates_are_initialised(tiny_dir):
    model = load(tiny_dir)
    for g in model.gate_modules():
        w = g.mask_linear_k.weight
        assert torch.isfinite(w).all() and 0.015 < w.std().item() < 0.025


def test_bad_inputs(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="looked at"):
        SeerLlamaForCausalLM.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="seerattn_mode"):
        load(tiny_dir, seerattn_mode="fast")
    with pytest.raises(ValueError, match="valid gate types"):
        load(tiny_dir, seerattn_gate_type="Qfoo_Kbar")
    with pytest.raises(ValueError, match="attn_implementation"):
        load(tiny_dir, attn_implementation="sdpa")
    model = load(tiny_dir)
    model.save_pretrained(tmp_path / "gates")
    wrong = load(tiny_dir, seerattn_gate_type="Qavg_Kmax")  # different gate shape
    with pytest.raises(ValueError, match="layers.0.self_attn.attn_gate"):
        wrong.load_gates(tmp_path / "gates")
    with pytest.raises(FileNotFoundError, match="no gate weights"):
        model.load_gates(tmp_path)


def test_kernel_choice_is_explicit(monkeypatch):
    resolve = seer_attention_module.resolve_kernel
    assert resolve("auto", torch.device("cpu"), False) == "naive"
    assert resolve("auto", torch.device("cuda"), False) == "TopK"
    assert resolve("auto", torch.device("cuda"), True) == "CSR"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        resolve("TopK", torch.device("cpu"), False)
    with pytest.raises(RuntimeError, match="forward-only"):
        resolve("TopK", torch.device("cuda"), True)


def test_sparse_matches_twin_directly(tiny_dir):
    # one layer's sparse output equals the block-sparse twin on the mask the gate chose
    model = load(tiny_dir, seerattn_nz_ratio=0.3)
    captured = {}
    orig = seer_attention_module.block_sparse_attn_naive

    def spy(q, k, v, mask, scale, bs):
        captured["args"] = (q, k, v, mask, scale, bs)
        return orig(q, k, v, mask, scale, bs)

    seer_attention_module.block_sparse_attn_naive = spy
    try:
        with torch.no_grad():
            model(ids(B=1, S=640))
    finally:
        seer_attention_module.block_sparse_attn_naive = orig
    q, k, v, mask, scale, bs = captured["args"]
    assert mask.shape == (1, 4, 10, 10) and not mask.triu(1).any() and mask.diagonal(dim1=-2, dim2=-1).all()
    assert scale == pytest.approx(1 / math.sqrt(16))
    torch.testing.assert_close(orig(q, k, v, mask, scale, bs), block_sparse_attn_naive(q.double(), k.double(), v.double(), mask, scale, bs).float())


@pytest.mark.parametrize("kernel", ["TopK", "CSR"])
def test_triton_kernels_through_the_model(kernel, tmp_path):
    # CPU: the Triton kernels run under the interpreter (conftest); head_dim 64 as the kernels need
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    x = ids(B=1, S=200)
    outs = {}
    for impl in ("naive", kernel):
        torch.manual_seed(1)  # the same fresh gates for both
        model = load(str(tmp_path), seerattn_nz_ratio=0.5, seerattn_kernel_implementation=impl)
        with torch.no_grad():
            out = model(x)
        outs[impl] = (out.logits, out.density)
    torch.testing.assert_close(outs[kernel][0], outs["naive"][0], atol=1e-3, rtol=1e-3)
    assert outs[kernel][1] == pytest.approx(outs["naive"][1])


@pytest.mark.parametrize("loss", ["kl", "kl_top"])
def test_gate_designs_and_sparsity_methods_through_the_model(tiny_dir, tmp_path, loss):
    """Summary gates, pooled init, row-trimmed loss (KL or top-block KL): a distill step, a save/reload, every method."""
    model = load(
        tiny_dir, seerattn_mode="distill", seerattn_gate_q_summaries=4, seerattn_gate_k_summaries=2,
        seerattn_gate_init="pooled", seerattn_gate_loss_row_start=0.25, seerattn_loss=loss,
    )
    model.freeze_base()
    out = model(ids(S=300))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(g.mask_linear_k.weight.grad).all() for g in model.gate_modules())
    model.set_seerattn(seerattn_mode="sparse")
    model.save_pretrained(tmp_path)
    again = SeerLlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, seerattn_min_sparse_length=0).eval()
    assert again.config.seerattn_loss == loss
    x = ids(S=700)
    with torch.no_grad():
        assert torch.equal(again(x).logits, model.eval()(x).logits)
        densities = {}
        for method in ("nz_ratio", "adaptive", "threshold", "top_p"):
            again.set_seerattn(seerattn_sparsity_method=method, seerattn_nz_ratio=0.3, seerattn_threshold=0.05, seerattn_top_p=0.8)
            o = again(x, labels=x)
            assert torch.isfinite(o.loss), method
            densities[method] = o.density
    assert densities["adaptive"] <= densities["nz_ratio"] + 1e-9 < 1, densities


def test_cheaper_ground_truth_schedule(tiny_dir, monkeypatch):
    # gt_every_n_steps=2: forwards 0, 2 compute the pooled ground truth and have gate losses, 1 does not;
    # gt_layers_per_step=1: one of the two layers per such forward
    calls = []
    real = seer_attention_module._pooling_attention
    monkeypatch.setattr(seer_attention_module, "_pooling_attention", lambda *a: calls.append(1) or real(*a))
    model = load(tiny_dir, seerattn_mode="sparse", seerattn_nz_ratio=0.5, seerattn_gt_every_n_steps=2,
                 seerattn_gt_layers_per_step=1).train()  # fmt: skip
    n_losses = []
    for step in range(3):
        calls.clear()
        out = model(ids(B=1, S=200), labels=ids(B=1, S=200))
        out.loss.backward()
        n_losses.append((0 if out.gate_losses is None else len(out.gate_losses), len(calls)))
    assert n_losses == [(1, 1), (0, 0), (1, 1)]
    # the layer with ground truth rotates: forward 0 trains layer 0's gate, forward 2 layer 1's
    grads = [layer.self_attn.attn_gate.mask_linear_k.weight.grad for layer in model.model.layers]
    assert grads[0] is not None and grads[1] is not None


def test_seerattn_fields_validation():
    with pytest.raises(ValueError, match="seerattn_min_sparse_length"):
        SeerLlamaConfig(**tiny_llama_config().to_dict(), seerattn_min_sparse_length="short")
    with pytest.raises(ValueError, match="seerattn_gt_every_n_steps"):
        SeerLlamaConfig(**tiny_llama_config().to_dict(), seerattn_gt_every_n_steps=0)
    cfg = SeerLlamaConfig(**tiny_llama_config().to_dict(), seerattn_min_sparse_length="auto", seerattn_cuda_graphs=True)
    assert cfg.seerattn_min_sparse_length == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["nz_ratio", "adaptive"])
def test_cuda_graphs_replay_equals_eager(method):
    # head_dim 64 (the TopK kernel's and the fused gate's), every step free of host syncs
    torch.manual_seed(0)
    cfg = SeerLlamaConfig(**tiny_llama_config(hidden_size=256).to_dict(), seerattn_min_sparse_length=0,
                          seerattn_nz_ratio=0.5, seerattn_kernel_implementation="TopK", seerattn_sparsity_method=method)  # fmt: skip
    model = SeerLlamaForCausalLM(cfg).cuda().eval()
    x = ids(B=1, S=300).cuda()
    with torch.no_grad():
        eager = model(x, use_cache=False)
        model.set_seerattn(seerattn_cuda_graphs=True)
        first = model(x, use_cache=False)
        again = model(x, use_cache=False)
    assert model._cuda_graph is not None and model._cuda_graph.graph is not None
    torch.testing.assert_close(first.logits, eager.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.logits, eager.logits, atol=1e-4, rtol=0)
    assert abs(again.density - eager.density) < 1e-6


# distill packed: test_padding_equals_unpadded and tests/modules; "default": the default gate design
# (4 / 2 summaries per block, pooled init) with adaptive selection and its row floor
@pytest.mark.parametrize("mode,design,kernel", [("sparse", "classic", "CSR"), ("sparse", "default", "CSR"),
                                               ("sparse", "classic", "TopK")])
def test_padded_batch_runs_packed_and_equals_one_by_one(mode, design, kernel, tmp_path, monkeypatch):
    # a padded batch runs as one packed (varlen) call per layer; each row equals its sequence alone
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import seer_attn.models.modeling_seer as modeling

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    extra = {} if design == "classic" else dict(
        seerattn_gate_q_summaries=4, seerattn_gate_k_summaries=2, seerattn_gate_init="pooled", seerattn_sparsity_method="adaptive"
    )
    model = load(str(tmp_path), seerattn_mode=mode, seerattn_nz_ratio=0.5, seerattn_kernel_implementation=kernel, **extra)
    calls = []
    real_packed = modeling._seer_attention_packed
    monkeypatch.setattr(modeling, "_seer_attention_packed", lambda *a, **k: calls.append(1) or real_packed(*a, **k))
    x = ids(B=3, S=200)
    mask = torch.ones_like(x)
    mask[0, 135:] = 0  # right padding
    mask[1, :70] = 0  # left padding
    with torch.no_grad():
        padded = model(x, attention_mask=mask)
        alone = [model(x[:1, :135]), model(x[1:2, 70:]), model(x[2:])]
    assert len(calls) == 2  # one packed call per layer
    torch.testing.assert_close(padded.logits[:1, :135], alone[0].logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded.logits[1:2, 70:], alone[1].logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded.logits[2:], alone[2].logits, atol=1e-4, rtol=1e-4)
    if mode == "distill":
        torch.testing.assert_close(padded.loss, torch.stack([a.loss for a in alone]).mean(), atol=1e-5, rtol=1e-4)
    else:
        # realised density of the batch = kept blocks of the three sequences over their causal blocks
        tri = [math.ceil(n / 64) * (math.ceil(n / 64) + 1) // 2 for n in (135, 130, 200)]
        kept = sum(a.density * t for a, t in zip(alone, tri))
        assert padded.density == pytest.approx(kept / sum(tri))


@pytest.mark.parametrize("mode", ["dense", "sparse", "distill"])
def test_cross_document_off_equals_documents_alone(tiny_dir, mode):
    # a packed row with position ids restarting per document: with cross-document attention off each
    # document sees only itself and has its own gate blocks (none straddles a boundary), so the row
    # equals the documents run one by one; on (the default), later documents see earlier ones
    docs = [70, 100, 130]
    x = ids(B=1, S=sum(docs))
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    model = load(tiny_dir, seerattn_mode=mode, seerattn_nz_ratio=0.5, seerattn_cross_document=False)
    with torch.no_grad():
        packed = model(x, position_ids=pos)
        alone, a = [], 0
        for n in docs:
            alone.append(model(x[:, a : a + n]))
            a += n
        model.set_seerattn(seerattn_cross_document=True)
        crossing = model(x, position_ids=pos).logits
    torch.testing.assert_close(packed.logits, torch.cat([o.logits for o in alone], 1), atol=1e-5, rtol=0)
    assert not torch.allclose(crossing[:, docs[0]:], packed.logits[:, docs[0]:], atol=1e-3)
    if mode == "distill":
        torch.testing.assert_close(packed.loss, torch.stack([o.loss for o in alone]).mean(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cross_document"):
        model.set_seerattn(seerattn_cross_document="no")


def _embedded_shapes(model):
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    return shapes, hook


@pytest.mark.parametrize("mode", ["dense", "sparse", "distill"])
def test_padding_free_equals_padded_layout(tiny_dir, mode):
    # a padded cache-free batch runs its real tokens packed into one row (projections and MLPs skip
    # the padding): the same logits on real tokens, loss, density and gradients as the padded layout
    model = load(tiny_dir, seerattn_mode=mode, seerattn_nz_ratio=0.5)
    if mode == "sparse":
        model.train()  # sparse fine-tuning: LM loss + gate loss through the sparse path
    x = ids(B=3, S=200)
    mask = torch.ones_like(x)
    mask[0, 135:] = 0  # right padding
    mask[1, :70] = 0  # left padding
    labels = x.masked_fill(mask == 0, -100)
    labels[1, 70] = -100  # predicted from a padding position (garbage either way: zeros when padding-free)
    results = {}
    for free in (True, False):
        model.set_seerattn(seerattn_padding_free=free)
        model.zero_grad()
        shapes, hook = _embedded_shapes(model)
        out = model(x, attention_mask=mask, labels=labels, use_cache=False)
        hook.remove()
        assert shapes == ([(1, int(mask.sum()))] if free else [tuple(x.shape)])
        grads = None
        if out.loss.requires_grad:
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results[free] = (out, grads)
    (free, g_free), (padded, g_padded) = results[True], results[False]
    keep = mask.bool()
    torch.testing.assert_close(free.logits[keep], padded.logits[keep], atol=1e-5, rtol=1e-5)
    assert (free.logits[~keep] == 0).all()  # padding gets zero hidden states, so zero logits
    torch.testing.assert_close(free.loss, padded.loss, atol=1e-5, rtol=1e-5)
    if mode != "dense":
        assert free.density == pytest.approx(padded.density)
    if g_padded is not None:
        assert len(g_free) == len(g_padded) > 0
        for a, b in zip(g_free, g_padded):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padding_free_only_where_no_cache_is_kept(tiny_dir):
    model = load(tiny_dir, seerattn_mode="sparse", seerattn_nz_ratio=0.5)
    x = ids(B=2, S=150)
    mask = torch.ones_like(x)
    mask[0, 100:] = 0
    shapes, hook = _embedded_shapes(model)
    with torch.no_grad():
        model(x, attention_mask=mask, use_cache=False)  # padding-free
        cached = model(x, attention_mask=mask, use_cache=True)  # a cache in the padded layout is kept
        model(x, use_cache=False)  # nothing padded
        model(x, attention_mask=mask, use_cache=False, output_hidden_states=True)  # per-layer states asked for
    hook.remove()
    assert shapes == [(1, 250), (2, 150), (2, 150), (2, 150)]
    assert getattr(cached, "cache", None) is not None or getattr(cached, "past_key_values", None) is not None


@pytest.mark.parametrize("mode", ["sparse", "distill"])
def test_cu_seq_lens_keep_packed_sequences_apart(tiny_dir, mode):
    # transformers' padding-free collator (DataCollatorWithFlattening) passes cu_seq_lens_q/k with a
    # packed row: every sequence then attends within itself, whatever seerattn_cross_document says
    from transformers import DataCollatorWithFlattening

    docs = [70, 100, 130]
    x = ids(B=1, S=sum(docs))
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    cu = torch.tensor([0, 70, 170, 300], dtype=torch.int32)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": x[0, a : a + n].tolist()} for a, n in zip((0, 70, 170), docs)])
    assert torch.equal(batch["cu_seq_lens_q"], cu) and torch.equal(batch["position_ids"], pos)
    batch.pop("labels")
    model = load(tiny_dir, seerattn_mode=mode, seerattn_nz_ratio=0.5)
    with torch.no_grad():
        packed = model(**batch)
        alone = [model(x[:, a : a + n]) for a, n in zip((0, 70, 170), docs)]
        with pytest.raises(ValueError, match="cu_seq_lens_q must rise"):
            model(x, position_ids=pos, cu_seq_lens_q=torch.tensor([0, 70, 290], dtype=torch.int32))
        with pytest.raises(ValueError, match="cu_seq_lens_k only"):
            model(x, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 100, 170, 300], dtype=torch.int32))
        with pytest.raises(ValueError, match="one packed row"):
            model(x.expand(2, -1), cu_seq_lens_q=cu)
    torch.testing.assert_close(packed.logits, torch.cat([o.logits for o in alone], 1), atol=1e-5, rtol=0)
    if mode == "distill":
        torch.testing.assert_close(packed.loss, torch.stack([o.loss for o in alone]).mean(), atol=1e-6, rtol=1e-5)


def test_documents_without_a_packed_implementation_run_one_by_one(tiny_dir):
    # the pooled selector has no packed (varlen) path: documents kept apart run one call each
    model = load(tiny_dir, seerattn_mode="sparse", seerattn_nz_ratio=0.5, seerattn_selector="pooled",
                 seerattn_cross_document=False)
    docs = [70, 130]
    x = ids(B=1, S=sum(docs))
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    with torch.no_grad():
        packed = model(x, position_ids=pos).logits
        alone = torch.cat([model(x[:, :70]).logits, model(x[:, 70:]).logits], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_default_recipe_runs_sparse_with_adaptive_budget(tiny_dir):
    """The library defaults (4 query / 2 key summaries, pooled init, adaptive selection with a row
    floor) as a user gets them: a fresh gate already ranks like pooled attention, and the realised
    density stays under the per-row top-k's at the same nz_ratio."""
    model = SeerLlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, seerattn_min_sparse_length=0).eval()
    cfg = model.config
    assert (cfg.seerattn_gate_q_summaries, cfg.seerattn_gate_k_summaries, cfg.seerattn_gate_init, cfg.seerattn_sparsity_method) == (
        4, 2, "pooled", "adaptive"
    )
    x = ids(S=1000)
    with torch.no_grad():
        adaptive = model(x, labels=x).density
        model.set_seerattn(seerattn_sparsity_method="nz_ratio")
        topk = model(x, labels=x).density
    assert adaptive <= topk < 1


def test_compiled_gate_training_path_matches_eager(tiny_dir):
    # seerattn_compile_gate: the gate's scoring + loss as one torch.compile graph; same loss and gradients
    x = ids(S=300)
    losses, grads = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = load(tiny_dir, seerattn_mode="distill", seerattn_compile_gate=compiled)
        model.freeze_base()
        out = model(x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for g in model.gate_modules() for p in g.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


def test_chunked_causal_lm_loss_takes_fp32_hidden_with_bf16_head():
    """FSDP2 with fp32 outputs gives fp32 hidden states beside a bf16 (gathered) head weight."""
    from seer_attn.models import chunked_causal_lm_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[0, :5] = -100
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk=8)
    loss.backward()
    h = hidden.detach()[:, :-1].bfloat16()
    logits = torch.nn.functional.linear(h, weight.detach()).float()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_static_cache_generation_equals_dynamic(tiny_dir, base, mode):
    # a preallocated cache hands the attention all of its slots, the empty ones as zeros: only the filled
    # part is attention's sequence (dense mode attended to the empty slots before: scores off by 0.04)
    model = load(tiny_dir, seerattn_mode=mode, seerattn_nz_ratio=0.5, seerattn_min_sparse_length=0)
    x = ids(B=1, S=150)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    dyn = model.generate(x, **kw)
    static = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dyn.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dyn.scores), atol=1e-5, rtol=0)
    if mode == "dense":
        ref = base.generate(x, **kw)
        torch.testing.assert_close(torch.stack(dyn.scores), torch.stack(ref.scores), atol=1e-4, rtol=0)
    padded = torch.cat([torch.zeros(1, 3, dtype=x.dtype), x], 1)
    with pytest.raises(NotImplementedError, match="padded batch"):
        model.generate(padded, attention_mask=(padded != 0).long(), max_new_tokens=2, cache_implementation="static",
                       pad_token_id=0)  # fmt: skip


def test_kv_cache_argument_takes_either_name(tiny_dir):
    # transformers 5.2x calls the KV cache `cache` (`past_key_values` a deprecated alias): both reach the layers
    from transformers import DynamicCache

    model = load(tiny_dir, seerattn_mode="dense")
    x = ids(B=1, S=100)
    with torch.no_grad():
        full = model(x).logits[:, -1]
        for name in ("cache", "past_key_values"):
            pre = model(x[:, :99], use_cache=True)
            cached = pre.cache if hasattr(pre, "cache") else pre.past_key_values
            step = model(x[:, 99:], use_cache=True, **{name: cached}).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="once"):
            model(x[:, 99:], use_cache=True, cache=DynamicCache(), past_key_values=DynamicCache())
