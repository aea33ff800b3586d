#!/usr/bin/env python3
"""FlashInfer's batch decode over an fp8 KV cache (kv_data_type=torch.float8_e4m3fn, or e5m2),
both its CUDA-core kernel and its tensor-core path, on the shapes of ferrinfer's decode
benchmark (`ferrinfer-bench --kernels decode --kv-dtype e4m3`), so the two can run in one
device call. Reuses the anchor script (flashinfer_bench.py) for the environment, the copy
bandwidth, the page tables and the timing (L2 flushed before every call; median of CUDA events
and of kineto kernel time). k_scale = v_scale = 1 (speed does not depend on them). Prints one
markdown table and writes flashinfer-decode-fp8.json to --out.

    bash bench/flashinfer/run_decode_fp8.sh --out DIR [--kv-dtype e4m3|e5m2] [--page-sizes ...]
"""
import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402


def fp8_pool(tokens, dtype):
    """One random KV buffer of `tokens` tokens in `dtype`, filled chunk by chunk from fp16."""
    torch = fb._torch()
    n = tokens * 2 * fb.HKV * fb.D
    buf = torch.empty(n, dtype=dtype, device="cuda")
    chunk = 1 << 28
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        buf[s:e] = torch.randn(e - s, dtype=torch.float16, device="cuda").to(dtype)
    torch.cuda.synchronize()
    return buf


def sweep(res, key, buf, tokens, kv_dtype, use_tensor_cores, deadline):
    torch = fb._torch()
    import flashinfer

    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    ws = torch.zeros(fb.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    copy_gbps = res.get("copy_bw", {}).get("GBps_read_plus_write")
    rows = []
    res[key] = rows
    for ps in fb.DECODE_PAGE_SIZES:
        total_pages = tokens // ps
        kv5d = buf[: total_pages * ps * 2 * fb.HKV * fb.D].view(total_pages, 2, ps, fb.HKV, fb.D)
        for kv_len in fb.DECODE_KV_LENS:
            for batch in fb.DECODE_BATCHES:
                # K and V read once, one byte per element.
                row = {"page_size": ps, "batch": batch, "kv_len": kv_len,
                       "kv_bytes": batch * kv_len * fb.HKV * fb.D * 2, "kv_dtype": str(kv_dtype)}
                rows.append(row)
                if batch * fb.pages_for(kv_len, ps) > total_pages:
                    row["skipped"] = "does not fit the page pool"
                    continue
                if time.time() > deadline:
                    row["skipped"] = "time budget"
                    continue
                try:
                    indptr, indices, last = fb.paged_meta(batch, kv_len, ps, total_pages, gen)
                    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=use_tensor_cores)
                    q = torch.randn(batch, fb.HQ, fb.D, dtype=torch.float16, device="cuda")
                    o = torch.empty_like(q)
                    w.plan(indptr, indices, last, fb.HQ, fb.HKV, fb.D, ps,
                           q_data_type=torch.float16, kv_data_type=kv_dtype)
                    row["backend"] = fb.resolved_backend(w)
                    fn = lambda: w.run(q, kv5d, out=o, k_scale=1.0, v_scale=1.0)  # noqa: E731
                    ts, method = fb.bench_events(fn)
                    row.update(fb.summarize(ts))
                    row["method"] = method
                    row["kv_GBps"] = row["kv_bytes"] / (row["median_us"] * 1e-6) / 1e9
                    if copy_gbps:
                        row["frac_of_copy_bw"] = row["kv_GBps"] / copy_gbps
                    kk = fb.bench_kineto(fn)
                    if kk:
                        row["kineto"] = kk
                    del w, q, o, indptr, indices, last
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:500]
                    traceback.print_exc()
                fb.log(key, json.dumps({k: v for k, v in row.items() if k != "kineto"}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--kv-dtype", choices=["e4m3", "e5m2"], default="e4m3")
    ap.add_argument("--page-sizes", type=int, nargs="*")
    ap.add_argument("--batches", type=int, nargs="*")
    ap.add_argument("--kv-lens", type=int, nargs="*")
    ap.add_argument("--tc-only", action="store_true", help="only the tensor-core path")
    args = ap.parse_args()
    torch = fb._torch()
    kv_dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[args.kv_dtype]
    fb.DECODE_PAGE_SIZES = args.page_sizes or fb.DECODE_PAGE_SIZES
    fb.DECODE_BATCHES = args.batches or fb.DECODE_BATCHES
    fb.DECODE_KV_LENS = args.kv_lens or fb.DECODE_KV_LENS
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget_s
    res = {}
    fb.env_info(res)
    fb.copy_bw(res)
    # The largest row that fits the fp16 sweep's ~40 GB, in fp8: 20 GB of K and V.
    tokens = fb.pool_tokens_needed()
    buf = fp8_pool(tokens, kv_dtype)
    # The first plan of each path JIT-builds its fp8 module (a minute or so on a fresh machine).
    if not args.tc_only:
        sweep(res, "decode_fp8", buf, tokens, kv_dtype, False, deadline)
    sweep(res, "decode_fp8_tc", buf, tokens, kv_dtype, True, deadline)
    with open(os.path.join(args.out, "flashinfer-decode-fp8.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer fp8 ({args.kv_dtype}) decode on {res['env'].get('gpu_name')}; "
          f"copy {res['copy_bw'].get('GBps_read_plus_write', 0):.0f} GB/s")
    print("| page_size | batch | kv_len | cuda-core median us | kernel us | tensor-core median us | kernel us | best kernel us |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {k: {(r["page_size"], r["batch"], r["kv_len"]): r for r in res.get(k, [])}
            for k in ("decode_fp8", "decode_fp8_tc")}
    for key in sorted(rows["decode_fp8"].keys() | rows["decode_fp8_tc"].keys()):
        r, t = rows["decode_fp8"].get(key, {}), rows["decode_fp8_tc"].get(key, {})
        k1 = r.get("kineto", {}).get("kernel_sum_us_median")
        k2 = t.get("kineto", {}).get("kernel_sum_us_median")
        best = min([k for k in (k1, k2) if k is not None], default=None)
        cells = [r.get("median_us"), k1, t.get("median_us"), k2, best]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(fb._f(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
