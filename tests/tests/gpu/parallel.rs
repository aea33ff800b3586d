//! Tensor-parallel attention (`TensorParallel`): the KV heads split over the GPUs, each GPU's
//! cache of its heads with the same pages, plans from one page table, the outputs all-gathered
//! through NCCL. Decode, prefill and cascade equal, bit for bit, each GPU's heads run alone on
//! one GPU (the kernels are deterministic per head), and the f64 reference within the f16
//! bound. The two-GPU cases need two GPUs and NCCL and are reported as ignored without them;
//! the one-GPU cases (a group of one: NCCL's gather and the interleaving copy) need NCCL.
use cudarc::driver::CudaSlice;
use ferrinfer::{
    f16, reference, BatchDecodePlan, BatchPrefillPlan, CacheShape, CascadeDecodePlan, DecodeOptions, Device, Error,
    KvLayout, LayerPools, PageTable, PagedKvCache, PrefillOptions, SeqId, SequenceAllocator, TensorParallel,
};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::ensure;
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::{expect_bitwise_eq, random_table, random_values, rng};

const HEAD_DIM: usize = 128;
const GROUP: usize = 4;

/// KV heads `first..first + n` of `pool` (of `shape`), as a pool of `n` heads.
fn shard_pool<T: Copy>(shape: &CacheShape, pool: &[T], first: usize, n: usize) -> Vec<T> {
    let shard = CacheShape { num_kv_heads: n, ..*shape };
    let mut out = vec![pool[0]; shard.pool_elems()];
    for page in 0..shape.num_pages {
        for slot in 0..shape.page_size {
            for h in 0..n {
                for d in 0..shape.head_dim {
                    out[shard.element_index(page, slot, h, d)] = pool[shape.element_index(page, slot, first + h, d)];
                }
            }
        }
    }
    out
}

/// Heads `first..first + n` of each row of `x` (rows of `heads` heads of `HEAD_DIM`).
fn shard_rows<T: Copy>(x: &[T], heads: usize, first: usize, n: usize) -> Vec<T> {
    x.chunks(heads * HEAD_DIM).flat_map(|row| row[first * HEAD_DIM..(first + n) * HEAD_DIM].iter().copied()).collect()
}

/// An algorithm run on one GPU over its shard: `(device, shard shape, its query heads, its
/// cache, its queries) → its output`.
type Run<'a> =
    dyn Fn(&Device, &CacheShape, usize, &PagedKvCache<f16>, &CudaSlice<f16>) -> ferrinfer::Result<CudaSlice<f16>> + 'a;

/// `run` over `gpus` GPUs (the harness's and the next ones) against each shard run alone on
/// the first GPU, bit for bit, and the full heads' f64 reference `want` (rows of `heads`).
#[allow(clippy::too_many_arguments)]
fn sharded_case(
    dev0: &Device,
    gpus: usize,
    shape: &CacheShape,
    host: &(Vec<f16>, Vec<f16>),
    q: &[f16],
    rows: usize,
    want: &[f64],
    run: &Run<'_>,
) -> TestResult {
    let devices = std::iter::once(Ok(dev0.clone())).chain((1..gpus).map(Device::new)).collect::<Result<Vec<_>, _>>()?;
    let tp = TensorParallel::new(devices)?;
    let heads = shape.num_kv_heads * GROUP;
    let (shard, local_heads) = (tp.shard_shape(shape)?, tp.shard_heads(shape, heads)?);
    let kv_local = shard.num_kv_heads;
    let cache_on = |dev: &Device, r: usize| -> ferrinfer::Result<PagedKvCache<f16>> {
        let (k, v) =
            (shard_pool(shape, &host.0, r * kv_local, kv_local), shard_pool(shape, &host.1, r * kv_local, kv_local));
        PagedKvCache::from_layers(shard, vec![LayerPools::new(dev.upload(&k)?, dev.upload(&v)?)])
    };
    let caches = tp.on_each(|r, dev| cache_on(dev, r))?;
    let q_local = tp.on_each(|r, dev| dev.upload(&shard_rows(q, heads, r * local_heads, local_heads)))?;
    let local = tp.on_each(|r, dev| run(dev, &shard, local_heads, &caches[r], &q_local[r]))?;
    let mut staging = tp.on_each(|_, dev| dev.alloc_zeros::<f16>(rows * heads * HEAD_DIM))?;
    let mut out = tp.on_each(|_, dev| dev.upload(&vec![f16::NAN; rows * heads * HEAD_DIM]))?;
    tp.all_gather_heads(rows, &local, &mut staging, &mut out)?;

    // Each shard alone on the first GPU, its heads placed as the gather places them.
    let mut alone = vec![f16::NAN; rows * heads * HEAD_DIM];
    for r in 0..gpus {
        let cache = cache_on(dev0, r)?;
        let q_r = dev0.upload(&shard_rows(q, heads, r * local_heads, local_heads))?;
        let o = dev0.download(&run(dev0, &shard, local_heads, &cache, &q_r)?)?;
        for (row, chunk) in o.chunks(local_heads * HEAD_DIM).enumerate() {
            let at = (row * heads + r * local_heads) * HEAD_DIM;
            alone[at..at + chunk.len()].copy_from_slice(chunk);
        }
    }
    for (r, (dev, out)) in tp.devices().iter().zip(&out).enumerate() {
        let got = dev.download(out)?;
        expect_bitwise_eq(&format!("GPU {r}'s gathered output"), &got, &alone, heads * HEAD_DIM)?;
    }
    Ok(expect_attention_close(&alone, want, &[], &[], heads, HEAD_DIM, "row")?)
}

/// A cache of `kv_heads` KV heads for `kv_lens` (page size 7, HND so that a shard's heads are
/// not contiguous within a token), its host pools, page table and queries of `rows` rows.
#[allow(clippy::type_complexity)]
fn workload(
    kv_heads: usize,
    kv_lens: &[usize],
    rows: usize,
) -> (CacheShape, (Vec<f16>, Vec<f16>), PageTable, Vec<f16>) {
    let mut r = rng(25);
    let pages: usize = kv_lens.iter().map(|l| l.div_ceil(7)).sum();
    let shape = CacheShape {
        num_pages: pages + 3,
        page_size: 7,
        num_kv_heads: kv_heads,
        head_dim: HEAD_DIM,
        layout: KvLayout::Hnd,
    };
    let table = random_table(&mut r, kv_lens, 7, shape.num_pages);
    let host = (random_values(&mut r, shape.pool_elems()), random_values(&mut r, shape.pool_elems()));
    let q = random_values(&mut r, rows * kv_heads * GROUP * HEAD_DIM);
    (shape, host, table, q)
}

fn decode_case(dev: &Device, gpus: usize) -> TestResult {
    let kv_lens = [0, 1, 70, 1000, 3000];
    let (shape, host, table, q) = workload(2 * gpus, &kv_lens, kv_lens.len());
    let heads = shape.num_kv_heads * GROUP;
    let options = DecodeOptions::default();
    let (want, _) = reference::decode(&shape, &host.0, &host.1, &table, &q, heads, &options);
    let run = |dev: &Device, shard: &CacheShape, heads: usize, cache: &PagedKvCache<f16>, q: &CudaSlice<f16>| {
        let mut plan = BatchDecodePlan::new(dev, shard, heads, &table, options)?;
        let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
        plan.run(dev.stream(), q, cache, 0, &mut out, None)?;
        Ok(out)
    };
    sharded_case(dev, gpus, &shape, &host, &q, kv_lens.len(), &want, &run)
}

fn prefill_case(dev: &Device, gpus: usize) -> TestResult {
    let kv_lens = [5, 300, 1100];
    let qo_indptr = [0u32, 5, 45, 345];
    let (shape, host, table, q) = workload(2 * gpus, &kv_lens, 345);
    let heads = shape.num_kv_heads * GROUP;
    let options = PrefillOptions::CAUSAL;
    let (want, _) = reference::prefill(&shape, &host.0, &host.1, &table, &qo_indptr, &q, heads, &options);
    let run = |dev: &Device, shard: &CacheShape, heads: usize, cache: &PagedKvCache<f16>, q: &CudaSlice<f16>| {
        let mut plan = BatchPrefillPlan::new(dev, shard, heads, &qo_indptr, &table, options)?;
        let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
        plan.run(dev.stream(), q, cache, 0, &mut out, None)?;
        Ok(out)
    };
    sharded_case(dev, gpus, &shape, &host, &q, 345, &want, &run)
}

fn cascade_case(dev: &Device, gpus: usize) -> TestResult {
    // Two families: a 900-token prompt forked three ways, and one of 20 forked twice.
    let probe = workload(2 * gpus, &[1], 1).0;
    let mut alloc = SequenceAllocator::new(400, 7)?;
    let mut families: Vec<Vec<SeqId>> = Vec::new();
    for (prompt, own) in [(900, vec![3, 0, 40]), (20, vec![1, 9])] {
        let parent = alloc.create();
        alloc.reserve(parent, prompt)?;
        let mut members = vec![parent];
        members.extend((1..own.len()).map(|_| alloc.fork(parent)).collect::<Result<Vec<_>, _>>()?);
        for (&id, &n) in members.iter().zip(&own) {
            alloc.reserve(id, n)?;
        }
        families.push(members);
    }
    let levels = alloc.cascade_levels(&families)?;
    let all: Vec<SeqId> = families.concat();
    let whole = alloc.page_table(&all)?;
    let mut r = rng(26);
    let shape = CacheShape { num_pages: 400, ..probe };
    let host = (random_values(&mut r, shape.pool_elems()), random_values(&mut r, shape.pool_elems()));
    let heads = shape.num_kv_heads * GROUP;
    let q = random_values(&mut r, all.len() * heads * HEAD_DIM);
    let options = DecodeOptions::default();
    let (want, _) = reference::decode(&shape, &host.0, &host.1, &whole, &q, heads, &options);
    let run = |dev: &Device, shard: &CacheShape, heads: usize, cache: &PagedKvCache<f16>, q: &CudaSlice<f16>| {
        let mut plan = CascadeDecodePlan::<f16>::new(dev, shard, heads, &levels, options)?;
        let mut out = dev.alloc_zeros::<f16>(plan.qo_elems())?;
        plan.run(dev.stream(), q, cache, 0, &mut out, None)?;
        Ok(out)
    };
    sharded_case(dev, gpus, &shape, &host, &q, all.len(), &want, &run)
}

pub fn tests() -> Vec<GpuTest> {
    let mut t = Vec::new();
    type Case = fn(&Device, usize) -> TestResult;
    for (name, case) in [("decode", decode_case as Case), ("prefill", prefill_case), ("cascade", cascade_case)] {
        t.push(
            GpuTest::new(format!("tensor_parallel_{name}_on_two_gpus_equals_each_shard_alone_f16"), move |d| {
                case(d, 2)
            })
            .tensor_parallel(2),
        );
        t.push(
            GpuTest::new(format!("tensor_parallel_{name}_on_one_gpu_gathers_the_single_gpu_layout_f16"), move |d| {
                case(d, 1)
            })
            .tensor_parallel(1),
        );
    }
    t.push(
        GpuTest::new("tensor_parallel_rejects_uneven_heads_one_gpu_twice_and_buffers_of_the_wrong_length", |d| {
            let e = TensorParallel::new(vec![d.clone(), d.clone()]).err();
            ensure!(matches!(e, Some(Error::SameGpuTwice { first: 0, second: 1 })), "one GPU twice: {e:?}");
            let tp = TensorParallel::new(vec![d.clone()])?;
            let shape = CacheShape { num_pages: 1, page_size: 1, num_kv_heads: 3, head_dim: 64, layout: KvLayout::Nhd };
            ensure!(tp.shard_heads(&shape, 7).is_err(), "7 query heads over 3 KV heads");
            let local = vec![d.alloc_zeros::<f16>(64)?];
            let mut staging = vec![d.alloc_zeros::<f16>(64)?];
            let mut short = vec![d.alloc_zeros::<f16>(63)?];
            let e = tp.all_gather_heads(1, &local, &mut staging, &mut short).unwrap_err();
            ensure!(
                matches!(&e, Error::Gpu { gpu: 0, source } if matches!(**source, Error::BufferLength { .. })),
                "{e}"
            );
            let e = tp.all_gather_heads(3, &local, &mut staging, &mut short).unwrap_err();
            ensure!(matches!(e, Error::BufferLength { .. }), "64 elements in 3 rows: {e}");
            Ok(())
        })
        .tensor_parallel(1),
    );
    t
}
