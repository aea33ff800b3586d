#!/usr/bin/env python3
"""Joins ferrinfer-bench's decode JSON with decode.py's FlashInfer JSON from the same device
call into one markdown table: ferrinfer's CUDA-event time against FlashInfer's best kernel time
(the faster of its CUDA-core and tensor-core decode, profiler kernel time).

    python3 bench/flashinfer/compare_decode.py FERRINFER_JSON FLASHINFER_JSON
"""
import json
import sys


def main():
    ours, theirs = (json.load(open(p)) for p in sys.argv[1:3])
    best = {}
    for key in ("decode", "decode_tc"):
        for r in theirs.get(key, []):
            k = r.get("kineto", {}).get("kernel_sum_us_median")
            if k is not None:
                at = (r["page_size"], r["batch"], r["kv_len"])
                best[at] = min(k, best.get(at, k))
    print(f"{ours['gpu']}: copy {ours['copy_gbs']:.0f} GB/s, read stream {ours['read_stream_gbs']:.0f} GB/s\n")
    print("| page_size | batch | kv_len | ferrinfer µs (events) | KV GB/s | % copy | % read stream | FlashInfer best kernel µs | ferrinfer / FlashInfer |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in ours["results"]:
        if r["kernel"] != "decode" or r.get("group", 4) != 4 or r.get("dtype", "f16") != "f16":
            continue
        fi = best.get((r["page_size"], r["batch"], r["kv_len"]))
        ratio = f"{r['median_us'] / fi:.3f}" if fi else "-"
        fi_cell = f"{fi:.1f}" if fi else "-"
        print(f"| {r['page_size']} | {r['batch']} | {r['kv_len']} | {r['median_us']:.1f} | {r['gbs']:.0f} | "
              f"{r['pct_copy']:.1f} | {r['pct_read_stream']:.1f} | {fi_cell} | {ratio} |")


if __name__ == "__main__":
    main()
