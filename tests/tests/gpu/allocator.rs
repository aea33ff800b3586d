//! The sequence allocator driving the cache on the GPU: appends through its page tables, a fork
//! that shares the prefix, copy-on-write of the shared partial page, and frees.
use ferrinfer::{f16, CacheShape, Device, GatherPlan, KvLayout, PagedKvCache, ScatterPlan, SeqId, SequenceAllocator};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{expect_bitwise_eq, random_values, rng};

/// A serving step: reserve `tokens.len() / token_elems` tokens for `seq`, apply the copies the
/// allocator asks for, and append the tokens (K = V = `tokens`) to both layers.
fn append(
    dev: &Device,
    alloc: &mut SequenceAllocator,
    cache: &mut PagedKvCache<f16>,
    seq: SeqId,
    tokens: &[f16],
) -> TestResult {
    let n = tokens.len() / cache.shape().token_elems();
    let copies = alloc.reserve(seq, n)?;
    cache.copy_pages(dev.stream(), &copies)?;
    let table = alloc.page_table(&[seq])?;
    let plan = ScatterPlan::append(dev, cache.shape(), &table, &[0, n as u32])?;
    let input = dev.upload(tokens)?;
    for layer in 0..cache.num_layers() {
        plan.run(dev.stream(), cache, layer, &input, &input)?;
    }
    Ok(())
}

fn fork_and_copy_on_write(dev: &Device, page_size: usize) -> TestResult {
    let shape = CacheShape { num_pages: 64, page_size, num_kv_heads: 2, head_dim: 64, layout: KvLayout::Hnd };
    let row = shape.token_elems();
    let mut r = rng(page_size as u64);
    let mut alloc = SequenceAllocator::new(shape.num_pages, page_size)?;
    let mut cache = PagedKvCache::<f16>::new(dev, shape, 2)?;
    let tokens = |r: &mut _, n: usize| random_values::<f16>(r, n * row);

    let (prompt, a_more, b_more, c_more) =
        (tokens(&mut r, 10), tokens(&mut r, 2), tokens(&mut r, 3), tokens(&mut r, 5));
    let a = alloc.create();
    append(dev, &mut alloc, &mut cache, a, &prompt)?;
    let b = alloc.fork(a)?;
    append(dev, &mut alloc, &mut cache, b, &b_more)?; // copies the shared partial page (unless 10 % page_size == 0)
    append(dev, &mut alloc, &mut cache, a, &a_more)?;
    let c = alloc.fork(b)?;
    alloc.free(b)?;
    append(dev, &mut alloc, &mut cache, c, &c_more)?;

    let table = alloc.page_table(&[a, c])?;
    let plan = GatherPlan::new(dev, &shape, &table)?;
    let want: Vec<f16> = [&prompt, &a_more, &prompt, &b_more, &c_more].into_iter().flatten().copied().collect();
    for layer in 0..2 {
        let (mut k, mut v) =
            (dev.alloc_zeros::<f16>(plan.ragged_elems())?, dev.alloc_zeros::<f16>(plan.ragged_elems())?);
        plan.run(dev.stream(), &cache, layer, &mut k, &mut v)?;
        expect_bitwise_eq(&format!("layer {layer} K of [a, c]"), &dev.download(&k)?, &want, row)?;
        expect_bitwise_eq(&format!("layer {layer} V of [a, c]"), &dev.download(&v)?, &want, row)?;
    }
    alloc.free(a)?;
    alloc.free(c)?;
    if alloc.free_pages() != shape.num_pages {
        return Err(
            format!("{} of {} pages free after freeing every sequence", alloc.free_pages(), shape.num_pages).into()
        );
    }
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    [1, 3, 4, 7, 10, 16]
        .into_iter()
        .map(|ps| {
            GpuTest::new(format!("allocator_fork_copy_on_write_and_free_page_size_{ps}"), move |d| {
                fork_and_copy_on_write(d, ps)
            })
        })
        .collect()
}
