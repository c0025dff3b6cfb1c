"""Steady-state training throughput and peak GPU memory per rank, for scaling runs.

:class:`ThroughputCallback` times the steps after the first `warmup_steps` (compilation, autotuning,
allocator growth) as one window: the GPU is synchronised once where the window opens and once after
the last step, never in between, so the timing does not stop the host from queueing the next step
while the GPU finishes the last one (a sync per step would, and would slow the host-bound runs it
measures). Checkpoints saved inside the window count in its time. At the end of training it writes
`<output_dir>/throughput.json`:

- `tokens_per_step`: global batch x sequence length (every rank's tokens);
- `tokens_per_s`: tokens_per_step x steps in the window / the window's time;
- `step_time_s`: the window's mean step time; `steps_timed`;
- `world_size`, `peak_memory_gib`: `torch.cuda.max_memory_allocated` of each rank (empty on CPU).

Rank 0 writes the file; the peaks of the other ranks reach it through `all_gather_object`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

__all__ = ["ThroughputCallback", "THROUGHPUT_NAME"]

THROUGHPUT_NAME = "throughput.json"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class ThroughputCallback(TrainerCallback):
    def __init__(self, seq_len: int, warmup_steps: int = 5):
        self.seq_len, self.warmup_steps = seq_len, warmup_steps
        self._begun = 0  # steps begun in this process (a resumed run counts from its first step)
        self._warm = warmup_steps
        self._t0: float | None = None
        self.steps = 0
        self.elapsed: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._begun == 0:  # too short a run to drop warm-up steps: time every step
            self._warm = self.warmup_steps if state.max_steps - state.global_step > self.warmup_steps else 0
        if self._begun == self._warm:
            _sync()
            self._t0 = time.perf_counter()
        self._begun += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is None:
            return
        self.steps += 1
        if state.global_step >= state.max_steps:
            _sync()
            self.elapsed = time.perf_counter() - self._t0

    def summary(self, args) -> dict:
        world = max(1, getattr(args, "world_size", 1))
        tokens = args.per_device_train_batch_size * args.gradient_accumulation_steps * world * self.seq_len
        timed = self.elapsed is not None and self.steps > 0
        peak = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mine = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                peak = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(peak, mine)
            else:
                peak = [mine]
        return {
            "world_size": world,
            "tokens_per_step": tokens,
            "steps_timed": self.steps if timed else 0,
            "warmup_steps_dropped": self._warm,
            "step_time_s": round(self.elapsed / self.steps, 4) if timed else None,
            "tokens_per_s": round(tokens * self.steps / self.elapsed, 1) if timed else None,
            "peak_memory_gib": peak,
        }

    def on_train_end(self, args, state, control, **kwargs):
        summary = self.summary(args)  # every rank joins the gather
        if state.is_world_process_zero:
            with open(Path(args.output_dir) / THROUGHPUT_NAME, "w") as f:
                json.dump(summary, f, indent=2)
