"""ProfileCallback's accounting (`seer_attn.training.profiling`)."""

import json

import torch

from seer_attn.training.profiling import PROFILE_NAME, ProfileCallback, busy_time


def test_busy_time_is_the_union_of_kernel_intervals():
    assert busy_time([]) == 0.0
    assert busy_time([(0, 2), (5, 6)]) == 3.0
    # overlapping (NCCL beside compute) and nested kernels count once
    assert busy_time([(0, 4), (1, 2), (3, 7), (10, 11)]) == 8.0
    assert busy_time([(3, 7), (0, 4)]) == 7.0


def test_profile_callback_writes_a_summary(tmp_path):
    cb = ProfileCallback(steps=1)
    cb._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with cb._prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    cb._write(str(tmp_path), wall=0.5)
    out = json.loads((tmp_path / PROFILE_NAME).read_text())
    # on CPU no device kernel runs: no busy time, and no op's time is taken for a kernel's
    assert out["device_busy_s"] == 0 and out["device_kernel_sum_s"] == 0 and out["device_idle_share"] is None
    assert any("mm" in op["name"] for op in out["host_ops"])
    assert (tmp_path / "profile.txt").exists()
