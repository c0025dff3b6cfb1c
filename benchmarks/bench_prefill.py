"""End-to-end prefill latency (time to first token) of a Seer model (any family): dense SDPA vs SeerAttention.

Kernel speedups alone overstate what a user gets: this times the whole model forward (embeddings,
MLPs, gates, block selection, LM head on the last position) at one length, batch 1, on the GPU.

    python benchmarks/bench_prefill.py --model smollm2-135m --yarn-factor 4 --length 32768 \
        --nz-ratios 0.5,0.1 --out benchmarks/results/prefill.json

`--model` may be a plain model of any supported family, a fine-tuned or gated checkpoint, or
`--config-json` a config (plain or Seer, any supported family, e.g. a Qwen2.5-7B `config.json`) whose
architecture is timed with random weights (timings do not depend on the weights; no model file is
needed). Medians of CUDA-event timings; ratios are against the dense forward of the same run.

`--train` also times one training step (forward + backward, batch 1, gradient checkpointing,
bf16 autocast over fp32 weights, as `seer_attn.training.finetune` runs it): dense vs sparse
fine-tuning with the gate loss, at each nz_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from transformers import AutoConfig

from seer_attn import AutoSeerForCausalLM
from seer_attn.models import apply_yarn


def time_forward(model, ids, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of `model(ids, logits_to_keep=1)` under no_grad."""
    times = []
    with torch.no_grad():
        for i in range(warmup + reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            model(ids, logits_to_keep=1, use_cache=False)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_train_step(model, ids, warmup: int = 1, reps: int = 3) -> float:
    """Median milliseconds of forward + backward of `model(ids, labels=ids)` under bf16 autocast."""
    times = []
    for i in range(warmup + reps):
        model.zero_grad(set_to_none=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, logits_to_keep=1, use_cache=False)
        out.loss.backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--yarn-factor", type=float, default=None, help="apply YaRN to a plain model first")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--nz-ratios", default="0.5,0.1")
    p.add_argument("--kernel", default="TopK", help="seerattn_kernel_implementation for the sparse runs")
    p.add_argument("--config-json", default=None, help="time this architecture (config.json of any supported family) with random weights")
    p.add_argument("--train", action="store_true", help="also time a fine-tuning step (fwd + bwd)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the sparse forward at the last nz_ratio")
    p.add_argument("--out", default="benchmarks/results/prefill.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill.py needs a CUDA GPU")

    if args.config_json:
        fields = json.loads(Path(args.config_json).read_text())
        config = AutoSeerForCausalLM.seer_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        args.model = f"{args.config_json} (random weights)"
    else:
        config = AutoSeerForCausalLM.config_from(args.model)
    if args.yarn_factor:
        apply_yarn(config, args.yarn_factor)
    if args.length > config.max_position_embeddings:
        raise SystemExit(f"--length {args.length} exceeds max_position_embeddings {config.max_position_embeddings}")
    config.seerattn_min_sparse_length = 0
    if args.config_json:
        torch.manual_seed(0)
        model = AutoSeerForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    else:
        model = AutoSeerForCausalLM.from_pretrained(args.model, config=config, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(100, config.vocab_size - 1, (1, args.length), device="cuda")

    rows = []
    model.set_seerattn(seerattn_mode="dense")
    dense_ms = time_forward(model, ids)
    rows.append({"method": "dense (SDPA)", "nz_ratio": 1.0, "density": 1.0, "ms": dense_ms, "speedup": 1.0})
    for nz in [float(x) for x in args.nz_ratios.split(",")]:
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=nz, seerattn_kernel_implementation=args.kernel)
        ms = time_forward(model, ids)
        with torch.no_grad():
            density = model(ids, logits_to_keep=1, use_cache=False).density
        rows.append({"method": f"seer ({args.kernel})", "nz_ratio": nz, "density": density, "ms": ms, "speedup": dense_ms / ms})

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if args.train:
        model = model.float().train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.set_seerattn(seerattn_mode="dense")
        dense_step = time_train_step(model, ids)
        rows.append({"method": "train step, dense", "nz_ratio": 1.0, "density": 1.0, "ms": dense_step, "speedup": 1.0})
        for nz in [float(x) for x in args.nz_ratios.split(",")]:
            model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=nz, seerattn_kernel_implementation="auto")
            ms = time_train_step(model, ids)
            rows.append({"method": "train step, seer (CSR + gate loss)", "nz_ratio": nz, "density": nz, "ms": ms, "speedup": dense_step / ms})

    meta = {
        "model": args.model,
        "length": args.length,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "yarn_factor": args.yarn_factor,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"prefill, {args.model}, S={args.length}, {meta['gpu']}, torch {meta['torch']}")
    print("| method | nz_ratio | realised density | ms | speedup vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['nz_ratio']} | {r['density']:.3f} | {r['ms']:.1f} | {r['speedup']:.2f}x |")
    print("(train-step rows: density column is the target nz_ratio)") if args.train else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
