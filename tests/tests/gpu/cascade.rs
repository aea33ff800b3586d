//! Cascade decode against the f64 reference of plain decode over each request's whole
//! sequence: forked families of random prefix and suffix lengths, requests that share nothing,
//! page sizes 1, 7 and 16, several group sizes, soft cap.
use ferrinfer::{
    f16, reference, CacheShape, CascadeDecodePlan, DecodeOptions, Device, KvLayout, KvScales, SeqId, SequenceAllocator,
};
use ferrinfer_tests::ensure;
use ferrinfer_tests::graph::{capture_device, expect_graph_replay_matches};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{random_cache, random_sinks, random_values, rng};
use rand::Rng;

#[derive(Clone, Debug)]
struct Case {
    page_size: usize,
    /// Per family: the parent's prompt length and each member's own tokens after the fork.
    families: Vec<(usize, Vec<usize>)>,
    group: usize,
    head_dim: usize,
    options: DecodeOptions,
    /// Run with random attention sinks (`random_sinks`).
    sinks: bool,
}

fn cascade_case(dev: &Device, c: &Case) -> TestResult {
    let mut r = rng(c.page_size as u64 + 77);
    let shape = CacheShape {
        num_pages: 40_000 / c.page_size + 64,
        page_size: c.page_size,
        num_kv_heads: 2,
        head_dim: c.head_dim,
        layout: KvLayout::Nhd,
    };
    let (cache, host) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    let mut alloc = SequenceAllocator::new(shape.num_pages, c.page_size)?;
    let mut families: Vec<Vec<SeqId>> = Vec::new();
    for (prompt, own) in &c.families {
        let parent = alloc.create();
        alloc.reserve(parent, *prompt)?;
        let mut members = vec![parent];
        members.extend(own[1..].iter().map(|_| alloc.fork(parent)).collect::<Result<Vec<_>, _>>()?);
        // Copy-on-write copies are not applied: both sides read the same pool.
        for (&id, &n) in members.iter().zip(own) {
            alloc.reserve(id, n)?;
        }
        families.push(members);
    }
    let levels = alloc.cascade_levels(&families)?;
    let all: Vec<SeqId> = families.concat();
    let whole = alloc.page_table(&all)?;
    let heads = shape.num_kv_heads * c.group;
    let mut plan = CascadeDecodePlan::<f16>::new(dev, &shape, heads, &levels, c.options)?;
    let q: Vec<f16> = random_values(&mut r, plan.qo_elems());
    let mut out = dev.upload(&vec![f16::NAN; q.len()])?;
    let mut lse = dev.upload(&vec![f32::NAN; all.len() * heads])?;
    let (k, v) = (&host[0].0, &host[0].1);
    let (want, want_lse) = if c.sinks {
        let sinks = random_sinks(&mut r, heads);
        let on_device = dev.upload(&sinks)?;
        plan.run_with_sinks(dev.stream(), &dev.upload(&q)?, &cache, 0, Some(&on_device), &mut out, Some(&mut lse))?;
        reference::decode_with_sinks(&shape, k, v, KvScales::default(), &whole, &q, heads, &c.options, Some(&sinks))
    } else {
        plan.run(dev.stream(), &dev.upload(&q)?, &cache, 0, &mut out, Some(&mut lse))?;
        reference::decode(&shape, k, v, &whole, &q, heads, &c.options)
    };
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    // Two f16 partials are merged and rounded again: twice the f16 bound.
    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
        let g = g.to_f64();
        ensure!(
            (g - w).abs() <= 4e-3 + 2e-2 * w.abs(),
            "out[{i}] (request {}): GPU {g}, reference {w}",
            i / (heads * c.head_dim)
        );
    }
    for (i, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
        let ok =
            if w == f64::NEG_INFINITY { g == f32::NEG_INFINITY } else { (g as f64 - w).abs() <= 1e-3 + 1e-4 * w.abs() };
        ensure!(ok, "lse[{i}]: GPU {g}, reference {w}");
    }
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    let mut r = rng(4);
    for (page_size, group) in [(16, 4), (1, 1), (7, 5)] {
        let families: Vec<(usize, Vec<usize>)> = (0..3)
            .map(|f| (r.random_range(1..3000), (0..[5, 1, 3][f]).map(|_| r.random_range(0..300)).collect()))
            .collect();
        let c = Case { page_size, families, group, head_dim: 128, options: DecodeOptions::default(), sinks: false };
        t.push(GpuTest::new(format!("cascade_page_size_{page_size}_group_{group}_f16"), move |d| cascade_case(d, &c)));
    }
    let capped = DecodeOptions { logits_soft_cap: 20.0, sm_scale: Some(0.3), ..Default::default() };
    let c = Case {
        page_size: 16,
        families: vec![(8192, vec![256; 8]), (15, vec![0, 3])],
        group: 4,
        head_dim: 128,
        options: capped,
        sinks: false,
    };
    t.push(GpuTest::new("cascade_long_shared_prompt_soft_cap_f16", move |d| cascade_case(d, &c)));
    // The sink joins once: the unique level folds it in, the shared level stays sink-free.
    let families = vec![(3000, vec![5, 0, 300]), (0, vec![17]), (40, vec![0])];
    let c = Case { page_size: 7, families, group: 5, head_dim: 128, options: DecodeOptions::default(), sinks: true };
    t.push(GpuTest::new("cascade_sinks_page_size_7_group_5_f16", move |d| cascade_case(d, &c)));
    for head_dim in [80, 96] {
        let families = vec![(2000, vec![5, 0, 300]), (9, vec![17, 1])];
        let c = Case { page_size: 3, families, group: 4, head_dim, options: DecodeOptions::default(), sinks: true };
        t.push(GpuTest::new(format!("cascade_sinks_page_size_3_head_dim_{head_dim}_f16"), move |d| {
            cascade_case(d, &c)
        }));
    }
    t.push(GpuTest::new("cascade_replays_from_a_cuda_graph", cascade_replays_from_a_cuda_graph));
    t
}

/// Captures `run` (both levels, the side stream's fork and join, the merge) in a CUDA graph
/// and replays it: the same output as a direct run, bit for bit.
fn cascade_replays_from_a_cuda_graph(_: &Device) -> TestResult {
    // A device of its own (`capture_device` says why).
    let dev = capture_device()?;
    let mut r = rng(9);
    let shape = CacheShape { num_pages: 800, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    let (cache, _) = random_cache::<f16>(&dev, &mut r, shape, 1)?;
    let mut alloc = SequenceAllocator::new(shape.num_pages, 16)?;
    let parent = alloc.create();
    alloc.reserve(parent, 5000)?;
    let mut family = vec![parent];
    family.extend((1..6).map(|_| alloc.fork(parent)).collect::<Result<Vec<_>, _>>()?);
    for &id in &family {
        alloc.reserve(id, 77)?;
    }
    let levels = alloc.cascade_levels(&[family])?;
    let mut plan = CascadeDecodePlan::<f16>::new(&dev, &shape, 8, &levels, DecodeOptions::default())?;
    let q = dev.upload(&random_values::<f16>(&mut r, plan.qo_elems()))?;
    expect_graph_replay_matches(&dev, plan.qo_elems(), |stream, out| plan.run(stream, &q, &cache, 0, out, None))
}
