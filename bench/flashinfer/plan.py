#!/usr/bin/env python3
"""FlashInfer's host-side `plan` time, to compare with ferrinfer's planning (BatchDecodePlan::new,
BatchPrefillPlan::new): BatchDecodeWithPagedKVCacheWrapper.plan (its CUDA-core kernel and its
tensor-core path) and BatchPrefillWithPagedKVCacheWrapper.plan (causal; fa2 backend, and fa3 on
sm_90). Shapes of ferrinfer's benchmark: f16, NHD, 32 query heads, 8 KV heads, head_dim 128,
page size 16, pages from a random permutation; decode batches 1, 64 and 256 at kv_len 4096,
prefill batch 8 at qo_len = kv_len = 1024 and 4096.

The arguments are passed as serving engines pass them (vLLM's FlashInfer backend): qo_indptr,
kv indptr and last_page_len as pinned CPU int32 tensors, kv_indices on the GPU; one workspace
shared by all wrappers, one wrapper per kind reused for every plan. Only `plan` is timed
(time.perf_counter() around the call), after warm-up, in two conditions:
  idle  the GPU has finished everything before each plan (synchronize first);
  busy  a GPU job of --busy-ms (torch.cuda._sleep) is enqueued before each plan, so the plan runs
        while the previous step still executes, as in a serving loop that plans step n + 1
        during step n; synchronize after the timing. A plan that waits for the GPU anywhere
        (a copy from pageable memory, a device-to-host read) shows the job's time here.
Uses the provided anchor script (flashinfer_bench.py) for the JIT build and the environment
record; prints one markdown table and writes flashinfer-plan.json to --out.

    python3 bench/flashinfer/plan.py --out DIR [--reps 50] [--busy-ms 5]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402

PAGE_SIZE = 16


def summarize(ts_s):
    ts = sorted(ts_s)
    return {
        "median_us": statistics.median(ts) * 1e6,
        "min_us": ts[0] * 1e6,
        "p90_us": ts[min(len(ts) - 1, int(0.9 * len(ts)))] * 1e6,
        "reps": len(ts),
    }


def sleep_cycles_for(ms):
    """The torch.cuda._sleep argument that keeps the GPU busy for about `ms`, and the time it takes."""
    torch = fb._torch()

    def timed(cycles):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    timed(int(1e6))
    cycles = max(1, int(1e6 * ms / timed(int(1e6))))
    return cycles, statistics.median(timed(cycles) for _ in range(5))


def page_table(batch, kv_len, host, gen):
    """kv indptr and last_page_len as `host` makes CPU tensors (pinned or not), kv_indices on the
    GPU: pages drawn from a random permutation of a pool twice the size (plan reads no KV)."""
    torch = fb._torch()
    ppr = fb.pages_for(kv_len, PAGE_SIZE)
    indices = torch.randperm(2 * batch * ppr, device="cuda", generator=gen)[: batch * ppr].to(torch.int32)
    indptr = host(torch.arange(0, batch + 1, dtype=torch.int32) * ppr)
    last = host(torch.full((batch,), kv_len - (ppr - 1) * PAGE_SIZE, dtype=torch.int32))
    return indptr, indices, last


def time_plans(plan, reps, warmup, busy_cycles):
    torch = fb._torch()
    for _ in range(warmup):
        plan()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if busy_cycles:
            torch.cuda._sleep(busy_cycles)
        t0 = time.perf_counter()
        plan()
        ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return ts


def measure(res, label, plan, args, busy_cycles):
    row = dict(label)
    try:
        row["idle"] = summarize(time_plans(plan, args.reps, args.warmup, 0))
        row["busy"] = summarize(time_plans(plan, args.reps, args.warmup, busy_cycles))
    except Exception as e:  # noqa: BLE001
        row["error"] = repr(e)[:500]
    res["plan"].append(row)
    fb.log("plan", json.dumps(row))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--busy-ms", type=float, default=5.0, help="the GPU job before each busy plan")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64, 256], help="decode batches")
    ap.add_argument("--kv-len", type=int, default=4096, help="decode kv_len")
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--lens", type=int, nargs="*", default=[1024, 4096], help="prefill qo_len = kv_len")
    ap.add_argument("--backends", nargs="*", default=["fa2", "fa3"], help="prefill backends (fa3: sm_90 only)")
    ap.add_argument("--no-pin", action="store_true", help="pageable CPU tensors instead of pinned ones")
    args = ap.parse_args()
    torch = fb._torch()
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    backends = [b for b in args.backends if b != "fa3" or sm90]
    # JIT-build only what plan needs (each module costs about a minute): the CUDA-core decode
    # module, fa2 prefill (the tensor-core decode path uses it too) and fa3 where asked for.
    fb.WARM_PHASES = ["decode", "prefill_fa2"] + (["prefill_fa3"] if "fa3" in backends else [])
    os.makedirs(args.out, exist_ok=True)
    res = {"plan": [], "config": {
        "num_qo_heads": fb.HQ, "num_kv_heads": fb.HKV, "head_dim": fb.D, "page_size": PAGE_SIZE,
        "dtype": "float16", "layout": "NHD", "reps": args.reps, "warmup": args.warmup,
        "cpu_tensors_pinned": not args.no_pin,
        "method": "time.perf_counter() around plan(); idle: synchronize before each plan; busy: "
                  "torch.cuda._sleep enqueued before each plan, synchronize after"}}
    ok = fb.run_jit(res, 240)
    fb.env_info(res)
    import flashinfer

    cycles, busy_ms = sleep_cycles_for(args.busy_ms)
    res["config"]["busy_job_ms"] = busy_ms
    fb.log(f"busy job: torch.cuda._sleep({cycles}) takes {busy_ms:.2f} ms")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(3)
    ws = torch.empty(fb.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    pin = not args.no_pin
    host = (lambda t: t.pin_memory()) if pin else (lambda t: t)
    f16 = torch.float16

    for tc, phase in ((False, "decode"), (True, "prefill_fa2")):
        if not ok.get(phase):
            continue
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        for batch in args.batches:
            indptr, indices, last = page_table(batch, args.kv_len, host, gen)

            def plan():
                w.plan(indptr, indices, last, fb.HQ, fb.HKV, fb.D, PAGE_SIZE,
                       pos_encoding_mode="NONE", q_data_type=f16, kv_data_type=f16)

            row = measure(res, {"kind": "decode", "backend": "tensor-core" if tc else "cuda-core",
                                "batch": batch, "qo_len": 1, "kv_len": args.kv_len}, plan, args, cycles)
            row["resolved_backend"] = fb.resolved_backend(w)

    for backend in backends:
        if not ok.get(f"prefill_{backend}"):
            continue
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
        B = args.prefill_batch
        for L in args.lens:
            indptr, indices, last = page_table(B, L, host, gen)
            qo = host(torch.arange(0, B + 1, dtype=torch.int32) * L)

            def plan():
                w.plan(qo, indptr, indices, last, fb.HQ, fb.HKV, fb.D, PAGE_SIZE,
                       causal=True, q_data_type=f16, kv_data_type=f16)

            row = measure(res, {"kind": "prefill", "backend": backend, "batch": B, "qo_len": L,
                                "kv_len": L}, plan, args, cycles)
            row["resolved_backend"] = fb.resolved_backend(w)

    with open(os.path.join(args.out, "flashinfer-plan.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer {res['env'].get('flashinfer')} plan time on {res['env'].get('gpu_name')}; "
          f"busy: a {busy_ms:.2f} ms GPU job enqueued before each plan; CPU tensors "
          f"{'pinned' if pin else 'pageable'}")
    print("| kind | backend | batch | qo/kv len | idle median us | idle min us | busy median us | busy min us |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in res["plan"]:
        i, b = r.get("idle", {}), r.get("busy", {})
        cells = [i.get("median_us"), i.get("min_us"), b.get("median_us"), b.get("min_us")]
        note = f" ERROR: {r['error'][:60]}" if "error" in r else ""
        print(f"| {r['kind']} | {r['backend']}{note} | {r['batch']} | {r['qo_len']}/{r['kv_len']} | "
              + " | ".join(fb._f(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
