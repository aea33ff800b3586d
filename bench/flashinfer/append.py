"""FlashInfer's append_paged_kv_cache, measured the way ferrinfer-bench measures ferrinfer's append:
L2 flushed before each call (a buffer larger than the L2 written, then another read, so the call
starts with a cold L2 of clean lines), CUDA events, 3 warm-up calls, median of 30; plus the median
kernel time from the torch profiler under the same flush. Same workloads: 8 requests x 4096 tokens and 256 x 1 token,
sequences of 4096 tokens after the append, f16, NHD, 8 KV heads, head_dim 128, pages from a random
permutation of a pool 25% larger than needed. Prints a markdown table; writes JSON to argv[1]."""
import json
import math
import sys

import torch
import flashinfer

from cold_timing import copy_gbs, event_us, kernel_us

HKV, D = 8, 128


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "flashinfer-append.json"
    gen = torch.Generator(device="cuda").manual_seed(5)
    copy = copy_gbs()
    rows = []
    print(f"GPU: {torch.cuda.get_device_name()}, FlashInfer {flashinfer.__version__}, copy {copy:.0f} GB/s")
    print("| kernel | page_size | batch | tokens/seq | MB moved | median us | GB/s | % copy | kernel us |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ps in [1, 16, 512, 7, 100]:
        for nreq, ntok in [(8, 4096), (256, 1)]:
            seq_after = 4096
            ppr = math.ceil(seq_after / ps)
            pages = nreq * ppr
            kv = torch.empty(pages + pages // 4 + 1, 2, ps, HKV, D, dtype=torch.float16, device="cuda")
            indices = torch.randperm(kv.shape[0], generator=gen, device="cuda")[:pages].int()
            indptr = torch.arange(nreq + 1, dtype=torch.int32, device="cuda") * ppr
            last = torch.full((nreq,), seq_after - (ppr - 1) * ps, dtype=torch.int32, device="cuda")
            nnz = nreq * ntok
            app = torch.arange(nreq + 1, dtype=torch.int32, device="cuda") * ntok
            seq = flashinfer.get_seq_lens(indptr, last, ps)
            bi, pos = flashinfer.get_batch_indices_positions(app, seq, nnz)
            k = torch.randn(nnz, HKV, D, dtype=torch.float16, device="cuda")
            v = torch.randn(nnz, HKV, D, dtype=torch.float16, device="cuda")
            fn = lambda: flashinfer.append_paged_kv_cache(k, v, bi, pos, kv, indices, indptr, last, "NHD")  # noqa: E731
            us, kus = event_us(fn), kernel_us(fn, ["append"])
            moved = 2 * 2 * nnz * HKV * D * 2
            gbs = moved / us / 1e3
            print(f"| flashinfer append ({ntok} tok/seq) | {ps} | {nreq} | {ntok} | {moved / 1e6:.1f} | {us:.1f} | "
                  f"{gbs:.0f} | {100 * gbs / copy:.1f} | {kus:.1f} |")
            rows.append({"page_size": ps, "batch": nreq, "tokens_per_sequence": ntok, "bytes": moved,
                         "median_us": us, "kernel_us": kus, "gbs": gbs})
            del kv
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "flashinfer": flashinfer.__version__,
                   "copy_gbs": copy, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
