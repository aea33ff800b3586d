//! RoPE (`RopePlan`) and RoPE fused into the append (`AppendRopePlan`) against the f64
//! reference, which computes every angle from the definition in f64: NeoX and GPT-J pairs,
//! partial rotary dims (including NeoX's one-pair-at-a-time case), FlashInfer's four angle
//! sources, positions up to 131072, ragged batches with empty and one-token requests, head
//! counts that do not fill a group of four, in place and out of place; the fused append at
//! page sizes 1, 3, 7, 100 and 513 in both layouts. And every validation error before a launch.
//!
//! Bound (module documentation of `ops::rope`): each rotated element within one unit in the last
//! place of its type (at the reference value) plus `3e-6 · (|a| + |b|)`, here `6e-6` (inputs in
//! [-1, 1)); dims past `rotary_dim` exactly the input; NaN never passes; outputs start poisoned.
use cudarc::driver::CudaContext;
use ferrinfer::{
    bf16, f16, reference, AppendRopePlan, CacheShape, DType, Device, Error, KvDType, KvLayout, RopeAngles, RopeOptions,
    RopePlan, RopePositions, RopeShape,
};
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{poison, random_cache, random_table, random_values, rng, shape_for};
use rand::Rng;

/// One unit in the last place of `x` in `dtype` (f16 or bf16), subnormals included.
fn ulp(x: f64, dtype: DType) -> f64 {
    let (min_exp, mant) = if dtype == DType::F16 { (-14, 10) } else { (-126, 7) };
    let e = if x == 0.0 { min_exp } else { (x.abs().log2().floor() as i32).max(min_exp) };
    2f64.powi(e - mant)
}

/// Checks rotated rows `got` against the reference `want`; dims from `rotary_dim` on must be
/// `input` bit for bit (when given).
fn expect_rotated<T: KvDType>(
    what: &str,
    got: &[T],
    want: &[f64],
    input: Option<&[T]>,
    head_dim: usize,
    rotary_dim: usize,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} elements, reference has {}", got.len(), want.len()));
    }
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f64();
        let d = i % head_dim;
        let ok = if d >= rotary_dim {
            input.is_none_or(|x| x[i].to_f64().to_bits() == g.to_bits()) && g == w
        } else {
            (g - w).abs() <= ulp(w, T::DTYPE) + 6e-6
        };
        if !ok {
            return Err(format!("{what}[{i}] (row {}, dim {d}): GPU {g}, reference {w}", i / head_dim));
        }
    }
    Ok(())
}

/// A RoPE case: heads, dims, how positions are given and the options.
#[derive(Clone, Debug)]
struct Case {
    q_heads: usize,
    k_heads: usize,
    head_dim: usize,
    options: RopeOptions,
    /// Request lengths (`Ragged`) — or, with `pos_ids`, just the token count (their sum).
    lens: Vec<usize>,
    /// Explicit positions up to this (inclusive), else each request from a random offset.
    pos_ids: Option<u64>,
    in_place: bool,
    seed: u64,
}

impl Case {
    fn new(head_dim: usize, options: RopeOptions) -> Self {
        Case {
            q_heads: 8,
            k_heads: 2,
            head_dim,
            options,
            lens: vec![0, 1, 37, 0, 130, 1, 64],
            pos_ids: None,
            in_place: true,
            seed: 1,
        }
    }
}

/// A cos/sin cache of `rows` positions: cos and sin of random angles (any values would do).
fn random_cos_sin(rng: &mut impl Rng, rows: usize, rotary_dim: usize) -> Vec<f32> {
    let mut cache = vec![0.0f32; rows * rotary_dim];
    for row in cache.chunks_mut(rotary_dim) {
        for i in 0..rotary_dim / 2 {
            let a: f64 = rng.random_range(-10.0..10.0);
            row[i] = a.cos() as f32;
            row[rotary_dim / 2 + i] = a.sin() as f32;
        }
    }
    cache
}

fn rope_case<T: KvDType>(dev: &Device, case: &Case) -> TestResult {
    let mut r = rng(case.seed);
    let tokens: usize = case.lens.iter().sum();
    let max_position = match case.options.angles {
        RopeAngles::CosSinCache { max_position } => max_position as u64,
        _ => 131073,
    };
    let (indptr, offsets): (Vec<u32>, Vec<u32>) = (
        std::iter::once(0)
            .chain(case.lens.iter().scan(0u32, |a, &n| {
                *a += n as u32;
                Some(*a)
            }))
            .collect(),
        case.lens.iter().map(|&n| r.random_range(0..=max_position - n as u64) as u32).collect(),
    );
    let pos_ids: Vec<u32> = match case.pos_ids {
        // Random positions up to the limit, the limit itself among them.
        Some(last) => (0..tokens).map(|t| if t == 3 { last as u32 } else { r.random_range(0..=last) as u32 }).collect(),
        None => Vec::new(),
    };
    let positions = match case.pos_ids {
        Some(_) => RopePositions::PerToken(&pos_ids),
        None => RopePositions::Ragged { indptr: &indptr, offsets: &offsets },
    };
    let expanded: Vec<u64> = match case.pos_ids {
        Some(_) => pos_ids.iter().map(|&p| p as u64).collect(),
        None => indptr
            .windows(2)
            .zip(&offsets)
            .flat_map(|(w, &o)| (0..(w[1] - w[0]) as u64).map(move |i| o as u64 + i))
            .collect(),
    };
    let shape = RopeShape { num_qo_heads: case.q_heads, num_kv_heads: case.k_heads, head_dim: case.head_dim };
    let plan = RopePlan::new(dev, shape, positions, case.options)?;
    ensure!(plan.tokens() == tokens, "plan has {} tokens, expected {tokens}", plan.tokens());
    let rotary_dim = case.options.rotary_dim.unwrap_or(case.head_dim);
    let cache_host = match case.options.angles {
        RopeAngles::CosSinCache { max_position } => Some(random_cos_sin(&mut r, max_position, rotary_dim)),
        _ => None,
    };
    let cache_dev = cache_host.as_ref().map(|c| dev.upload(c)).transpose()?;
    let cache_arg = cache_dev.as_ref().map(|c| c as &dyn cudarc::driver::DevicePtr<f32>);
    let q: Vec<T> = random_values(&mut r, plan.q_elems());
    let k: Vec<T> = random_values(&mut r, plan.k_elems());
    let (q_got, k_got) = if case.in_place {
        let (mut qd, mut kd) = (dev.upload(&q)?, dev.upload(&k)?);
        plan.run(dev.stream(), &mut qd, &mut kd, cache_arg)?;
        (dev.download(&qd)?, dev.download(&kd)?)
    } else {
        let (qd, kd) = (dev.upload(&q)?, dev.upload(&k)?);
        // One poisoned element past each output: it must stay poisoned.
        let (mut qo, mut ko) =
            (dev.upload(&vec![poison::<T>(); q.len() + 1])?, dev.upload(&vec![poison::<T>(); k.len() + 1])?);
        let (mut qv, mut kv) = (qo.slice_mut(..q.len()), ko.slice_mut(..k.len()));
        plan.run_out_of_place(dev.stream(), &qd, &kd, &mut qv, &mut kv, cache_arg)?;
        let (qg, kg) = (dev.download(&qo)?, dev.download(&ko)?);
        ensure!(
            qg[q.len()].to_f64().is_nan() && kg[k.len()].to_f64().is_nan(),
            "an element past an output was written"
        );
        ensure!(dev.download(&qd)? == q && dev.download(&kd)? == k, "out of place changed its inputs");
        (qg[..q.len()].to_vec(), kg[..k.len()].to_vec())
    };
    let cache = cache_host.as_deref();
    let want_q = reference::rope(&q, case.q_heads, case.head_dim, &expanded, &case.options, cache);
    let want_k = reference::rope(&k, case.k_heads, case.head_dim, &expanded, &case.options, cache);
    expect_rotated("q", &q_got, &want_q, Some(&q), case.head_dim, rotary_dim)?;
    expect_rotated("k", &k_got, &want_k, Some(&k), case.head_dim, rotary_dim)?;
    Ok(())
}

fn standard(rope_theta: f64, rope_scale: f64) -> RopeAngles {
    RopeAngles::Standard { rope_theta, rope_scale }
}

fn options(rotary_dim: Option<usize>, interleave: bool, angles: RopeAngles) -> RopeOptions {
    RopeOptions { rotary_dim, interleave, angles }
}

fn rope_tests() -> Vec<GpuTest> {
    let mut tests = Vec::new();
    let mut add = |name: &str, dtype: DType, case: Case| {
        let name = format!("{name}_{}", dtype.name());
        tests.push(match dtype {
            DType::F16 => GpuTest::new(name, move |d| rope_case::<f16>(d, &case)),
            _ => GpuTest::new(name, move |d| rope_case::<bf16>(d, &case)),
        });
    };
    let llama31 = RopeOptions::llama31().angles;
    for (seed, dtype) in [(0, DType::F16), (100, DType::BF16)] {
        let c = |head_dim, o| Case { seed: seed + head_dim as u64, ..Case::new(head_dim, o) };
        add("rope_neox_in_place_ragged_batch", dtype, c(128, RopeOptions::default()));
        add("rope_neox_out_of_place_ragged_batch", dtype, Case { in_place: false, ..c(128, RopeOptions::default()) });
        add("rope_gptj_in_place_ragged_batch", dtype, c(128, options(None, true, standard(1e4, 1.0))));
        add(
            "rope_gptj_out_of_place_head_dim_256",
            dtype,
            Case { in_place: false, ..c(256, options(None, true, standard(1e4, 1.0))) },
        );
        add(
            "rope_neox_partial_rotary_64_of_128",
            dtype,
            Case { in_place: false, ..c(128, options(Some(64), false, standard(1e4, 1.0))) },
        );
        add("rope_neox_partial_rotary_64_of_128_in_place", dtype, c(128, options(Some(64), false, standard(1e4, 1.0))));
        add(
            "rope_gptj_partial_rotary_20_of_64",
            dtype,
            Case { in_place: false, ..c(64, options(Some(20), true, standard(1e4, 1.0))) },
        );
        // GPT-NeoX-20B: 24 of 96, whose 12-pair halves are not whole 16-byte vectors.
        add(
            "rope_neox_partial_rotary_24_of_96",
            dtype,
            Case { in_place: false, ..c(96, options(Some(24), false, standard(1e4, 1.0))) },
        );
        add("rope_neox_partial_rotary_24_of_96_in_place", dtype, c(96, options(Some(24), false, standard(1e4, 1.0))));
        add("rope_neox_scale_4_theta_5e5", dtype, c(128, options(None, false, standard(5e5, 4.0))));
        add(
            "rope_pos_ids_neox_positions_up_to_131072",
            dtype,
            Case { pos_ids: Some(131072), ..c(128, RopeOptions::default()) },
        );
        add(
            "rope_pos_ids_gptj_positions_up_to_131072_out_of_place",
            dtype,
            Case { pos_ids: Some(131072), in_place: false, ..c(64, options(None, true, standard(1e4, 1.0))) },
        );
        add(
            "rope_llama31_neox_positions_up_to_131072",
            dtype,
            Case { pos_ids: Some(131072), ..c(128, RopeOptions::llama31()) },
        );
        add("rope_llama31_gptj_ragged_batch", dtype, c(128, options(None, true, llama31)));
        let cache = |rd, neox| RopeOptions::cos_sin_cache(4096, rd, neox);
        add("rope_cos_sin_cache_neox", dtype, c(128, cache(128, true)));
        add("rope_cos_sin_cache_gptj_out_of_place", dtype, Case { in_place: false, ..c(128, cache(128, false)) });
        add("rope_cos_sin_cache_neox_partial_rotary_64_of_128", dtype, c(128, cache(64, true)));
        add(
            "rope_cos_sin_cache_pos_ids_to_the_last_row",
            dtype,
            Case { pos_ids: Some(4095), ..c(128, cache(128, true)) },
        );
        // 6 query and 3 key heads: groups of four left part-full.
        add(
            "rope_neox_6_query_3_key_heads",
            dtype,
            Case { q_heads: 6, k_heads: 3, in_place: false, ..c(128, RopeOptions::default()) },
        );
        // FlashInfer's benchmark shape, 32 + 8 heads, 2048 tokens.
        add(
            "rope_neox_32_query_8_key_heads_2048_tokens",
            dtype,
            Case { q_heads: 32, k_heads: 8, lens: vec![1024, 1, 1023], ..c(128, RopeOptions::default()) },
        );
    }
    tests
}

/// Appends with RoPE into layer 1 of a 2-layer cache: every pool element must be its reference
/// (untouched ones bit for bit, appended keys within the bound, appended values bit for bit),
/// and the queries rotated in place.
fn append_rope_case<T: KvDType>(
    dev: &Device,
    page_size: usize,
    layout: KvLayout,
    options: RopeOptions,
    seed: u64,
) -> TestResult {
    let mut r = rng(seed);
    let p = page_size;
    let kv_lens = [0, 1, p.saturating_sub(1).max(1), p, p + 1, 3 * p + p / 2 + 1, 0, 2 * p];
    let (heads, head_dim, q_heads) = (3, 64, 5);
    let shape = shape_for(&kv_lens, page_size, heads, head_dim, layout);
    let table = random_table(&mut r, &kv_lens, page_size, shape.num_pages);
    let append_lens: Vec<usize> =
        kv_lens.iter().enumerate().map(|(i, &n)| if i % 3 == 0 { n } else { r.random_range(0..=n) }).collect();
    let append_indptr: Vec<u32> = std::iter::once(0)
        .chain(append_lens.iter().scan(0, |a, &n| {
            *a += n as u32;
            Some(*a)
        }))
        .collect();
    let (mut cache, host) = random_cache::<T>(dev, &mut r, shape, 2)?;
    let plan = AppendRopePlan::new(dev, &shape, &table, &append_indptr, q_heads, options)?;
    let rotary_dim = options.rotary_dim.unwrap_or(head_dim);
    let cache_host = match options.angles {
        RopeAngles::CosSinCache { max_position } => Some(random_cos_sin(&mut r, max_position, rotary_dim)),
        _ => None,
    };
    let cache_dev = cache_host.as_ref().map(|c| dev.upload(c)).transpose()?;
    let cache_arg = cache_dev.as_ref().map(|c| c as &dyn cudarc::driver::DevicePtr<f32>);
    let n = plan.ragged_elems();
    let (q, k, v): (Vec<T>, Vec<T>, Vec<T>) =
        (random_values(&mut r, plan.q_elems()), random_values(&mut r, n), random_values(&mut r, n));
    let mut qd = dev.upload(&q)?;
    plan.run(dev.stream(), &mut qd, &dev.upload(&k)?, &dev.upload(&v)?, &mut cache, 1, cache_arg)?;
    // Positions: each appended token's place in its sequence.
    let positions: Vec<u64> =
        kv_lens.iter().zip(&append_lens).flat_map(|(&kv, &a)| (kv - a..kv).map(|p| p as u64)).collect();
    let want_q = reference::rope(&q, q_heads, head_dim, &positions, &options, cache_host.as_deref());
    expect_rotated("q", &dev.download(&qd)?, &want_q, Some(&q), head_dim, rotary_dim)?;
    let want_k = reference::rope(&k, heads, head_dim, &positions, &options, cache_host.as_deref());
    for (layer, (k_pool, v_pool)) in host.iter().enumerate() {
        let pools = cache.layer(layer)?;
        let (got_k, got_v) = (dev.download(pools.k())?, dev.download(pools.v())?);
        // The expected pools, and which elements the append wrote.
        let mut want_kp: Vec<f64> = k_pool.iter().map(|x| x.to_f64()).collect();
        let mut want_vp = v_pool.clone();
        let mut written = vec![false; shape.pool_elems()];
        if layer == 1 {
            reference::append(&shape, &mut want_kp, &table, &append_indptr, &want_k);
            reference::append(&shape, &mut want_vp, &table, &append_indptr, &v);
            reference::append(&shape, &mut written, &table, &append_indptr, &vec![true; n]);
        }
        ensure!(
            got_v.iter().zip(&want_vp).all(|(g, w)| g.to_f64().to_bits() == w.to_f64().to_bits()),
            "layer {layer} V pool differs from the reference"
        );
        for (i, (g, &w)) in got_k.iter().zip(&want_kp).enumerate() {
            let (g, d) = (g.to_f64(), i % head_dim);
            let ok = if written[i] && d < rotary_dim {
                (g - w).abs() <= ulp(w, T::DTYPE) + 6e-6
            } else {
                g.to_bits() == w.to_bits()
            };
            ensure!(ok, "layer {layer} K pool[{i}] (dim {d}, appended: {}): GPU {g}, reference {w}", written[i]);
        }
    }
    Ok(())
}

fn append_rope_tests() -> Vec<GpuTest> {
    let mut tests = Vec::new();
    for page_size in [1, 3, 7, 100, 513] {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            let l = format!("{layout:?}").to_lowercase();
            let s = page_size as u64;
            tests.push(GpuTest::new(format!("append_rope_page_size_{page_size}_{l}_neox_f16"), move |d| {
                append_rope_case::<f16>(d, page_size, layout, RopeOptions::default(), s)
            }));
            tests.push(GpuTest::new(format!("append_rope_page_size_{page_size}_{l}_llama31_gptj_bf16"), move |d| {
                let o = RopeOptions { interleave: true, ..RopeOptions::llama31() };
                append_rope_case::<bf16>(d, page_size, layout, o, 50 + s)
            }));
        }
    }
    tests.push(GpuTest::new("append_rope_page_size_7_nhd_partial_rotary_24_of_64_f16", |d| {
        let o = RopeOptions { rotary_dim: Some(24), ..Default::default() };
        append_rope_case::<f16>(d, 7, KvLayout::Nhd, o, 91)
    }));
    tests.push(GpuTest::new("append_rope_page_size_16_hnd_cos_sin_cache_bf16", |d| {
        append_rope_case::<bf16>(d, 16, KvLayout::Hnd, RopeOptions::cos_sin_cache(2048, 64, true), 92)
    }));
    tests
}

/// Dims past `rotary_dim` come out as they went in, bit for bit, whatever they hold (±0, ±∞,
/// NaN, the largest finite value), in place and out of place, for each pairing.
fn rope_leaves_dims_past_rotary_dim_bit_for_bit<T: KvDType>(
    dev: &Device,
    rotary_dim: usize,
    interleave: bool,
) -> TestResult {
    let mut r = rng(rotary_dim as u64);
    let head_dim = 64;
    let shape = RopeShape { num_qo_heads: 5, num_kv_heads: 3, head_dim };
    let positions: Vec<u32> = (0..9).map(|_| r.random_range(0..131072)).collect();
    let o = RopeOptions { rotary_dim: Some(rotary_dim), interleave, ..Default::default() };
    let plan = RopePlan::new(dev, shape, RopePositions::PerToken(&positions), o)?;
    let specials = [-0.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 65504.0, 0.0, -1.5];
    let fill = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<T> {
        let mut x: Vec<T> = random_values(r, n);
        for (i, v) in x.iter_mut().enumerate() {
            if i % head_dim >= rotary_dim {
                *v = T::from_f64(specials[i % specials.len()]);
            }
        }
        x
    };
    let (q, k) = (fill(&mut r, plan.q_elems()), fill(&mut r, plan.k_elems()));
    let tails_equal = |what: &str, got: &[T], want: &[T]| -> TestResult {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            ensure!(
                i % head_dim < rotary_dim || g.to_f64().to_bits() == w.to_f64().to_bits(),
                "{what}[{i}] (dim {}): {:?}, was {:?}",
                i % head_dim,
                g.to_f64(),
                w.to_f64()
            );
        }
        Ok(())
    };
    let (mut qd, mut kd) = (dev.upload(&q)?, dev.upload(&k)?);
    let (mut qo, mut ko) = (dev.alloc_zeros::<T>(q.len())?, dev.alloc_zeros::<T>(k.len())?);
    plan.run_out_of_place(dev.stream(), &qd, &kd, &mut qo, &mut ko, None)?;
    tails_equal("q out of place", &dev.download(&qo)?, &q)?;
    tails_equal("k out of place", &dev.download(&ko)?, &k)?;
    plan.run(dev.stream(), &mut qd, &mut kd, None)?;
    tails_equal("q in place", &dev.download(&qd)?, &q)?;
    tails_equal("k in place", &dev.download(&kd)?, &k)?;
    Ok(())
}

/// Every way to point RoPE outside its buffers is an `Err` before any launch.
fn rope_refuses_bad_positions_buffers_and_caches(dev: &Device) -> TestResult {
    let mut r = rng(7);
    let shape = RopeShape { num_qo_heads: 4, num_kv_heads: 2, head_dim: 64 };
    let err = |res: ferrinfer::Result<RopePlan>| res.err().ok_or("accepted");
    // Positions past the cos/sin cache, and past 2^24.
    let e = err(RopePlan::new(
        dev,
        shape,
        RopePositions::PerToken(&[0, 4096]),
        RopeOptions::cos_sin_cache(4096, 64, true),
    ))?;
    ensure!(matches!(e, Error::PositionOutOfRange { token: 1, position: 4096, end: 4096, .. }), "wrong error: {e}");
    let e = err(RopePlan::new(
        dev,
        shape,
        RopePositions::Ragged { indptr: &[0, 2], offsets: &[u32::MAX - 1] },
        RopeOptions::default(),
    ))?;
    ensure!(matches!(e, Error::PositionOutOfRange { token: 0, .. }), "wrong error: {e}");
    // Bad rotary dims, head dims, indptr.
    for rd in [0, 7, 66] {
        let o = RopeOptions { rotary_dim: Some(rd), ..Default::default() };
        let e = err(RopePlan::new(dev, shape, RopePositions::PerToken(&[1]), o))?;
        ensure!(matches!(e, Error::RotaryDim { .. }), "rotary_dim {rd}: wrong error: {e}");
    }
    let e = err(RopePlan::new(
        dev,
        RopeShape { head_dim: 60, ..shape },
        RopePositions::PerToken(&[1]),
        RopeOptions::default(),
    ))?;
    ensure!(matches!(e, Error::UnalignedHeadDim { .. }), "wrong error: {e}");
    let e = err(RopePlan::new(
        dev,
        shape,
        RopePositions::Ragged { indptr: &[0, 3, 2], offsets: &[0, 0] },
        RopeOptions::default(),
    ))?;
    ensure!(matches!(e, Error::IndptrNotMonotone { .. }), "wrong error: {e}");

    let plan =
        RopePlan::new(dev, shape, RopePositions::PerToken(&[5, 4095, 0]), RopeOptions::cos_sin_cache(4096, 64, true))?;
    let cache = dev.upload(&random_cos_sin(&mut r, 4096, 64))?;
    let (mut q, mut k) = (dev.alloc_zeros::<f16>(plan.q_elems())?, dev.alloc_zeros::<f16>(plan.k_elems())?);
    // A short cache, no cache, a short q, a misaligned view, f32 rows.
    let short = dev.alloc_zeros::<f32>(4095 * 64)?;
    let e = plan.run(dev.stream(), &mut q, &mut k, Some(&short)).err().ok_or("accepted a short cache")?;
    ensure!(matches!(e, Error::BufferLength { what: "cos_sin_cache", .. }), "wrong error: {e}");
    let e = plan.run(dev.stream(), &mut q, &mut k, None).err().ok_or("ran without its cache")?;
    ensure!(matches!(e, Error::BadOption { .. }), "wrong error: {e}");
    let mut short_q = dev.alloc_zeros::<f16>(plan.q_elems() - 1)?;
    let e = plan.run(dev.stream(), &mut short_q, &mut k, Some(&cache)).err().ok_or("accepted a short q")?;
    ensure!(matches!(e, Error::BufferLength { what: "q", .. }), "wrong error: {e}");
    let mut wide = dev.alloc_zeros::<f16>(plan.q_elems() + 1)?;
    let mut shifted = wide.slice_mut(1..);
    let e = plan.run(dev.stream(), &mut shifted, &mut k, Some(&cache)).err().ok_or("accepted a misaligned q")?;
    ensure!(matches!(e, Error::UnalignedBuffer { what: "q", .. }), "wrong error: {e}");
    let (mut qf, mut kf) = (dev.alloc_zeros::<f32>(plan.q_elems())?, dev.alloc_zeros::<f32>(plan.k_elems())?);
    let e = plan.run(dev.stream(), &mut qf, &mut kf, Some(&cache)).err().ok_or("rotated f32")?;
    ensure!(matches!(e, Error::UnsupportedDType { .. }), "wrong error: {e}");
    let computed = RopePlan::new(dev, shape, RopePositions::PerToken(&[5, 4095, 0]), RopeOptions::default())?;
    let e = computed.run(dev.stream(), &mut q, &mut k, Some(&cache)).err().ok_or("took a cache it does not use")?;
    ensure!(matches!(e, Error::BadOption { .. }), "wrong error: {e}");

    // Buffers, caches and streams of another context.
    let other = Device::from_context(CudaContext::new_non_primary(dev.context().ordinal(), 0)?)?;
    let foreign_cache = other.upload(&random_cos_sin(&mut r, 4096, 64))?;
    let e = plan.run(dev.stream(), &mut q, &mut k, Some(&foreign_cache)).err().ok_or("read a foreign cache")?;
    ensure!(matches!(e, Error::DeviceMismatch { what: "cos_sin_cache" }), "wrong error: {e}");
    let mut foreign_k = other.alloc_zeros::<f16>(plan.k_elems())?;
    let e = plan.run(dev.stream(), &mut q, &mut foreign_k, Some(&cache)).err().ok_or("wrote a foreign k")?;
    ensure!(matches!(e, Error::DeviceMismatch { what: "k" }), "wrong error: {e}");
    let e = plan.run(other.stream(), &mut q, &mut k, Some(&cache)).err().ok_or("ran on a foreign stream")?;
    ensure!(matches!(e, Error::DeviceMismatch { what: "stream" }), "wrong error: {e}");
    let mut q_out = other.alloc_zeros::<f16>(plan.q_elems())?;
    let mut k_out = dev.alloc_zeros::<f16>(plan.k_elems())?;
    let e = plan
        .run_out_of_place(dev.stream(), &q, &k, &mut q_out, &mut k_out, Some(&cache))
        .err()
        .ok_or("foreign q_out")?;
    ensure!(matches!(e, Error::DeviceMismatch { what: "q_out" }), "wrong error: {e}");

    // The fused append: positions past the cache, a cache of another shape, short ragged K.
    let kv_lens = [10, 3];
    let cshape = shape_for(&kv_lens, 7, 2, 64, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 7, cshape.num_pages);
    let e = AppendRopePlan::new(dev, &cshape, &table, &[0, 4, 7], 4, RopeOptions::cos_sin_cache(9, 64, true))
        .err()
        .ok_or("appended past the cache")?;
    ensure!(matches!(e, Error::PositionOutOfRange { token: 3, position: 9, end: 9, .. }), "wrong error: {e}");
    let e = AppendRopePlan::new(dev, &cshape, &table, &[0, 4, 8], 4, RopeOptions::default())
        .err()
        .ok_or("appended 5 to 3")?;
    ensure!(matches!(e, Error::AppendLongerThanSequence { .. }), "wrong error: {e}");
    let fused = AppendRopePlan::new(dev, &cshape, &table, &[0, 4, 7], 4, RopeOptions::default())?;
    let (mut fq, fk, fv) = (
        dev.alloc_zeros::<f16>(fused.q_elems())?,
        dev.alloc_zeros::<f16>(fused.ragged_elems())?,
        dev.alloc_zeros::<f16>(fused.ragged_elems())?,
    );
    let mut small = ferrinfer::PagedKvCache::<f16>::new(dev, CacheShape { num_pages: 1, ..cshape }, 1)?;
    let e = fused.run(dev.stream(), &mut fq, &fk, &fv, &mut small, 0, None).err().ok_or("wrote a smaller cache")?;
    ensure!(matches!(e, Error::ShapeMismatch { .. }), "wrong error: {e}");
    let (mut good, _) = random_cache::<f16>(dev, &mut r, cshape, 1)?;
    let short_k = dev.alloc_zeros::<f16>(fused.ragged_elems() - 64)?;
    let e = fused.run(dev.stream(), &mut fq, &short_k, &fv, &mut good, 0, None).err().ok_or("accepted a short K")?;
    ensure!(matches!(e, Error::BufferLength { what: "ragged K", .. }), "wrong error: {e}");
    let e = fused.run(dev.stream(), &mut fq, &fk, &fv, &mut good, 1, None).err().ok_or("wrote layer 1 of 1")?;
    ensure!(matches!(e, Error::LayerOutOfRange { .. }), "wrong error: {e}");
    // And the good call runs.
    fused.run(dev.stream(), &mut fq, &fk, &fv, &mut good, 0, None)?;
    plan.run(dev.stream(), &mut q, &mut k, Some(&cache))?;
    dev.synchronize()?;
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    let mut tests = rope_tests();
    tests.extend(append_rope_tests());
    tests.push(GpuTest::new(
        "rope_refuses_bad_positions_buffers_and_caches",
        rope_refuses_bad_positions_buffers_and_caches,
    ));
    for (rd, interleave, pairing) in [(32, false, "neox"), (24, false, "neox_scalar"), (20, true, "gptj")] {
        tests.push(GpuTest::new(
            format!("rope_{pairing}_leaves_dims_past_rotary_dim_{rd}_of_64_bit_for_bit_f16"),
            move |d| rope_leaves_dims_past_rotary_dim_bit_for_bit::<f16>(d, rd, interleave),
        ));
        tests.push(GpuTest::new(
            format!("rope_{pairing}_leaves_dims_past_rotary_dim_{rd}_of_64_bit_for_bit_bf16"),
            move |d| rope_leaves_dims_past_rotary_dim_bit_for_bit::<bf16>(d, rd, interleave),
        ));
    }
    tests
}
