#!/usr/bin/env python3
"""FlashInfer's batch prefill with a custom mask (its fa2 backend; fa3 refuses custom masks) on
the shape of ferrinfer's `--kernels prefill-mask` rows: speculative-decoding tree verification
as SGLang's EAGLE path runs it. 8 requests of 4096 keys whose last 64 are draft tokens forming
a random tree (a draft sees every earlier key, itself and its ancestors), 32/8 heads,
head_dim 128, f16, NHD, random page permutation, page sizes 16 and 1. The trees come from the
same SplitMix64 generator and seed as the Rust benchmark (`prefill_mask.rs`'s `tree_parents`);
both print the number of kept mask entries, which must agree. The mask goes to `plan` as
`custom_mask` (flattened booleans; FlashInfer packs it). Checks the output of request 0 against
a masked torch softmax, prints one markdown table and writes flashinfer-prefill-mask.json.

    python3 bench/flashinfer/prefill_mask.py --out DIR [--page-sizes 16 1]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashinfer_bench as fb  # noqa: E402

BATCH, QO_LEN, KV_LEN = 8, 64, 4096
TREE_SEED = 22
M64 = (1 << 64) - 1


def splitmix64(state):
    """(next state, output), as the Rust benchmark's `splitmix64`."""
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def tree_parents(batch, qo_len, seed):
    """Node 0 is the root; node j >= 1 hangs off node splitmix64() % j, one generator over the
    whole batch, request after request."""
    state, trees = seed, []
    for _ in range(batch):
        parents = [0]
        for j in range(1, qo_len):
            state, x = splitmix64(state)
            parents.append(x % j)
        trees.append(parents)
    return trees


def tree_mask(batch, qo_len, kv_len, seed):
    """[batch, qo_len, kv_len] booleans (numpy)."""
    import numpy as np

    prefix = kv_len - qo_len
    mask = np.zeros((batch, qo_len, kv_len), dtype=bool)
    mask[:, :, :prefix] = True
    for b, parents in enumerate(tree_parents(batch, qo_len, seed)):
        for j in range(qo_len):
            node = j
            while True:
                mask[b, j, prefix + node] = True
                if node == 0:
                    break
                node = parents[node]
    return mask


def masked_reference(q, k, v, mask):
    """Request-level reference: q [qo, HQ, D], k/v [kv, HKV, D], mask [qo, kv] -> [qo, HQ, D]."""
    torch = fb._torch()
    kk = k.float().repeat_interleave(fb.GROUP, dim=1)
    vv = v.float().repeat_interleave(fb.GROUP, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kk) / (fb.D ** 0.5)
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--page-sizes", type=int, nargs="*", default=[16, 1])
    args = ap.parse_args()
    fb.WARM_PHASES = ["prefill_fa2"]
    os.makedirs(args.out, exist_ok=True)
    res = {}
    ok = fb.run_jit(res, 240)
    fb.env_info(res)
    torch = fb._torch()
    import flashinfer

    mask = tree_mask(BATCH, QO_LEN, KV_LEN, TREE_SEED)
    kept = int(mask.sum())
    print(f"tree mask: seed {TREE_SEED}, {kept} of {mask.size} entries kept")
    mask_dev = torch.from_numpy(mask.reshape(-1)).to("cuda")
    res["mask"] = {"seed": TREE_SEED, "kept": kept}
    pool = fb.Pool(max(BATCH * fb.pages_for(KV_LEN, ps) * ps for ps in args.page_sizes))
    gen = torch.Generator(device="cuda")
    gen.manual_seed(99)
    ws = torch.zeros(fb.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    res["prefill_mask"] = rows
    flops = BATCH * 4 * QO_LEN * KV_LEN * fb.HQ * fb.D
    for ps in args.page_sizes:
        row = {"backend_requested": "fa2", "batch": BATCH, "qo_len": QO_LEN, "kv_len": KV_LEN,
               "page_size": ps, "flops": flops}
        rows.append(row)
        if not ok.get("prefill_fa2"):
            row["skipped"] = "JIT build failed"
            continue
        try:
            kv5d, total_pages = pool.view(ps)
            indptr, indices, last = fb.paged_meta(BATCH, KV_LEN, ps, total_pages, gen)
            qo = torch.arange(0, BATCH + 1, dtype=torch.int32, device="cuda") * QO_LEN
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
            w.plan(qo, indptr, indices, last, fb.HQ, fb.HKV, fb.D, ps, custom_mask=mask_dev,
                   q_data_type=torch.float16)
            row["backend"] = fb.resolved_backend(w)
            q = torch.randn(BATCH * QO_LEN, fb.HQ, fb.D, dtype=torch.float16, device="cuda")
            o = torch.empty_like(q)
            fn = lambda: w.run(q, kv5d, out=o)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            k, v = fb.gather_kv(kv5d, indices, BATCH, KV_LEN, ps)
            want = masked_reference(q[:QO_LEN], k[0], v[0], mask_dev.view(BATCH, QO_LEN, KV_LEN)[0])
            row["request0_max_abs_err"] = float((o[:QO_LEN].float() - want).abs().max())
            fb.time_call(row, fn, flops)
            del w, q, o
        except Exception as e:  # noqa: BLE001
            row["error"] = repr(e)[:500]
            import traceback

            traceback.print_exc()
        fb.log("prefill_mask", json.dumps(row))
    with open(os.path.join(args.out, "flashinfer-prefill-mask.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nFlashInfer prefill with a tree mask on {res['env'].get('gpu_name')}: "
          f"{BATCH} x {QO_LEN} drafts over {KV_LEN} keys, seed {TREE_SEED}, {kept} entries kept")
    print("| backend | page_size | median us | TFLOP/s | kernel us | kernel TFLOP/s | max abs err (request 0) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.get('backend', r['backend_requested'])} | {r['page_size']} | {fb.timed_cells(r)} |")
        if "error" in r:
            print(f"  error: {r['error']}")


if __name__ == "__main__":
    main()
