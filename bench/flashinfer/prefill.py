#!/usr/bin/env python3
"""FlashInfer's causal batch prefill only (its fa2 backend, and fa3 where the GPU has it), on the
shapes of ferrinfer's prefill benchmark (batch 8, qo_len = kv_len, 32/8 heads, head_dim 128,
f16, NHD, random page permutation), so the two can run in one device call. Uses the provided
anchor script (flashinfer_bench.py) for the JIT build, the page pool and the timing; prints one
markdown table and writes flashinfer-prefill.json to --out.

    python3 bench/flashinfer/prefill.py --out DIR [--page-sizes 1 7 16 512] [--lens 1024 4096]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--page-sizes", type=int, nargs="*", default=[1, 7, 16, 512])
    ap.add_argument("--lens", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--backends", nargs="*", default=["fa2", "fa3"])
    args = ap.parse_args()
    # JIT-build only the backends asked for (fa3's build alone takes a minute on a fresh machine).
    fb.WARM_PHASES = [f"prefill_{b}" for b in args.backends]
    fb.PREFILL_PAGE_SIZES, fb.PREFILL_LENS = args.page_sizes, args.lens
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget_s
    res = {}
    ok = fb.run_jit(res, 240)
    fb.env_info(res)
    fb.copy_bw(res)
    pool = fb.Pool(max(fb.PREFILL_BATCH * fb.pages_for(L, ps) * ps for L in args.lens for ps in args.page_sizes))
    backends = [b for b in args.backends if ok.get(f"prefill_{b}")]
    fb.prefill_sweep(res, pool, backends, deadline)
    with open(os.path.join(args.out, "flashinfer-prefill.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer causal prefill on {res['env'].get('gpu_name')}")
    print("| backend | page_size | qo = kv len | median us | TFLOP/s | kernel us | kernel TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in res.get("prefill", []):
        k = r.get("kineto", {}).get("kernel_sum_us_median")
        cells = [r.get("median_us"), r.get("TFLOPs"), k, r.get("TFLOPs_kineto")]
        print(f"| {r.get('backend', r['backend_requested'])} | {r['page_size']} | {r['qo_len']} | "
              + " | ".join(fb._f(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
