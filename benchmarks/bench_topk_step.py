"""Compare `block_sparse_attn_topk` with one or two kept key blocks per inner step (GPU).

Usage: python benchmarks/bench_topk_step.py
Prints the median ms of both settings at 32k for the Llama and SmolLM2 shapes, densities 1.0 and 0.1.
"""

import math

import torch
import triton

from seer_attn.kernels import block_sparse_attn_topk as topk_mod
from seer_attn.kernels.block_mask import mask_to_indices

from bench_attention import SHAPES, random_block_mask


def main() -> None:
    S = 32768
    for name, (Hq, Hkv, D) in SHAPES.items():
        q = torch.randn(1, Hq, S, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        for d in (1.0, 0.1):
            idx = mask_to_indices(random_block_mask(1, Hq, math.ceil(S / 64), d, "cuda"))
            res = {}
            default = topk_mod.BLOCKS_PER_STEP[D]
            for nj in (1, 2):
                topk_mod.BLOCKS_PER_STEP[D] = nj
                res[nj] = triton.testing.do_bench(lambda: topk_mod.block_sparse_attn_topk(q, k, v, idx), return_mode="median")
            topk_mod.BLOCKS_PER_STEP[D] = default
            print(f"{name} S={S} d={d}: 1 block/step {res[1]:.3f} ms, 2 blocks/step {res[2]:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
