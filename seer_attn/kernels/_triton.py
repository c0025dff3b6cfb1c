"""Shared plumbing for the Triton kernels: interpreter detection, autotune pruning, input checks.

CI has no GPU, so every kernel must also run under the Triton interpreter (``TRITON_INTERPRET=1``)
on CPU tensors. This module is the single place that knows about it (the Fast-LLM pattern): under
the interpreter autotuning collapses to one config and CPU tensors are accepted; elsewhere inputs
must live on a CUDA device.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_interpreter", "prune_configs", "check_attn_inputs", "dot_precision", "use_tma"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (64, 128)


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prune_configs(configs: list) -> list:
    """Autotune candidates: all of them on a GPU, only the first under the interpreter."""
    return configs[:1] if is_interpreter() else configs


def use_tma(*ts: torch.Tensor) -> bool:
    """Hopper tensor descriptors (TMA loads) apply to these tensors: Triton has them, the GPU is sm90+
    (or the interpreter, which emulates them), every stride but the last 16-byte aligned.
    `SEER_ATTN_NO_TMA=1` turns them off everywhere (plain loads; for A/B timings)."""
    if os.environ.get("SEER_ATTN_NO_TMA", "0") not in ("", "0"):
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
        import triton.language as tl
    except ImportError:
        return False
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not is_interpreter() and (ts[0].device.type != "cuda" or torch.cuda.get_device_capability(ts[0].device)[0] < 9):
        return False
    for t in ts:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 inputs (tests), tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_attn_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Validate `q [B, Hq, S, D]`, `k, v [B, Hkv, S, D]` for a kernel entry point; raise naming the problem."""
    for t_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {t_name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {t_name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: {t_name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, length or head_dim")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"{name}: query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")
    if D not in _HEAD_DIMS:
        raise ValueError(f"{name}: head_dim must be one of {_HEAD_DIMS}, got {D}")
    if S == 0 or B == 0:
        raise ValueError(f"{name}: empty input, shape {tuple(q.shape)}")
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"{name}: block_size must be 16, 32, 64 or 128, got {block_size}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"{name}: needs CUDA tensors (got {q.device}); use seer_attn.kernels.naive on CPU")
