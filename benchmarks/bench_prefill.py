"""End-to-end prefill latency (time to first token) of a SeerLlama: dense SDPA vs SeerAttention.

Kernel speedups alone overstate what a user gets: this times the whole model forward (embeddings,
MLPs, gates, block selection, LM head on the last position) at one length, batch 1, on the GPU.

    python benchmarks/bench_prefill.py --model smollm2-135m --yarn-factor 4 --length 32768 \
        --nz-ratios 0.5,0.1 --out benchmarks/results/prefill.json

`--model` may be a fine-tuned or gated checkpoint. Medians of CUDA-event timings; ratios are
against the dense forward measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from seer_attn import SeerLlamaForCausalLM
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--yarn-factor", type=float, default=None, help="apply YaRN to a plain model first")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--nz-ratios", default="0.5,0.1")
    p.add_argument("--kernel", default="TopK", help="seerattn_kernel_implementation for the sparse runs")
    p.add_argument("--out", default="benchmarks/results/prefill.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill.py needs a CUDA GPU")

    config = SeerLlamaForCausalLM.config_from(args.model)
    if args.yarn_factor:
        apply_yarn(config, args.yarn_factor)
    if args.length > config.max_position_embeddings:
        raise SystemExit(f"--length {args.length} exceeds max_position_embeddings {config.max_position_embeddings}")
    model = SeerLlamaForCausalLM.from_pretrained(args.model, config=config, dtype=torch.bfloat16).cuda().eval()
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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
