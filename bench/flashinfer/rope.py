"""FlashInfer's RoPE kernels, measured the way ferrinfer-bench measures ferrinfer's (`--kernels rope`):
L2 flushed before each call (a buffer larger than the L2 written, then another read), CUDA events,
3 warm-up calls, median of 30; plus the median kernel time from the torch profiler under the same
flush. Same workloads: 8192 tokens (8 requests of 1024) of 32 query and 8 KV heads, head_dim 128,
f16, NeoX, in place: apply_rope_inplace (offsets 0, 1000, ..., 7000), apply_rope_pos_ids_inplace
(random positions up to 131072), apply_llama31_rope_inplace, apply_rope_with_cos_sin_cache_inplace
(an 8192-row cache), apply_rope (out of place); then apply_rope_inplace followed by
append_paged_kv_cache of the 8192 rotated keys and values to sequences of 4096 (positions
3072..4096) at page sizes 1, 16, 512, 7 and 100: FlashInfer has no fused append+RoPE, so that pair
is what ferrinfer's fused row replaces. Prints a markdown table; writes JSON to argv[1]."""
import json
import math
import sys

import torch
import flashinfer

from cold_timing import copy_gbs, event_us, kernel_us

HQ, HKV, D = 32, 8, 128
REQ, PER = 8, 1024
NNZ = REQ * PER
CACHE_ROWS = 8192


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "flashinfer-rope.json"
    gen = torch.Generator(device="cuda").manual_seed(5)
    copy = copy_gbs()
    print(f"GPU: {torch.cuda.get_device_name()}, FlashInfer {flashinfer.__version__}, copy {copy:.0f} GB/s")
    print("| kernel | tokens | q + kv heads | head_dim | MB moved | median us | GB/s | % copy | kernel us |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []

    def report(name, fn, keys, moved, heads):
        us, kus = event_us(fn), kernel_us(fn, keys)
        gbs = moved / us / 1e3
        print(f"| flashinfer {name} | {NNZ} | {heads} | {D} | {moved / 1e6:.1f} | {us:.1f} | {gbs:.0f} | "
              f"{100 * gbs / copy:.1f} | {kus:.1f} |")
        rows.append({"kernel": name, "tokens": NNZ, "heads": heads, "head_dim": D, "bytes": moved,
                     "median_us": us, "kernel_us": kus, "gbs": gbs})

    q = torch.randn(NNZ, HQ, D, dtype=torch.float16, device="cuda", generator=gen)
    k = torch.randn(NNZ, HKV, D, dtype=torch.float16, device="cuda", generator=gen)
    indptr = torch.arange(REQ + 1, dtype=torch.int32, device="cuda") * PER
    offsets = torch.arange(REQ, dtype=torch.int32, device="cuda") * 1000
    pos_ids = torch.randint(0, 131073, (NNZ,), dtype=torch.int32, device="cuda", generator=gen)
    cache_pos = torch.randint(0, CACHE_ROWS, (NNZ,), dtype=torch.int64, device="cuda", generator=gen)
    cos_sin = torch.randn(CACHE_ROWS, D, dtype=torch.float32, device="cuda", generator=gen)
    moved = 2 * (q.numel() + k.numel()) * 2
    heads = HQ + HKV
    report("apply_rope", lambda: flashinfer.apply_rope_inplace(q, k, indptr, offsets), ["rotary"], moved, heads)
    report("apply_rope_pos_ids", lambda: flashinfer.apply_rope_pos_ids_inplace(q, k, pos_ids), ["rotary"], moved, heads)
    report("apply_llama31_rope", lambda: flashinfer.apply_llama31_rope_inplace(q, k, indptr, offsets), ["rotary"],
           moved, heads)
    q2, k2 = q.view(NNZ, HQ * D), k.view(NNZ, HKV * D)
    report("apply_rope_with_cos_sin_cache",
           lambda: flashinfer.apply_rope_with_cos_sin_cache_inplace(cache_pos, q2, k2, D, cos_sin, True), ["rotary"],
           moved, heads)
    report("apply_rope (out of place)", lambda: flashinfer.apply_rope(q, k, indptr, offsets), ["rotary"], moved, heads)

    v = torch.randn(NNZ, HKV, D, dtype=torch.float16, device="cuda", generator=gen)
    seq_after = 4096
    append_offsets = torch.full((REQ,), seq_after - PER, dtype=torch.int32, device="cuda")
    for ps in [1, 16, 512, 7, 100]:
        ppr = math.ceil(seq_after / ps)
        pages = REQ * ppr
        kv = torch.empty(pages + pages // 4 + 1, 2, ps, HKV, D, dtype=torch.float16, device="cuda")
        indices = torch.randperm(kv.shape[0], generator=gen, device="cuda")[:pages].int()
        kv_indptr = torch.arange(REQ + 1, dtype=torch.int32, device="cuda") * ppr
        last = torch.full((REQ,), seq_after - (ppr - 1) * ps, dtype=torch.int32, device="cuda")
        seq = flashinfer.get_seq_lens(kv_indptr, last, ps)
        bi, pos = flashinfer.get_batch_indices_positions(indptr, seq, NNZ)

        def rope_then_append():
            flashinfer.apply_rope_inplace(q, k, indptr, append_offsets)
            flashinfer.append_paged_kv_cache(k, v, bi, pos, kv, indices, kv_indptr, last, "NHD")

        # As ferrinfer's fused row counts it: q, k and v each read and written once.
        report(f"RoPE then append (page_size {ps})", rope_then_append, ["rotary", "append"],
               2 * (q.numel() + 2 * k.numel()) * 2, HQ + 2 * HKV)
        del kv
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "flashinfer": flashinfer.__version__,
                   "copy_gbs": copy, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
