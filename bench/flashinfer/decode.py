#!/usr/bin/env python3
"""FlashInfer's batch decode only (both its CUDA-core kernel and its tensor-core path), on the
shapes of ferrinfer's decode benchmark, so the two can run in one device call. Uses the
provided anchor script (flashinfer_bench.py, copied from ../shared/bench/flashinfer) for the
JIT build, the copy bandwidth, the page pool and the timing; prints one markdown table and
writes flashinfer-decode.json to --out.

    python3 bench/flashinfer/decode.py --out DIR [--budget-s S]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402

# Only the modules decode needs: the decode kernel, and fa2 prefill for the tensor-core path.
fb.WARM_PHASES = ["decode", "prefill_fa2"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--page-sizes", type=int, nargs="*")
    ap.add_argument("--batches", type=int, nargs="*")
    ap.add_argument("--kv-lens", type=int, nargs="*")
    ap.add_argument("--tc-only", action="store_true", help="only the tensor-core path")
    ap.add_argument("--head-dim", type=int, default=fb.D, help="head_dim (JIT-built for it)")
    args = ap.parse_args()
    fb.D = args.head_dim
    os.environ["FB_HEAD_DIM"] = str(args.head_dim)
    fb.DECODE_PAGE_SIZES = args.page_sizes or fb.DECODE_PAGE_SIZES
    fb.DECODE_BATCHES = args.batches or fb.DECODE_BATCHES
    fb.DECODE_KV_LENS = args.kv_lens or fb.DECODE_KV_LENS
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget_s
    res = {}
    ok = fb.run_jit(res, 240)
    fb.env_info(res)
    fb.copy_bw(res)
    pool = fb.Pool(fb.pool_tokens_needed())
    if ok.get("decode") and not args.tc_only:
        fb.decode_sweep(res, "decode", pool, False, deadline)
    if ok.get("prefill_fa2"):
        fb.decode_sweep(res, "decode_tc", pool, True, deadline)
    with open(os.path.join(args.out, "flashinfer-decode.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer decode on {res['env'].get('gpu_name')}; copy {res['copy_bw'].get('GBps_read_plus_write', 0):.0f} GB/s")
    print("| page_size | batch | kv_len | cuda-core median us | kernel us | tensor-core median us | kernel us | best kernel us |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {k: {(r["page_size"], r["batch"], r["kv_len"]): r for r in res.get(k, [])} for k in ("decode", "decode_tc")}
    for key in sorted(rows["decode"].keys() | rows["decode_tc"].keys()):
        r, t = rows["decode"].get(key, {}), rows["decode_tc"].get(key, {})
        k1 = r.get("kineto", {}).get("kernel_sum_us_median")
        k2 = t.get("kineto", {}).get("kernel_sum_us_median")
        best = min([k for k in (k1, k2) if k is not None], default=None)
        cells = [r.get("median_us"), k1, t.get("median_us"), k2, best]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(fb._f(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
