"""Steady-state training throughput and peak GPU memory per rank, for scaling runs.

:class:`ThroughputCallback` times every optimizer step (synchronising the GPU at its edges), drops
the first `warmup_steps` (compilation, autotuning, allocator growth) and at the end of training writes
`<output_dir>/throughput.json`:

- `tokens_per_step`: global batch x sequence length (every rank's tokens);
- `tokens_per_s`: tokens_per_step x steady steps / their summed time;
- `step_time_s`: median steady step time; `steps_timed`;
- `world_size`, `peak_memory_gib`: `torch.cuda.max_memory_allocated` of each rank (empty on CPU).

Rank 0 writes the file; the peaks of the other ranks reach it through `all_gather_object`.
"""

from __future__ import annotations

import json
import statistics
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
        self.times: list[float] = []
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)

    def summary(self, args) -> dict:
        world = max(1, getattr(args, "world_size", 1))
        tokens = args.per_device_train_batch_size * args.gradient_accumulation_steps * world * self.seq_len
        steady = self.times[self.warmup_steps :] or self.times
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
            "steps_timed": len(steady),
            "warmup_steps_dropped": len(self.times) - len(steady),
            "step_time_s": round(statistics.median(steady), 4) if steady else None,
            "tokens_per_s": round(tokens * len(steady) / sum(steady), 1) if steady else None,
            "peak_memory_gib": peak,
        }

    def on_train_end(self, args, state, control, **kwargs):
        summary = self.summary(args)  # every rank joins the gather
        if state.is_world_process_zero:
            with open(Path(args.output_dir) / THROUGHPUT_NAME, "w") as f:
                json.dump(summary, f, indent=2)
