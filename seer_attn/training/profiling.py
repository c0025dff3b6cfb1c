"""Where a training step's time goes: `torch.profiler` over a few steady-state optimizer steps.

`--profile_steps n` (distillation and fine-tuning) profiles steps `warmup + 1 ... warmup + n` on
rank 0 and writes `<output_dir>/profile.json` and `profile.txt`:

- `wall_s`: wall time of the profiled steps (synchronised at both ends);
- `device_busy_s`: how long at least one device kernel was running (the union of the kernels'
  intervals; CUDA only, 0 on CPU): with `wall_s` it says how much of a step the GPU sits idle
  (launch gaps, host syncs, data loading); `device_kernel_sum_s` adds the kernels' times up, which
  counts twice what overlaps (NCCL on its own stream beside compute);
- `host_ops`: the ops with the largest self CPU time, `device_kernels`: the kernels with the
  largest self device time (name, total seconds, calls);
- `profile.txt`: the profiler's own table, for reading.

The profiler's own cost (recording, then building the trace when it stops) lands inside the
steps that `throughput.json` times: read tokens/s from a run without `--profile_steps` (in the
issue-14 profile the profiled distillation steps took 0.21 s each by `wall_s`, while that run's
`throughput.json` said 1.1 s).

It answers questions like "why does distillation scale 1.35x on two GPUs" (docs/RESULTS.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from seer_attn.training.throughput import _sync

__all__ = ["ProfileCallback", "PROFILE_NAME", "busy_time"]

PROFILE_NAME = "profile.json"


def busy_time(intervals) -> float:
    """Length of the union of `(start, end)` intervals (any unit): time with at least one kernel running.

    Summing kernel times instead counts overlapping kernels twice; summing the profiler's per-op
    averages counts each kernel twice more, once as the kernel and once as the ATen op that launched it
    (the first profile of issue 14 reported more busy time than wall time that way).
    """
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


class ProfileCallback(TrainerCallback):
    """Profile `steps` optimizer steps after `warmup` steps (rank 0 only) and write the summary."""

    def __init__(self, steps: int, warmup: int = 5, top: int = 25):
        if steps < 1:
            raise ValueError(f"ProfileCallback needs steps >= 1, got {steps}")
        self.steps, self.warmup, self.top = steps, warmup, top
        self._prof, self._t0, self._done = None, None, False

    def _active(self, state) -> bool:
        return state.is_world_process_zero and not self._done

    def on_step_begin(self, args, state, control, **kwargs):
        if self._active(state) and self._prof is None and state.global_step == self.warmup:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            _sync()
            self._prof.__enter__()
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._prof is None or self._done or state.global_step < self.warmup + self.steps:
            return
        _sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        self._done = True
        self._write(args.output_dir, wall)

    def on_train_end(self, args, state, control, **kwargs):
        if self._prof is not None and not self._done:  # training ended inside the window
            _sync()
            wall = time.perf_counter() - self._t0
            self._prof.__exit__(None, None, None)
            self._done = True
            self._write(args.output_dir, wall)

    def _write(self, output_dir: str, wall: float) -> None:
        events = self._prof.key_averages()

        def dev_time(e) -> float:  # microseconds; the attribute's name changed across torch versions
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

        # kernels only: an ATen op's "self device time" is the time of the kernels it launched
        kernels = [e for e in events if dev_time(e) > 0 and e.device_type != torch.autograd.DeviceType.CPU]
        runs = [(e.time_range.start, e.time_range.end) for e in self._prof.events()
                if e.device_type != torch.autograd.DeviceType.CPU]
        busy = busy_time(runs) / 1e6
        host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: self.top]
        dev = sorted(kernels, key=dev_time, reverse=True)[: self.top]
        summary = {
            "steps": self.steps,
            "wall_s": round(wall, 4),
            "device_busy_s": round(busy, 4),
            "device_kernel_sum_s": round(sum(dev_time(e) for e in kernels) / 1e6, 4),
            "device_idle_share": round(1 - busy / wall, 4) if busy and wall else None,
            "host_ops": [{"name": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 5), "calls": e.count} for e in host],
            "device_kernels": [{"name": e.key, "self_device_s": round(dev_time(e) / 1e6, 5), "calls": e.count} for e in dev],
        }
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / PROFILE_NAME).write_text(json.dumps(summary, indent=2))
        sort_by = "self_cuda_time_total" if kernels else "self_cpu_time_total"
        (out / "profile.txt").write_text(events.table(sort_by=sort_by, row_limit=self.top))
