//! The safe API as an attacker would try it: pools swapped or shortened, buffers and streams of
//! another CUDA context, one plan run on two streams at once, planning while the GPU is busy,
//! and re-planning into the same buffers. Every attempt is an `Err` before any launch, or runs
//! correctly; none reaches the GPU with an address outside its buffers (these tests also run
//! under compute-sanitizer).
use cudarc::driver::{CudaContext, CudaSlice};
use ferrinfer::internals::ReadStream;
use ferrinfer::{
    f16, merge_state, reference, BatchDecodePlan, BatchPrefillPlan, CacheShape, CascadeDecodePlan, DecodeOptions,
    Device, Error, GatherPlan, KvLayout, LayerPools, PagedKvCache, PrefillOptions, SeqId, SequenceAllocator,
    StateShape,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{poison, random_cache, random_table, random_values, rng, shape_for};

/// The attack (`cache.layer_mut(0)?.k = dev.alloc_zeros(8)?` then a decode run) no
/// longer compiles: pools are private and `layer` lends them read-only (compile-fail doctests
/// on `LayerPools`). Every way left to put a short or foreign pool under a plan is an `Err`.
fn swapped_or_short_pools_are_an_error_never_a_launch(dev: &Device) -> TestResult {
    let mut r = rng(31);
    let kv_lens = [300, 40];
    let shape = shape_for(&kv_lens, 16, 2, 128, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 16, shape.num_pages);
    let (mut cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let small = CacheShape { num_pages: 1, ..shape };
    let mut other = PagedKvCache::<f16>::new(dev, small, 1)?;
    let mut plan = BatchDecodePlan::new(dev, &shape, 8, &table, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;

    // Swapping whole caches swaps their shapes too: the plan sees the small one's.
    std::mem::swap(&mut cache, &mut other);
    let e = plan.run(dev.stream(), &q, &cache, 0, &mut out, None).err().ok_or("ran on a swapped-in small cache")?;
    ensure!(matches!(e, Error::ShapeMismatch { .. }), "wrong error: {e}");
    std::mem::swap(&mut cache, &mut other);

    // A short pool cannot enter a cache, neither new nor taken from a smaller cache.
    let short =
        || -> ferrinfer::Result<LayerPools<f16>> { Ok(LayerPools::new(dev.alloc_zeros(8)?, dev.alloc_zeros(8)?)) };
    let e = PagedKvCache::from_layers(shape, vec![short()?]).err().ok_or("accepted 8-element pools")?;
    ensure!(matches!(e, Error::BufferLength { what: "K page pool", got: 8, .. }), "wrong error: {e}");
    let e = PagedKvCache::from_layers(shape, other.into_layers()).err().ok_or("accepted another shape's pools")?;
    ensure!(matches!(e, Error::BufferLength { .. }), "wrong error: {e}");

    // Ragged K/V and raw pools are checked against the plan at every run.
    let mut ragged = BatchPrefillPlan::ragged(dev, 2, 128, 8, &[0, 3], &[0, 5], PrefillOptions::default())?;
    let (k, v) = (dev.alloc_zeros::<f16>(4 * 2 * 128)?, dev.alloc_zeros::<f16>(5 * 2 * 128)?);
    let (q3, mut out3) = (dev.alloc_zeros::<f16>(3 * 8 * 128)?, dev.alloc_zeros::<f16>(3 * 8 * 128)?);
    let e = ragged.run_ragged(dev.stream(), &q3, &k, &v, &mut out3, None).err().ok_or("accepted a 4-row K")?;
    ensure!(matches!(e, Error::BufferLength { what: "k", .. }), "wrong error: {e}");

    // The cache is unharmed: the plan still runs on it.
    plan.run(dev.stream(), &q, &cache, 0, &mut out, None)?;
    dev.synchronize()?;
    Ok(())
}

/// One plan whose batch splits (so its scratch holds partial outputs and merge counters), run
/// alternately on two streams with no host synchronisation between runs: the scratch is
/// tracked as written, so each run waits for the last; every output equals a serial run's bit
/// for bit. Decode, prefill and cascade (whose shared level also uses the plan's side stream).
fn one_split_plan_on_two_streams_matches_serial_runs(dev: &Device) -> TestResult {
    let mut r = rng(41);
    let kv_lens = [20000, 9000];
    let shape = shape_for(&kv_lens, 16, 2, 128, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 16, shape.num_pages);
    let (cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let (a, b) = (dev.new_stream()?, dev.new_stream()?);
    const ROUNDS: usize = 24;

    let mut decode = BatchDecodePlan::new(dev, &shape, 8, &table, DecodeOptions::default())?;
    ensure!(decode.launch_shape().1 > 0, "the decode case should split");
    let queries: Vec<CudaSlice<f16>> =
        (0..ROUNDS).map(|_| dev.upload(&random_values::<f16>(&mut r, decode.qo_elems()))).collect::<Result<_, _>>()?;
    let serial = |plan: &mut BatchDecodePlan| -> ferrinfer::Result<Vec<Vec<f16>>> {
        queries
            .iter()
            .map(|q| {
                let mut out = dev.alloc_zeros::<f16>(q.len())?;
                plan.run(dev.stream(), q, &cache, 0, &mut out, None)?;
                dev.download(&out)
            })
            .collect()
    };
    let want = serial(&mut decode)?;
    let mut outs: Vec<CudaSlice<f16>> =
        queries.iter().map(|q| dev.upload(&vec![poison::<f16>(); q.len()])).collect::<Result<_, _>>()?;
    for (i, (q, out)) in queries.iter().zip(&mut outs).enumerate() {
        decode.run(if i % 2 == 0 { &a } else { &b }, q, &cache, 0, out, None)?;
    }
    for (i, out) in outs.iter().enumerate() {
        ensure!(dev.download(out)? == want[i], "decode round {i} on two streams differs from the serial run");
    }

    let qo_indptr = [0u32, 1, 70];
    let causal = PrefillOptions { causal: true, ..Default::default() };
    let mut prefill = BatchPrefillPlan::new(dev, &shape, 8, &qo_indptr, &table, causal)?;
    ensure!(prefill.split_tiles().0 > 0, "the prefill case should split");
    let queries: Vec<CudaSlice<f16>> =
        (0..ROUNDS).map(|_| dev.upload(&random_values::<f16>(&mut r, prefill.qo_elems()))).collect::<Result<_, _>>()?;
    let mut want = Vec::new();
    for q in &queries {
        let mut out = dev.alloc_zeros::<f16>(q.len())?;
        prefill.run(dev.stream(), q, &cache, 0, &mut out, None)?;
        want.push(dev.download(&out)?);
    }
    for (i, q) in queries.iter().enumerate() {
        let mut out = dev.upload(&vec![poison::<f16>(); q.len()])?;
        prefill.run(if i % 2 == 0 { &a } else { &b }, q, &cache, 0, &mut out, None)?;
        outs[i] = out;
    }
    for (i, out) in outs.iter().enumerate() {
        ensure!(dev.download(out)? == want[i], "prefill round {i} on two streams differs from the serial run");
    }

    // Cascade: a family of 16 sharing a 5000-token prompt.
    let (cshape, ccache, levels, heads) = cascade_family(dev, 16, 5000, 40)?;
    let mut cascade = CascadeDecodePlan::<f16>::new(dev, &cshape, heads, &levels, DecodeOptions::default())?;
    let queries: Vec<CudaSlice<f16>> =
        (0..ROUNDS).map(|_| dev.upload(&random_values::<f16>(&mut r, cascade.qo_elems()))).collect::<Result<_, _>>()?;
    let mut want = Vec::new();
    for q in &queries {
        let mut out = dev.alloc_zeros::<f16>(q.len())?;
        cascade.run(dev.stream(), q, &ccache, 0, &mut out, None)?;
        want.push(dev.download(&out)?);
    }
    let mut outs = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        let mut out = dev.upload(&vec![poison::<f16>(); q.len()])?;
        cascade.run(if i % 2 == 0 { &a } else { &b }, q, &ccache, 0, &mut out, None)?;
        outs.push(out);
    }
    for (i, out) in outs.iter().enumerate() {
        ensure!(dev.download(out)? == want[i], "cascade round {i} on two streams differs from the serial run");
    }
    Ok(())
}

/// A cascade workload: the cache's shape, the cache, the levels and the query heads.
type Family = (CacheShape, PagedKvCache<f16>, ferrinfer::CascadeLevels, usize);

/// A cache and cascade levels for one family of `members` forked from a `prompt`-token parent,
/// each with `own` tokens after the fork; 2 KV heads of 128, group 4.
fn cascade_family(
    dev: &Device,
    members: usize,
    prompt: usize,
    own: usize,
) -> Result<Family, Box<dyn std::error::Error>> {
    let mut r = rng(51);
    let shape = CacheShape {
        num_pages: (prompt + members * (own + 16)) / 16 + members + 8,
        page_size: 16,
        num_kv_heads: 2,
        head_dim: 128,
        layout: KvLayout::Nhd,
    };
    let (cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let mut alloc = SequenceAllocator::new(shape.num_pages, 16)?;
    let parent = alloc.create();
    alloc.reserve(parent, prompt)?;
    let mut family: Vec<SeqId> = vec![parent];
    family.extend((1..members).map(|_| alloc.fork(parent)).collect::<Result<Vec<_>, _>>()?);
    for &id in &family {
        alloc.reserve(id, own)?;
    }
    Ok((shape, cache, alloc.cascade_levels(&[family])?, 8))
}

/// Streams, buffers and caches of another CUDA context are refused by every launch; two
/// `Device`s on the primary context of one GPU share it and mix freely.
fn plans_refuse_streams_and_buffers_of_another_context(dev: &Device) -> TestResult {
    let mut r = rng(61);
    let kv_lens = [100, 7];
    let shape = shape_for(&kv_lens, 7, 2, 64, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 7, shape.num_pages);
    let (cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let mut plan = BatchDecodePlan::new(dev, &shape, 4, &table, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;

    // Another context on the same GPU: its pointers mean nothing in the plan's.
    let other = Device::from_context(CudaContext::new_non_primary(dev.context().ordinal(), 0)?)?;
    let mismatch = |e: Error, what: &str| -> TestResult {
        ensure!(matches!(e, Error::DeviceMismatch { what: w } if w == what), "expected a mismatch of {what}, got: {e}");
        Ok(())
    };
    let e = plan.run(other.stream(), &q, &cache, 0, &mut out, None).err().ok_or("ran on a foreign stream")?;
    mismatch(e, "stream")?;
    let q_other = other.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    let e = plan.run(dev.stream(), &q_other, &cache, 0, &mut out, None).err().ok_or("ran a foreign q")?;
    mismatch(e, "q")?;
    let mut out_other = other.alloc_zeros::<f16>(plan.qo_elems())?;
    let e = plan.run(dev.stream(), &q, &cache, 0, &mut out_other, None).err().ok_or("wrote a foreign out")?;
    mismatch(e, "out")?;
    let mut lse_other = other.alloc_zeros::<f32>(2 * 4)?;
    let e = plan.run(dev.stream(), &q, &cache, 0, &mut out, Some(&mut lse_other)).err().ok_or("foreign lse")?;
    mismatch(e, "lse")?;
    let (cache_other, _) = random_cache::<f16>(&other, &mut r, shape, 1)?;
    let e = plan.run(dev.stream(), &q, &cache_other, 0, &mut out, None).err().ok_or("read a foreign cache")?;
    mismatch(e, "cache")?;
    let gather = GatherPlan::new(dev, &shape, &table)?;
    let (mut k, mut v) =
        (other.alloc_zeros::<f16>(gather.ragged_elems())?, dev.alloc_zeros::<f16>(gather.ragged_elems())?);
    let e = gather.run(dev.stream(), &cache, 0, &mut k, &mut v).err().ok_or("gathered into a foreign buffer")?;
    mismatch(e, "ragged K")?;
    let state = StateShape { heads: 4, head_dim: 64 };
    let (va, sa) = (dev.alloc_zeros::<f16>(2 * 4 * 64)?, dev.alloc_zeros::<f32>(2 * 4)?);
    let (vb, sb) = (other.alloc_zeros::<f16>(2 * 4 * 64)?, dev.alloc_zeros::<f32>(2 * 4)?);
    let mut vo = dev.alloc_zeros::<f16>(2 * 4 * 64)?;
    let e = merge_state(dev, dev.stream(), state, &va, &sa, &vb, &sb, &mut vo, None)
        .err()
        .ok_or("merged a foreign state")?;
    mismatch(e, "v_b")?;

    // A second Device on GPU 0's primary context is the same context: accepted.
    let same = Device::new(dev.context().ordinal())?;
    plan.run(same.stream(), &same.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?, &cache, 0, &mut out, None)?;
    same.synchronize()?;
    Ok(())
}

/// Planning enqueues its upload and returns while the GPU is still busy with earlier work (no
/// device-wide synchronisation), and the plan's runs see the new metadata: queued behind ~50 ms
/// of reads, `new` and `replan` return before that work finishes, and the runs after them match
/// the reference.
fn planning_does_not_wait_for_the_gpu(dev: &Device) -> TestResult {
    let mut r = rng(71);
    let kv_lens: Vec<usize> = (0..64).map(|i| 100 + 37 * i).collect();
    let shape = shape_for(&kv_lens, 16, 2, 128, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 16, shape.num_pages);
    let (cache, host) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    // Warm every buffer of the staging ring to this batch's size (pinning memory is slow).
    let mut plan = BatchDecodePlan::new(dev, &shape, 8, &table, DecodeOptions::default())?;
    for _ in 0..4 {
        plan.replan(&shape, 8, &table, DecodeOptions::default())?;
    }
    dev.synchronize()?;

    let mut busy = ReadStream::new(dev, 1 << 30)?;
    for _ in 0..200 {
        busy.run(dev.stream())?;
    }
    let done = dev.stream().record_event(None)?;
    let mut fresh = BatchDecodePlan::new(dev, &shape, 8, &table, DecodeOptions::default())?;
    let shorter =
        ferrinfer::PageTable { kv_last_page_len: table.kv_last_page_len.iter().map(|_| 1).collect(), ..table.clone() };
    plan.replan(&shape, 8, &shorter, DecodeOptions::default())?;
    ensure!(!done.is_complete(), "planning waited for the GPU (the queued reads had finished when it returned)");

    for (p, t) in [(&mut fresh, &table), (&mut plan, &shorter)] {
        let q: Vec<f16> = random_values(&mut r, p.qo_elems());
        let mut out = dev.upload(&vec![poison::<f16>(); q.len()])?;
        let mut lse = dev.upload(&vec![f32::NAN; kv_lens.len() * 8])?;
        p.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
        let (want, want_lse) = reference::decode(&shape, &host[0].0, &host[0].1, t, &q, 8, &DecodeOptions::default());
        expect_attention_close(&dev.download(&out)?, &want, &dev.download(&lse)?, &want_lse, 8, 128, "request")?;
    }
    Ok(())
}

/// One plan re-planned for a sequence of different batches (larger, smaller, split and not)
/// with no host synchronisation between steps: each step's runs see that step's metadata and
/// match the reference; a rejected batch leaves the plan as it was.
fn replan_serves_step_after_step(dev: &Device) -> TestResult {
    let mut r = rng(81);
    let steps: [&[usize]; 4] = [&[5, 900], &[30000], &(1..=40).collect::<Vec<_>>(), &[0, 3000, 17]];
    let all: Vec<usize> = steps.iter().flat_map(|s| s.iter().copied()).collect();
    let shape = shape_for(&all, 7, 2, 128, KvLayout::Hnd);
    let (cache, host) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let first = random_table(&mut r, steps[0], 7, shape.num_pages);
    let mut decode = BatchDecodePlan::new(dev, &shape, 8, &first, DecodeOptions::default())?;
    let causal = PrefillOptions { causal: true, ..Default::default() };
    let qo_of = |lens: &[usize]| -> Vec<u32> {
        std::iter::once(0)
            .chain(lens.iter().scan(0u32, |at, &l| {
                *at += l.min(50) as u32;
                Some(*at)
            }))
            .collect()
    };
    let mut prefill = BatchPrefillPlan::new(dev, &shape, 8, &qo_of(steps[0]), &first, causal)?;
    let mut checks = Vec::new();
    for (i, lens) in steps.iter().enumerate() {
        let table = random_table(&mut r, lens, 7, shape.num_pages);
        decode.replan(&shape, 8, &table, DecodeOptions::default())?;
        let q: Vec<f16> = random_values(&mut r, decode.qo_elems());
        let mut out = dev.upload(&vec![poison::<f16>(); q.len()])?;
        decode.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, None)?;
        let qo = qo_of(lens);
        prefill.replan(&shape, 8, &qo, &table, causal)?;
        let pq: Vec<f16> = random_values(&mut r, prefill.qo_elems());
        let mut pout = dev.upload(&vec![poison::<f16>(); pq.len()])?;
        prefill.run(dev.stream(), &dev.upload(&pq)?, &cache, 0, &mut pout, None)?;
        // A rejected replan (a page past the pool) changes nothing.
        let mut bad = table.clone();
        if let Some(p) = bad.kv_indices.first_mut() {
            *p = shape.num_pages as u32;
            ensure!(decode.replan(&shape, 8, &bad, DecodeOptions::default()).is_err(), "accepted a page past the pool");
        }
        checks.push((i, table, qo, q, out, pq, pout));
    }
    for (i, table, qo, q, out, pq, pout) in checks {
        let (want, _) = reference::decode(&shape, &host[0].0, &host[0].1, &table, &q, 8, &DecodeOptions::default());
        expect_attention_close(&dev.download(&out)?, &want, &[], &[], 8, 128, "request")
            .map_err(|e| format!("decode step {i}: {e}"))?;
        let (want, _) = reference::prefill(&shape, &host[0].0, &host[0].1, &table, &qo, &pq, 8, &causal);
        expect_attention_close(&dev.download(&pout)?, &want, &[], &[], 8, 128, "token")
            .map_err(|e| format!("prefill step {i}: {e}"))?;
    }
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    vec![
        GpuTest::new(
            "swapped_or_short_pools_are_an_error_never_a_launch",
            swapped_or_short_pools_are_an_error_never_a_launch,
        ),
        GpuTest::new(
            "one_split_plan_on_two_streams_matches_serial_runs",
            one_split_plan_on_two_streams_matches_serial_runs,
        ),
        GpuTest::new(
            "plans_refuse_streams_and_buffers_of_another_context",
            plans_refuse_streams_and_buffers_of_another_context,
        ),
        GpuTest::new("planning_does_not_wait_for_the_gpu", planning_does_not_wait_for_the_gpu),
        GpuTest::new("replan_serves_step_after_step", replan_serves_step_after_step),
    ]
}
