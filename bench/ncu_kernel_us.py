"""Summarise `ncu --csv --metrics gpu__time_duration.sum` output: per kernel name, the count and
the median duration in microseconds, per (kernel, grid): one line per launch configuration.
usage: ncu_kernel_us.py CSV"""
import csv
import sys
from collections import OrderedDict

rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5 and "gpu__time_duration.sum" in r]
groups = OrderedDict()
for r in rows:
    # Columns: ID, PID, process, host, kernel name, context, stream, block, grid, ..., value
    key = (r[4][:40], r[8])
    groups.setdefault(key, []).append(float(r[-1].replace(",", "")) / 1000.0)
for (name, grid), us in groups.items():
    us = sorted(us)
    print(f"{name:40s} grid {grid:>16s}: {len(us):3d} launches, median {us[len(us) // 2]:.2f} us, min {us[0]:.2f}")
