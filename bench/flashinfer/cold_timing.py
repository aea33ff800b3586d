"""Timing shared by the one-call FlashInfer scripts (append.py, rope.py), the way ferrinfer-bench
times ferrinfer's kernels: the L2 flushed before each call (a buffer larger than the L2 written,
then another read, so the call starts with a cold L2 of clean lines), CUDA events, 3 warm-up
calls, median of RUNS; and the median kernel time from the torch profiler under the same flush.
Under Nsight Compute (FERRINFER_NCU=1) only a few calls, and no torch profiler."""
import os

import torch
from torch.profiler import ProfilerActivity, profile

NCU = os.environ.get("FERRINFER_NCU") == "1"
RUNS = 5 if NCU else 30
flush_write = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
flush_read = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")


def flush():
    flush_write.zero_()
    flush_read.sum()


def event_us(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def kernel_us(fn, keys):
    """Per call, the sum over `keys` of the median device time of the kernels whose lower-case
    names contain that key (NaN under Nsight Compute, or when a key matches no kernel)."""
    if NCU:
        return float("nan")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(RUNS):
            flush()
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for key in keys:
        times = [e.device_time for e in prof.events() if key in e.name.lower() and e.device_time > 0]
        if not times:
            return float("nan")
        total += sorted(times)[len(times) // 2]
    return total


def copy_gbs():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / event_us(lambda: dst.copy_(src)) / 1e3
