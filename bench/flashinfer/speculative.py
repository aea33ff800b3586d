#!/usr/bin/env python3
"""FlashInfer on ferrinfer's speculative-decoding rows (`ferrinfer-bench --kernels spec`): batch
requests of `draft` new query tokens at the end of kv_len keys, causal, through its batch prefill
wrapper (fa2, and fa3 where the GPU has it), 32/8 heads, head_dim 128, f16, NHD, random page
permutation; and its one-token decode (tensor cores) over the same pages, as the floor. Uses the
anchor script (flashinfer_bench.py) for the JIT build, the page pool and the timing; prints one
markdown table and writes flashinfer-speculative.json to --out.

    python3 bench/flashinfer/speculative.py --out DIR [--page-sizes 16] [--batches 16 64 256]
        [--drafts 2 4 8] [--kv-lens 4096 32768]
"""
import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--page-sizes", type=int, nargs="*", default=[16])
    ap.add_argument("--batches", type=int, nargs="*", default=[16, 64, 256])
    ap.add_argument("--drafts", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--kv-lens", type=int, nargs="*", default=[4096, 32768])
    ap.add_argument("--backends", nargs="*", default=["fa2", "fa3"])
    args = ap.parse_args()
    fb.WARM_PHASES = [f"prefill_{b}" for b in args.backends] + ["decode"]
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget_s
    res = {}
    ok = fb.run_jit(res, 240)
    fb.env_info(res)
    fb.copy_bw(res)
    torch = fb._torch()
    import flashinfer

    shapes = [(b, L) for b in args.batches for L in args.kv_lens if fb.kv_bytes(b, L) <= fb.KV_LIMIT_BYTES]
    pool = fb.Pool(max(b * fb.pages_for(L, ps) * ps for b, L in shapes for ps in args.page_sizes))
    gen = torch.Generator(device="cuda")
    gen.manual_seed(77)
    ws = torch.zeros(fb.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    backends = [b for b in args.backends if ok.get(f"prefill_{b}")]
    rows = []
    res["speculative"] = rows
    for ps in args.page_sizes:
        kv5d, total_pages = pool.view(ps)
        for B, L in shapes:
            indptr, indices, last = fb.paged_meta(B, L, ps, total_pages, gen)
            kv_bytes = fb.kv_bytes(B, L)
            variants = [("decode", 1)] if ok.get("decode") else []
            variants += [(b, d) for d in args.drafts for b in backends]
            for backend, draft in variants:
                row = {"backend_requested": backend, "page_size": ps, "batch": B, "draft": draft,
                       "kv_len": L, "kv_bytes": kv_bytes}
                rows.append(row)
                if time.time() > deadline:
                    row["skipped"] = "time budget"
                    continue
                try:
                    if backend == "decode":
                        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
                        w.plan(indptr, indices, last, fb.HQ, fb.HKV, fb.D, ps, q_data_type=torch.float16)
                        q = torch.randn(B, fb.HQ, fb.D, dtype=torch.float16, device="cuda")
                    else:
                        qo = torch.arange(0, B + 1, dtype=torch.int32, device="cuda") * draft
                        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
                        w.plan(qo, indptr, indices, last, fb.HQ, fb.HKV, fb.D, ps, causal=True,
                               q_data_type=torch.float16)
                        q = torch.randn(B * draft, fb.HQ, fb.D, dtype=torch.float16, device="cuda")
                    row["backend"] = fb.resolved_backend(w)
                    o = torch.empty_like(q)
                    # FlashInfer's formula (causal halving aside: a draft sees nearly all keys).
                    flops = 4 * B * draft * L * fb.HQ * fb.D
                    fb.time_call(row, lambda: w.run(q, kv5d, out=o), flops)  # noqa: B023
                    row["kv_GBps"] = kv_bytes / (row["median_us"] * 1e-6) / 1e9
                    k = row.get("kineto", {}).get("kernel_sum_us_median")
                    if k:
                        row["kv_GBps_kineto"] = kv_bytes / (k * 1e-6) / 1e9
                    del w, q, o
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:500]
                    traceback.print_exc()
                fb.log("speculative", json.dumps(row))
    with open(os.path.join(args.out, "flashinfer-speculative.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer speculative decoding (causal prefill of draft tokens) on {res['env'].get('gpu_name')}")
    print("| backend | page_size | batch | draft | kv_len | median us | kernel us | KV GB/s (kernel) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k = r.get("kineto", {}).get("kernel_sum_us_median")
        cells = [r.get("median_us"), k, r.get("kv_GBps_kineto")]
        print(f"| {r.get('backend', r['backend_requested'])} | {r['page_size']} | {r['batch']} | {r['draft']} | "
              f"{r['kv_len']} | " + " | ".join(fb._f(c) for c in cells) + (f" | {r['skipped']}" if "skipped" in r else "")
              + (" | error" if "error" in r else ""))


if __name__ == "__main__":
    main()
