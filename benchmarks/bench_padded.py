"""Model forward on a padded batch of mixed-length sequences vs the same tokens packed (issue 10 target).

    PYTHONPATH=$PWD python benchmarks/bench_padded.py                    # SmolLM2-135M architecture, random weights
    PYTHONPATH=$PWD python benchmarks/bench_padded.py --nz-ratio 0.5 --lengths 32768 4096 16384
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/bench_padded.py --smoke   # CPU self-test

Times `model(ids, logits_to_keep=1, use_cache=False)` (sparse mode, `seerattn_min_sparse_length=0`):
- padded, padding-free (the default, `seerattn_padding_free=True`): `[n, max_len]` with right padding
  and an attention mask; the model packs the real tokens into one row before the embeddings, so
  nothing runs on padding; TopK (`auto` for inference) and CSR;
- padded layout (`seerattn_padding_free=False`): projections and MLPs run on the padding too
  (`n * max_len / total` of their work), the attention on the real tokens only (the packed
  (varlen) path, one `seer_attention_varlen` call per layer);
- packed: the same tokens as one row, position ids restarting per sequence, `seerattn_cross_document
  =False` (identical results: every sequence attends to itself only), TopK;
- alone: every sequence in its own forward (TopK), summed: what a loop over the batch costs.
Medians of CUDA-event timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from seer_attn import SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.models import apply_yarn


def timed(fn, device, warmup=1, reps=3) -> float:
    times = []
    with torch.no_grad():
        for i in range(warmup + reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t = time.perf_counter()
                fn()
                ms = 1e3 * (time.perf_counter() - t)
            if i >= warmup:
                times.append(ms)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-json", default="configs/smollm2_135m_llama_config.json")
    p.add_argument("--yarn-factor", type=float, default=4.0)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 4096, 16384, 8192, 24576, 6144, 12288, 20480])
    p.add_argument("--nz-ratio", type=float, default=0.1)
    p.add_argument("--design", choices=("classic", "default"), default="classic",
                   help="classic: one summary per block, per-row top-k (the packed varlen path); default: the "
                        "library's default gate (4 / 2 summaries, adaptive), whose CUDA inference runs each "
                        "sequence through the fused gate kernel")
    p.add_argument("--out", default="benchmarks/results/bench_padded.json")
    p.add_argument("--smoke", action="store_true", help="CPU self-test: tiny model and lengths, kernels interpreted")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_padded.py needs a CUDA GPU (or --smoke)")

    config = SeerLlamaConfig.from_json_file(args.config_json)
    if args.smoke:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 256, 512
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
        args.lengths, args.yarn_factor = [200, 65, 130], None
    if args.yarn_factor:
        apply_yarn(config, args.yarn_factor)
    config.seerattn_min_sparse_length = 0
    if args.design == "classic":
        config.seerattn_gate_q_summaries = config.seerattn_gate_k_summaries = 1
    torch.manual_seed(0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = SeerLlamaForCausalLM(config).to(device, dtype).eval()
    lens, n, S = args.lengths, len(args.lengths), max(args.lengths)
    total = sum(lens)
    ids = torch.randint(100, config.vocab_size - 1, (n, S), device=device)
    mask = (torch.arange(S, device=device)[None] < torch.tensor(lens, device=device)[:, None]).long()
    packed_ids = ids[mask.bool()][None]
    packed_pos = torch.cat([torch.arange(m, device=device) for m in lens])[None]
    sparse = dict(seerattn_mode="sparse", seerattn_nz_ratio=args.nz_ratio,
                  seerattn_sparsity_method="nz_ratio" if args.design == "classic" else "adaptive")

    rows = {}
    model.set_seerattn(**sparse, seerattn_cross_document=True)
    for free, kernels in ((True, ("TopK", "CSR")), (False, ("TopK", "CSR"))):
        model.set_seerattn(seerattn_padding_free=free)
        for kernel in kernels:
            model.set_seerattn(seerattn_kernel_implementation=kernel)
            name = "padded, padding-free" if free else "padded layout (padding_free off), packed attention"
            rows[f"{name}, {kernel}"] = timed(
                lambda: model(ids, attention_mask=mask, logits_to_keep=1, use_cache=False), device)
    model.set_seerattn(seerattn_padding_free=True, seerattn_kernel_implementation="TopK")
    with torch.no_grad():
        density = model(ids, attention_mask=mask, logits_to_keep=1, use_cache=False).density
    model.set_seerattn(seerattn_cross_document=False, seerattn_kernel_implementation="TopK")
    rows["packed (one row, cross-document off, TopK)"] = timed(
        lambda: model(packed_ids, position_ids=packed_pos, logits_to_keep=1, use_cache=False), device)
    model.set_seerattn(seerattn_cross_document=True)
    rows["alone, summed (TopK)"] = sum(
        timed(lambda: model(ids[i : i + 1, : lens[i]], logits_to_keep=1, use_cache=False), device) for i in range(n))

    base = rows["packed (one row, cross-document off, TopK)"]
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "config": args.config_json, "lengths": lens, "nz_ratio": args.nz_ratio, "design": args.design, "density": density,
            "padding_overhead_tokens": n * S / total}
    print(f"{meta['device']}, torch {meta['torch']}, lengths {lens} (padded/real tokens {n * S / total:.2f}), "
          f"design {args.design}, nz_ratio {args.nz_ratio}, realised density {density:.3f}")
    print("| run | ms | / packed |")
    print("|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "ms": rows}, indent=2))


if __name__ == "__main__":
    main()
