#!/usr/bin/env python
"""Compile seer_attn's Triton kernels ahead of time for CUDA sm_90 with triton 3.6.0, on a machine without a GPU.

Why: the tests run the kernels under the Triton interpreter (TRITON_INTERPRET=1, local triton 3.9), which never
lowers them. A kernel can pass there and still fail to *compile* with the GPU machine's triton 3.6.0
(CompilationError, an MLIR pass, ptxas, too much shared memory), which we would only learn on the scarce H100.
This runs the real pipeline (ttir -> ttgir -> llir -> ptx -> cubin, with the ptxas bundled in the wheel).

Setup, once (leaves the main environment's triton alone):
    pip download triton==3.6.0 --no-deps -d /tmp/tr36
    pip install --no-deps --target /tmp/tr36site /tmp/tr36/triton-3.6.0-*.whl
Run from the repository root:
    PYTHONPATH=/tmp/tr36site:. python tools/compile_sm90.py [--only REGEX] [-v]
    python tools/compile_sm90.py --triton-site /tmp/tr36site [--only REGEX] [-v]
One line per (kernel, variant): `ok regs=.. spill=.. smem=..` or `FAIL: <error> [file:line: source]`;
exit status 1 if any fails. `-v` prints the full error and compiler output of failures.

How (triton 3.6 API): triton.compile never touches the CUDA driver when given an explicit target; only launching
(CompiledKernel._init_handles) does. The signature, constexprs and attrs are computed exactly as JITFunction.run
does it, with the binder of triton.runtime.jit.create_function_from_signature (native specialize_impl on small
fake CPU tensors: pointer dtype, 16-byte alignment, integers equal to 1 become constexprs, multiples of 16 get
tt.divisibility) and JITFunction._pack_args, then
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=...).
A host-side TensorDescriptor becomes the signature string "tensordesc<bf16[1, 1, 64, 128]>" (element type and
block shape only). Shared memory is checked here against the H100's 232448 bytes per block, the check the
launcher would do (OutOfResources). Note that the autotuner silently skips a config failing with OutOfResources
or PTXASError (only CompilationError reaches the caller); this script reports every config.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import itertools
import os
import re
import shutil
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SMEM = 232448  # H100: 227 KB of shared memory per block (opt-in)


@contextlib.contextmanager
def capture_fds(out: list):
    """Collect what C++ passes, ptxas logs and triton's prints write to fds 1 and 2."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1), os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            for fd, s in ((1, saved[0]), (2, saved[1])):
                os.dup2(s, fd), os.close(s)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def variants():
    """(name, JITFunction, args, kwargs) as the host wrappers launch them (bf16, B=2, Hq=4, Hkv=2, S=1024)."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor
    from seer_attn.kernels import attn_pooling_kernel as ap, block_sparse_attn_topk as tk

    B, HQ, HKV, S, bf, i32 = 2, 4, 2, 1024, torch.bfloat16, torch.int32
    G, scale, cu = HQ // HKV, 0.125 * 1.4426950408889634, torch.tensor([0, S, 2 * S], dtype=i32)

    @functools.lru_cache(maxsize=None)
    def qkvo(D, varlen):  # packed: the [1, H, total, D] views of [total, H, D] that _check_varlen makes
        mk = (lambda h: torch.empty(B * S, h, D, dtype=bf).unsqueeze(0).transpose(1, 2)) if varlen else (
            lambda h: torch.empty(B, h, S, D, dtype=bf))
        return mk(HQ), mk(HKV), mk(HKV), mk(HQ)

    def descs(ts, tma, rows):  # host TensorDescriptors over [B or 1, H, S or total, D] with [1, 1, rows, D] blocks
        return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[3]]) if tma else t
                for t in ts]

    def sb(t, varlen):  # host: batch stride 0 for packed sequences, (b, h, t, d) strides otherwise
        return (0 if varlen else t.stride(0), *t.stride()[1:])

    bools = (False, True)
    for tma, varlen, D in itertools.product(bools, bools, (64, 128)):  # pass 1: _forward_lse
        q, k, v, o = qkvo(D, varlen)
        T = q.shape[2]
        lse = torch.empty(HQ, T) if varlen else torch.empty(B, HQ, S)
        for i, c in enumerate(ap._prune_fwd(ap.attn_pooling_fwd_kernel.configs, {}, D=D)):
            for causal in (True, False) if i == 0 else (True,):
                dk, dv = descs((k, v), tma, c.kwargs["BN"])
                args = (q, k, v, o, lse, cu if varlen else lse, dk, dv, *sb(q, varlen), *sb(k, varlen), *sb(v, varlen),
                        *sb(o, varlen), *((0, T) if varlen else (HQ * S, S)), scale, T, ap.len_bucket(S))
                kw = dict(HQ=HQ, G=G, D=D, IS_CAUSAL=causal, VARLEN=varlen, TMA=tma, DOT_PREC="tf32", **c.kwargs,
                          num_warps=c.num_warps, num_stages=c.num_stages)
                yield (f"attn_pooling_fwd_kernel tma={tma:d} varlen={varlen:d} D={D} causal={causal:d} "
                       f"BM={c.kwargs['BM']} BN={c.kwargs['BN']} w{c.num_warps}s{c.num_stages}",
                       ap.attn_pooling_fwd_kernel.fn, args, kw)
    for tma, varlen, D, BS in itertools.product(bools, bools, (64, 128), (64, 128)):  # pass 2: _pool
        q, k, _, _ = qkvo(D, varlen)
        T, nb = q.shape[2], S // BS
        lse = torch.empty(HQ, T) if varlen else torch.empty(B, HQ, S)
        pooled = torch.empty(B, HQ, nb, nb)
        for i, c in enumerate(ap._prune_pool(ap.attn_pooling_fwd_kernel_pool.configs, {}, BS=BS)):
            for causal, mass in ((True, False), (True, True), (False, False)) if i == 0 else ((True, False),):
                args = (q, k, lse, pooled, cu if varlen else lse, descs((k,), tma, BS)[0], *sb(q, varlen),
                        *sb(k, varlen), *((0, T) if varlen else (HQ * S, S)), scale, T, nb, ap.len_bucket(nb * BS))
                kw = dict(HQ=HQ, G=G, D=D, BS=BS, IS_CAUSAL=causal, MASS=mass, VARLEN=varlen, TMA=tma,
                          DOT_PREC="tf32", **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                yield (f"attn_pooling_fwd_kernel_pool tma={tma:d} varlen={varlen:d} D={D} BS={BS} causal={causal:d} "
                       f"mass={mass:d} R={c.kwargs['R']} C={c.kwargs['C']} w{c.num_warps}s{c.num_stages}",
                       ap.attn_pooling_fwd_kernel_pool.fn, args, kw)

    def topk(kernel, tma, varlen, D, BS=64, nj=1, lpt=False, ws=False, w=4, s=3):  # as launch_topk_fwd
        q, k, v, o = qkvo(D, varlen)
        nb, K = S // BS, 8
        idx, num = torch.empty(B, HQ, nb, K, dtype=i32), torch.empty(B, HQ, nb, dtype=i32)
        tail = (*descs((k, v), tma, BS), cu if varlen else num, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                scale, S, nb)
        kw = dict(D=D, BS=BS, TMA=tma, LPT=lpt, WS=ws, VARLEN=varlen, DOT_PREC="tf32", num_warps=w, num_stages=s)
        if kernel == "row":
            n = B * HQ * nb
            fn, args, kw = tk.block_sparse_attn_topk_fwd_row_kernel, (idx, num, num.view(-1), *tail, K, HQ, G, n), dict(
                kw, NJ=nj)
        elif kernel == "dual":
            NP = (nb + 1) // 2
            n = B * HQ * NP
            fn, args = tk.block_sparse_attn_topk_fwd_dual_kernel, (idx, num, num.new_empty(n), *tail, K, HQ, G, NP, n)
        else:  # pair / headpair: merged lists from _pair_lists
            NP = G // 2 if kernel == "headpair" else (nb + 1) // 2
            n = B * HKV * NP * nb if kernel == "headpair" else B * HQ * NP
            u_idx, u_num = torch.empty(n, min(2 * K, nb), dtype=i32), torch.empty(n, dtype=i32)
            fn, args = tk.block_sparse_attn_topk_fwd_pair_kernel, (u_idx, u_num, u_num, *tail, u_idx.shape[1], HQ, G,
                                                                    NP, n)
            kw = dict(kw, HEADS=kernel == "headpair")
        args = (q, k, v, o, *args)
        extra = "".join(f" {x}" for x, on in (("heads", kernel == "headpair"), (f"nj={nj}", nj != 1), ("lpt", lpt),
                                                ("ws", ws)) if on)
        return (f"{fn.__name__} tma={tma:d} varlen={varlen:d} D={D} BS={BS}{extra} w{w}s{s}", fn, args, kw)

    for kernel, tma, varlen, D in itertools.product(("row", "dual", "pair", "headpair"), bools, bools, (64, 128)):
        yield topk(kernel, tma, varlen, D, w=8 if "pair" in kernel else 4)
    for D in (64, 128):  # the other settings benchmarks/sweep_topk.py tries
        yield topk("row", False, False, D, nj=2)
        yield topk("row", True, False, D, lpt=True)
        yield topk("row", True, False, D, BS=128)
        yield topk("row", False, False, D, ws=True)
        yield topk("pair", True, False, D, ws=True, w=8)

    yield from decode_gate_variants()


def decode_gate_variants():
    """`decode_gate_step_kernel` launched exactly as `decode_gate_step` launches it (its arguments captured
    from a call of the wrapper on small CPU tensors): the model shapes and the tests' odd designs."""
    import torch
    from seer_attn.kernels import decode_gate_kernel as dg

    captured = []

    class Capture:
        def __getitem__(self, grid):
            return lambda *args, **kw: captured.append((args, kw))

    real, dg.decode_gate_step_kernel = dg.decode_gate_step_kernel, Capture()
    os.environ["TRITON_INTERPRET"] = "1"  # (the wrapper's device check; nothing is launched)
    try:
        for hq, hkv, D, dg_w, ks, pools, norm, select, thr, *keep in (
            (9, 3, 64, 64, 1, ("max", "min", "avg"), True, True, None),  # SmolLM2, the default decode gate
            (9, 3, 64, 64, 1, ("max", "min", "avg"), True, True, None, True, 2),  # + sink and recent blocks kept
            (9, 3, 64, 64, 1, ("max", "min", "avg"), True, False, None),  # a state-only step (below min_context)
            (32, 8, 128, 128, 1, ("max", "min", "avg"), True, True, None),  # Llama-3-8B
            (32, 8, 128, 128, 1, ("max", "min", "avg"), True, True, 0.01),  # threshold
            (4, 1, 128, 64, 4, ("max", "avg"), True, True, None),  # needed 264 KB before channel chunks
            (4, 2, 64, 32, 2, ("max", "min", "avg"), False, True, None),
            (8, 1, 128, 128, 8, ("max", "min", "avg"), True, True, None),  # the largest pooled product
        ):
            B, bs = 2, 64
            e = lambda *shape, dt=torch.bfloat16: torch.empty(*shape, dtype=dt)  # noqa: E731
            w = torch.empty(dg_w)
            dg.decode_gate_step(
                e(B, hq, 1, D), e(B, hkv, 1, D), torch.zeros(B, dtype=torch.long), e(B, hkv, bs, D),
                e(B, hkv, 2100 * ks, dg_w, dt=torch.float32), e(hkv, len(pools) * D, dg_w), e(hq, D, dg_w),
                w if norm else None, w if norm else None, torch.empty(dg_w // 2), 1.0, pools, ks,
                token_budget=2048, threshold=thr, select=select, keep_sink=bool(keep and keep[0]),
                keep_recent=keep[1] if keep else 0,
            )  # fmt: skip
            args, kw = captured.pop()
            name = (f"decode_gate_step_kernel Hq={hq} Hkv={hkv} D={D} Dg={dg_w} ks={ks} pools={'+'.join(pools)} "
                    f"select={select:d} {'threshold' if thr else 'topk'}{' keep' if keep else ''}")
            yield name, real, args, kw
    finally:
        dg.decode_gate_step_kernel = real
        os.environ.pop("TRITON_INTERPRET", None)


def source_map():
    """JIT function source -> (file, line of its `def`), to turn a CompilationError's node into a file line."""
    import triton
    from seer_attn.kernels import attn_pooling_kernel, block_sparse_attn_topk
    out = {}
    for mod in (attn_pooling_kernel, block_sparse_attn_topk):
        for obj in vars(mod).values():
            obj = getattr(obj, "fn", obj) if isinstance(obj, triton.runtime.Autotuner) else obj
            if isinstance(obj, triton.runtime.JITFunction):
                first = next(i for i, l in enumerate(obj.raw_src) if re.match(r"\s*def\s", l))
                out[obj.src] = (os.path.relpath(mod.__file__, REPO), obj.starting_line_number + first)
    return out


def describe(e: BaseException, log: str, srcmap: dict) -> str:
    """`Type: message | first other line mentioning an error [file:line: source line]`, of the innermost cause."""
    from triton.compiler.errors import CompilationError
    chain, x = [], e
    while x is not None:
        chain.append(x)
        x = x.__cause__  # (explicit `raise ... from e`: the code generator's wrapping of the real error)
    inner = chain[-1]
    ce = [c for c in chain if isinstance(c, CompilationError)]
    text = (ce[-1].error_message if ce and ce[-1].error_message else None) or str(inner) or repr(inner)
    lines = [ln.strip() for ln in (text + "\n" + log).splitlines() if ln.strip()]
    msg = f"{type(inner).__name__}: {lines[0] if lines else ''}"
    detail = next((ln for ln in lines[1:] if re.search(r"error|fatal", ln, re.I) and ln not in msg), None)
    if detail:
        msg += f" | {detail}"
    if ce and getattr(ce[-1].node, "lineno", None):
        c = ce[-1]
        f, line0 = srcmap.get(c.src, ("?", 1))
        msg += f"  [{f}:{line0 + c.node.lineno - 1}: {c.src.splitlines()[c.node.lineno - 1].strip()}]"
    return msg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="compile only the variants whose name matches this regex (re.search)")
    ap.add_argument("--triton-site", help="directory holding triton 3.6.0 (put first on sys.path)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the full error and compiler output of failures")
    a = ap.parse_args()
    if a.triton_site:
        sys.path.insert(0, os.path.abspath(a.triton_site))
    sys.path.insert(1 if a.triton_site else 0, REPO)
    os.environ.pop("TRITON_INTERPRET", None)  # (it would collapse the autotune configs to one)
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="triton36_sm90_")  # fresh: ptxas always runs
    atexit.register(shutil.rmtree, cache, True)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), target cuda sm_90", flush=True)
    if not triton.__version__.startswith("3.6."):
        print("warning: not triton 3.6; set PYTHONPATH or --triton-site", file=sys.stderr)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    srcmap, n_fail, n_run = source_map(), 0, 0
    for name, fn, args, kw in variants():
        if a.only and not re.search(a.only, name):
            continue
        n_run, log = n_run + 1, []
        try:
            with capture_fds(log):
                bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kw)
                options, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
                ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)
            regs = re.findall(r"Used (\d+) registers", log[0])
            spill = re.findall(r"(\d+) bytes spill stores", log[0])
            status = f"ok   regs={regs[-1] if regs else '?'} spill={spill[-1] if spill else '?'} "
            status += f"smem={ck.metadata.shared}"
            if ck.metadata.shared > MAX_SMEM:
                status = f"FAIL: OutOfResources: shared memory {ck.metadata.shared} > {MAX_SMEM} (would not launch)"
        except Exception as e:  # noqa: BLE001 (every failure is reported, the sweep goes on)
            status = "FAIL: " + describe(e, log[0] if log else "", srcmap)
            if a.verbose:
                print("".join(traceback.format_exception(e)) + (log[0] if log else ""), flush=True)
        n_fail += status.startswith("FAIL")
        print(f"{name:<88} {status}", flush=True)
    print(f"{n_run - n_fail}/{n_run} compiled", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
