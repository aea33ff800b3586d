//! Merging attention states against the f64 reference (random states, some empty), the
//! two-state and in-place forms against the many-state one (bit for bit: the same arithmetic),
//! and the semantics: decode over a prefix and a suffix of the keys, merged, is decode over all.
use ferrinfer::{
    bf16, f16, merge_state, merge_state_in_place, merge_states, reference, BatchDecodePlan, DecodeOptions, Device,
    KvDType, KvLayout, PageTable, StateShape,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{random_cache, random_table, random_values, rng, shape_for};
use rand::Rng;

fn merge_states_case<T: KvDType>(dev: &Device, tokens: usize, num_states: usize, shape: StateShape) -> TestResult {
    let mut r = rng((tokens * 31 + num_states) as u64);
    let v: Vec<T> = random_values(&mut r, tokens * num_states * shape.heads * shape.head_dim);
    // LSEs over a wide range, one in five states empty.
    let s: Vec<f32> = (0..tokens * num_states * shape.heads)
        .map(|_| if r.random_range(0..5) == 0 { f32::NEG_INFINITY } else { r.random_range(-20.0..20.0) })
        .collect();
    let rows = tokens * shape.heads;
    let mut out = dev.upload(&vec![T::from_f64(f64::NAN); rows * shape.head_dim])?;
    let mut lse = dev.upload(&vec![f32::NAN; rows])?;
    merge_states(dev, dev.stream(), shape, num_states, &dev.upload(&v)?, &dev.upload(&s)?, &mut out, Some(&mut lse))?;
    let (want, want_lse) = reference::merge_states(&v, &s, num_states, shape.heads, shape.head_dim);
    let (out, lse) = (dev.download(&out)?, dev.download(&lse)?);
    Ok(expect_attention_close(&out, &want, &lse, &want_lse, shape.heads, shape.head_dim, "token")?)
}

/// merge_state(a, b), merge_state_in_place and merge_states over the stacked pair agree exactly.
fn two_state_forms_agree(dev: &Device) -> TestResult {
    let shape = StateShape { heads: 6, head_dim: 128 };
    let (tokens, row) = (37, 6 * 128);
    let mut r = rng(5);
    let (va, vb): (Vec<f16>, Vec<f16>) = (random_values(&mut r, tokens * row), random_values(&mut r, tokens * row));
    let (sa, sb): (Vec<f32>, Vec<f32>) = (
        (0..tokens * 6).map(|_| r.random_range(-5.0..5.0)).collect(),
        (0..tokens * 6).map(|_| r.random_range(-5.0..5.0)).collect(),
    );
    let (va_d, sa_d, vb_d, sb_d) = (dev.upload(&va)?, dev.upload(&sa)?, dev.upload(&vb)?, dev.upload(&sb)?);
    let (mut out, mut lse) = (dev.alloc_zeros::<f16>(tokens * row)?, dev.alloc_zeros::<f32>(tokens * 6)?);
    merge_state(dev, dev.stream(), shape, &va_d, &sa_d, &vb_d, &sb_d, &mut out, Some(&mut lse))?;
    let (mut v_in, mut s_in) = (dev.upload(&va)?, dev.upload(&sa)?);
    merge_state_in_place(dev, dev.stream(), shape, &mut v_in, &mut s_in, &vb_d, &sb_d)?;
    // [tokens][2][heads][dim] and [tokens][2][heads].
    let stacked: Vec<f16> =
        (0..tokens).flat_map(|t| va[t * row..][..row].iter().chain(&vb[t * row..][..row]).copied()).collect();
    let stacked_s: Vec<f32> =
        (0..tokens).flat_map(|t| sa[t * 6..][..6].iter().chain(&sb[t * 6..][..6]).copied()).collect();
    let (mut out3, mut lse3) = (dev.alloc_zeros::<f16>(tokens * row)?, dev.alloc_zeros::<f32>(tokens * 6)?);
    merge_states(
        dev,
        dev.stream(),
        shape,
        2,
        &dev.upload(&stacked)?,
        &dev.upload(&stacked_s)?,
        &mut out3,
        Some(&mut lse3),
    )?;
    let bits = |v: Vec<f16>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (o1, o2, o3) = (bits(dev.download(&out)?), bits(dev.download(&v_in)?), bits(dev.download(&out3)?));
    ensure!(o1 == o3 && o2 == o3, "merge_state / in place / merge_states outputs differ");
    let (l1, l2, l3) = (dev.download(&lse)?, dev.download(&s_in)?, dev.download(&lse3)?);
    ensure!(l1 == l3 && l2 == l3, "merge_state / in place / merge_states LSEs differ");
    Ok(())
}

/// Decode over each request's first pages and over the rest, merged by LSE, equals decode over
/// all of its keys (the cascade identity).
fn merged_halves_equal_decode_over_all_keys(dev: &Device) -> TestResult {
    let mut r = rng(9);
    let kv_lens = [300, 41, 1000];
    let shape = shape_for(&kv_lens, 16, 2, 128, KvLayout::Nhd);
    let table = random_table(&mut r, &kv_lens, 16, shape.num_pages);
    let (cache, _) = random_cache::<f16>(dev, &mut r, shape, 1)?;
    // Prefix: each request's first page (16 tokens); suffix: the rest.
    let (mut prefix, mut suffix) = (
        PageTable { kv_indptr: vec![0], ..Default::default() },
        PageTable { kv_indptr: vec![0], ..Default::default() },
    );
    for seq in 0..kv_lens.len() {
        let pages = &table.kv_indices[table.kv_indptr[seq] as usize..table.kv_indptr[seq + 1] as usize];
        prefix.kv_indices.push(pages[0]);
        prefix.kv_indptr.push(prefix.kv_indices.len() as u32);
        prefix.kv_last_page_len.push(16);
        suffix.kv_indices.extend(&pages[1..]);
        suffix.kv_indptr.push(suffix.kv_indices.len() as u32);
        suffix.kv_last_page_len.push(table.kv_last_page_len[seq]);
    }
    let heads = 8;
    let q = dev.upload(&random_values::<f16>(&mut r, kv_lens.len() * heads * 128))?;
    let run = |t: &PageTable| -> Result<(Vec<f16>, CudaPair), ferrinfer::Error> {
        let mut plan = BatchDecodePlan::new(dev, &shape, heads, t, DecodeOptions::default())?;
        let (mut out, mut lse) =
            (dev.alloc_zeros::<f16>(plan.qo_elems())?, dev.alloc_zeros::<f32>(kv_lens.len() * heads)?);
        plan.run(dev.stream(), &q, &cache, 0, &mut out, Some(&mut lse))?;
        Ok((dev.download(&out)?, (out, lse)))
    };
    let (whole, (_, whole_lse)) = run(&table)?;
    let (_, (a, a_lse)) = run(&prefix)?;
    let (_, (b, b_lse)) = run(&suffix)?;
    let state = StateShape { heads, head_dim: 128 };
    let (mut merged, mut merged_lse) =
        (dev.alloc_zeros::<f16>(whole.len())?, dev.alloc_zeros::<f32>(kv_lens.len() * heads)?);
    merge_state(dev, dev.stream(), state, &a, &a_lse, &b, &b_lse, &mut merged, Some(&mut merged_lse))?;
    let want_lse = dev.download(&whole_lse)?;
    let (merged, merged_lse) = (dev.download(&merged)?, dev.download(&merged_lse)?);
    // Both sides round to f16 once more than the reference does: twice the f16 bound.
    let close =
        merged.iter().zip(&whole).all(|(g, w)| (g.to_f64() - w.to_f64()).abs() <= 4e-3 + 2e-2 * w.to_f64().abs());
    ensure!(close, "merged halves differ from decode over all keys");
    let lse_close = merged_lse.iter().zip(&want_lse).all(|(g, w)| (g - w).abs() as f64 <= 1e-3 + 1e-4 * w.abs() as f64);
    ensure!(lse_close, "merged LSEs differ from decode over all keys");
    Ok(())
}

type CudaPair = (cudarc::driver::CudaSlice<f16>, cudarc::driver::CudaSlice<f32>);

pub fn tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    for (tokens, num_states, heads, head_dim) in [(1, 1, 1, 8), (37, 2, 8, 128), (100, 7, 4, 64), (13, 3, 32, 256)] {
        let shape = StateShape { heads, head_dim };
        let name = format!("merge_states_{num_states}_states_{heads}_heads_dim_{head_dim}");
        t.push(GpuTest::new(format!("{name}_f16"), move |d| merge_states_case::<f16>(d, tokens, num_states, shape)));
        t.push(GpuTest::new(format!("{name}_bf16"), move |d| merge_states_case::<bf16>(d, tokens, num_states, shape)));
    }
    t.push(GpuTest::new("merge_state_in_place_and_many_state_forms_agree_bitwise", two_state_forms_agree));
    t.push(GpuTest::new(
        "merged_prefix_and_suffix_decode_equals_decode_over_all_keys",
        merged_halves_equal_decode_over_all_keys,
    ));
    t
}
