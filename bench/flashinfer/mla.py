#!/usr/bin/env python3
"""FlashInfer's MLA decode (`flashinfer.mla.BatchMLAPagedAttentionWrapper`, weights absorbed)
on the shapes of ferrinfer's `--kernels mla` rows, so the two can run in one device call:
batch {1, 16, 64, 128} x kv_len {1024, 8192, 32768}, 128 heads, ckv 512 + kpe 64, f16 (or
--dtype bf16), page sizes 64 and 1, pages from a random permutation of the pool, sm_scale
1/sqrt(192). Its backends: "auto" (fa3 on Hopper) and, with --backends, "fa2". Times `run`
only (CUDA events, cold L2, median; and the kernels' summed time from the torch profiler),
checks request 0 against a torch reference, prints one markdown table and writes
flashinfer-mla.json to --out. The first `run` of each backend JIT-builds its module (a
minute or two on a fresh machine), inside --budget-s.

    python3 bench/flashinfer/mla.py --out DIR [--backends auto fa2] [--budget-s S]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402

CKV, KPE = 512, 64


def reference(q_nope, q_pe, ckv, kpe, sm_scale):
    """One request: q_* [heads, dim], ckv/kpe [kv_len, dim] -> [heads, 512] in fp32."""
    torch = fb._torch()
    s = (q_nope.float() @ ckv.float().T + q_pe.float() @ kpe.float().T) * sm_scale
    return torch.softmax(s, dim=-1) @ ckv.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--backends", nargs="*", default=["auto"])
    ap.add_argument("--page-sizes", type=int, nargs="*", default=[64, 1])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64, 128])
    ap.add_argument("--kv-lens", type=int, nargs="*", default=[1024, 8192, 32768])
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    torch = fb._torch()
    import flashinfer

    res = {}
    fb.env_info(res)
    dtype = torch.float16 if args.dtype == "f16" else torch.bfloat16
    sm_scale = 1.0 / 192 ** 0.5
    gen = torch.Generator(device="cuda")
    gen.manual_seed(24)
    ws = torch.zeros(fb.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    max_tokens = max(args.batches) * max(args.kv_lens)
    rows = []
    res["mla"] = rows
    for backend in args.backends:
        for ps in args.page_sizes:
            total_pages = max(args.batches) * fb.pages_for(max(args.kv_lens), ps) * 5 // 4 + 1
            ckv_pool = torch.randn(total_pages, ps, CKV, dtype=dtype, device="cuda", generator=gen)
            kpe_pool = torch.randn(total_pages, ps, KPE, dtype=dtype, device="cuda", generator=gen)
            for batch in args.batches:
                for kv_len in args.kv_lens:
                    row = {"backend_requested": backend, "page_size": ps, "batch": batch, "kv_len": kv_len,
                           "heads": args.heads, "dtype": args.dtype}
                    rows.append(row)
                    if time.time() > deadline:
                        row["skipped"] = "budget"
                        continue
                    try:
                        ppr = fb.pages_for(kv_len, ps)
                        indices = fb.random_pages(total_pages, batch * ppr, gen)
                        kv_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * ppr
                        qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda")
                        kv_lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
                        w = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws, backend=backend)
                        t = time.time()
                        w.plan(qo_indptr, kv_indptr, indices, kv_lens, args.heads, CKV, KPE, ps, False, sm_scale,
                               dtype, dtype)
                        q_nope = torch.randn(batch, args.heads, CKV, dtype=dtype, device="cuda", generator=gen)
                        q_pe = torch.randn(batch, args.heads, KPE, dtype=dtype, device="cuda", generator=gen)
                        o = torch.empty(batch, args.heads, CKV, dtype=dtype, device="cuda")
                        fn = lambda: w.run(q_nope, q_pe, ckv_pool, kpe_pool, out=o)  # noqa: E731
                        fn()
                        torch.cuda.synchronize()
                        row["first_run_s"] = time.time() - t
                        row["backend"] = fb.resolved_backend(w)
                        pages = indices[:ppr].long()
                        ckv = ckv_pool[pages].reshape(-1, CKV)[:kv_len]
                        kpe = kpe_pool[pages].reshape(-1, KPE)[:kv_len]
                        want = reference(q_nope[0], q_pe[0], ckv, kpe, sm_scale)
                        row["request0_max_abs_err"] = float((o[0].float() - want).abs().max())
                        fb.time_call(row, fn, batch * args.heads * kv_len * 2 * (CKV + KPE + CKV))
                        del w, q_nope, q_pe, o
                    except Exception as e:  # noqa: BLE001
                        row["error"] = repr(e)[:500]
                        import traceback

                        traceback.print_exc()
                    fb.log("mla", json.dumps({k: v for k, v in row.items() if k != "kineto"}))
            del ckv_pool, kpe_pool
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "flashinfer-mla.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer MLA decode on {res['env'].get('gpu_name')}: {args.heads} heads, {args.dtype}, "
          f"max {max_tokens} tokens")
    print("| backend | page_size | batch | kv_len | median us | TFLOP/s | kernel us | kernel TFLOP/s | max abs err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.get('backend', r['backend_requested'])} | {r['page_size']} | {r['batch']} | {r['kv_len']} | "
              f"{fb.timed_cells(r)} |")
        if "error" in r or "skipped" in r:
            print(f"  {r.get('error', r.get('skipped'))}")


if __name__ == "__main__":
    main()
