//! Device storage for K and V pages, any number of layers.
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut};

use super::allocator::PageCopy;
use super::layout::CacheShape;
use crate::error::{Error, Result};
use crate::runtime::abi::KvHeadScale;
use crate::runtime::device::Device;
use crate::runtime::dtype::{check_scale, DType, KvDType};

/// The dequantisation scales of one layer of an 8-bit cache, as FlashInfer takes them
/// (`k_scale`, `v_scale`): a stored value `x` means `x × scale`. Writing (append, scatter)
/// stores `x · (1 / scale)` quantised, reading multiplies back: K's scale folds into the logit
/// scale (`sm_scale · k_scale`), V's multiplies the attention output. A 16-bit cache's scales
/// are 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvScales {
    /// K's scale: finite and positive.
    pub k: f32,
    /// V's scale: finite and positive.
    pub v: f32,
}

impl Default for KvScales {
    fn default() -> Self {
        KvScales { k: 1.0, v: 1.0 }
    }
}

/// The per-KV-head dequantisation scales of one layer of an 8-bit cache, on top of the layer's
/// [`KvScales`] (for checkpoints that calibrate `k_scale` and `v_scale` per KV head): a stored
/// value `x` of KV head `h` means `x × k_scale × k[h]` (K) or `x × v_scale × v[h]` (V). Set with
/// [`PagedKvCache::set_head_scales`]; a layer without them has every head's scale 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvHeadScales<'a> {
    /// K's scale of each KV head: `num_kv_heads` entries, each finite and positive.
    pub k: &'a [f32],
    /// V's scale of each KV head: `num_kv_heads` entries, each finite and positive.
    pub v: &'a [f32],
}

/// What a launch reads to dequantise one layer: its scales, and its KV heads' scales on the
/// device (an 8-bit cache's: `[num_kv_heads]` [`KvHeadScale`]s, ones where none were set; none
/// for a 16-bit cache). The default is a 16-bit cache's (ragged K/V's): no scaling.
#[derive(Default)]
pub(crate) struct LayerDequant<'a> {
    pub scales: KvScales,
    pub heads: Option<CudaView<'a, KvHeadScale>>,
}

/// The device entries of layer `layer`'s head scales `scales` in a cache of `dtype` with
/// `num_layers` layers of `num_kv_heads` heads, after the checks of
/// [`PagedKvCache::set_head_scales`] in its order: the type, the layer, the lengths, the values.
fn head_scale_entries(
    dtype: DType,
    layer: usize,
    num_layers: usize,
    num_kv_heads: usize,
    scales: KvHeadScales<'_>,
) -> Result<Vec<KvHeadScale>> {
    if !dtype.is_fp8() {
        return Err(Error::UnsupportedDType { what: "KV head scales (8-bit caches only)", dtype: dtype.name() });
    }
    if layer >= num_layers {
        return Err(Error::LayerOutOfRange { layer, num_layers });
    }
    for (what, got) in [("k head scales", scales.k.len()), ("v head scales", scales.v.len())] {
        if got != num_kv_heads {
            return Err(Error::BufferLength { what, got, expected: num_kv_heads });
        }
    }
    scales
        .k
        .iter()
        .zip(scales.v)
        .enumerate()
        .map(|(h, (&k, &v))| {
            check_scale("k head scale", layer, Some(h), k)?;
            check_scale("v head scale", layer, Some(h), v)?;
            Ok(KvHeadScale::new(k, v))
        })
        .collect()
}

/// One layer's K and V page pools. Read access only once inside a [`PagedKvCache`]: a pool
/// cannot be replaced there (a shorter or foreign pool would be an out-of-bounds launch), only
/// its contents written through [`PagedKvCache::pools_mut`].
///
/// The pools of a cache cannot be swapped for others; this does not compile:
///
/// ```compile_fail,E0616
/// fn replace_pool(cache: &ferrinfer::PagedKvCache<ferrinfer::f16>, short: cudarc::driver::CudaSlice<ferrinfer::f16>) {
///     let pools = cache.layer(0).unwrap();
///     let _ = &pools.k; // private: a `LayerPools` inside a cache is reached through `k()` and `v()`
/// }
/// ```
///
/// ```compile_fail,E0308
/// fn swap_layers(a: &mut ferrinfer::PagedKvCache<ferrinfer::f16>, b: &mut ferrinfer::PagedKvCache<ferrinfer::f16>) {
///     std::mem::swap(a.layer(0).unwrap(), b.layer(0).unwrap()); // `layer` lends `&`, never `&mut`
/// }
/// ```
pub struct LayerPools<T: KvDType> {
    k: CudaSlice<T>,
    v: CudaSlice<T>,
}

impl<T: KvDType> LayerPools<T> {
    /// A layer's pools, for [`PagedKvCache::from_layers`] (which checks their lengths).
    pub fn new(k: CudaSlice<T>, v: CudaSlice<T>) -> Self {
        LayerPools { k, v }
    }

    /// The layer's K page pool.
    pub fn k(&self) -> &CudaSlice<T> {
        &self.k
    }

    /// The layer's V page pool.
    pub fn v(&self) -> &CudaSlice<T> {
        &self.v
    }

    /// The two pools, `(k, v)`.
    pub fn into_parts(self) -> (CudaSlice<T>, CudaSlice<T>) {
        (self.k, self.v)
    }
}

/// K and V page pools for `num_layers` layers, each pool `num_pages × page_size × num_kv_heads ×
/// head_dim` elements of `T` in the shape's layout. Page size is any value ≥ 1, chosen at run
/// time. Each layer is its own pair of allocations (no pool is limited by another's size, and a
/// layer's buffers can be handed to other code as they are); page `p` means the same tokens in
/// every layer, so one page table serves them all.
///
/// Every pool has exactly `shape.pool_elems()` elements and lives in one CUDA context, from
/// construction on: nothing can replace a pool, so a plan that checked the shape and the
/// context launches only inside the pools.
///
/// An 8-bit cache ([`E4m3`](crate::E4m3), [`E5m2`](crate::E5m2)) has a [`KvScales`] per layer,
/// 1 until [`set_scales`](Self::set_scales), and optionally [`KvHeadScales`] per layer
/// ([`set_head_scales`](Self::set_head_scales)); appends quantise with them and attention
/// dequantises with them, so the two cannot disagree.
pub struct PagedKvCache<T: KvDType> {
    shape: CacheShape,
    layers: Vec<LayerPools<T>>,
    scales: Vec<KvScales>,
    /// Per layer, the head scales set (K's then V's), or empty: none.
    head_scales: Vec<Vec<f32>>,
    /// An 8-bit cache's head scales on the device, `[layer][kv_head]`, ones where none are
    /// set; allocated with the cache, so its address never changes (see `set_head_scales`).
    head_scales_dev: Option<CudaSlice<KvHeadScale>>,
    ctx: Arc<CudaContext>,
}

impl<T: KvDType> PagedKvCache<T> {
    /// Allocates zeroed pools for `num_layers` layers on `device`.
    pub fn new(device: &Device, shape: CacheShape, num_layers: usize) -> Result<Self> {
        shape.validate(T::DTYPE)?;
        if num_layers == 0 {
            return Err(Error::ZeroDimension { what: "num_layers" });
        }
        let layers = (0..num_layers)
            .map(|_| {
                Ok(LayerPools::new(device.alloc_zeros(shape.pool_elems())?, device.alloc_zeros(shape.pool_elems())?))
            })
            .collect::<Result<_>>()?;
        Self::with_pools(shape, layers, device.stream())
    }

    /// A cache of `layers`, already checked against `shape`, without scales; an 8-bit cache's
    /// device head scales (ones) are allocated on `stream`.
    fn with_pools(shape: CacheShape, layers: Vec<LayerPools<T>>, stream: &Arc<CudaStream>) -> Result<Self> {
        let num_layers = layers.len();
        let head_scales_dev = if T::DTYPE.is_fp8() {
            let ones = vec![KvHeadScale::new(1.0, 1.0); num_layers * shape.num_kv_heads];
            Some(stream.clone_htod(&ones).map_err(Error::driver("copying KV head scales to the device"))?)
        } else {
            None
        };
        Ok(PagedKvCache {
            shape,
            layers,
            scales: vec![KvScales::default(); num_layers],
            head_scales: vec![Vec::new(); num_layers],
            head_scales_dev,
            ctx: stream.context().clone(),
        })
    }

    /// Wraps existing pools (for example filled by the caller), checking their lengths and that
    /// all of them live in one CUDA context.
    pub fn from_layers(shape: CacheShape, layers: Vec<LayerPools<T>>) -> Result<Self> {
        shape.validate(T::DTYPE)?;
        let Some(first) = layers.first() else {
            return Err(Error::ZeroDimension { what: "num_layers" });
        };
        let ctx = first.k.context().clone();
        for layer in &layers {
            for (what, buf) in [("K page pool", &layer.k), ("V page pool", &layer.v)] {
                if buf.len() != shape.pool_elems() {
                    return Err(Error::BufferLength { what, got: buf.len(), expected: shape.pool_elems() });
                }
                if buf.context().cu_ctx() != ctx.cu_ctx() {
                    return Err(Error::DeviceMismatch { what });
                }
            }
        }
        let stream = first.k.stream().clone();
        Self::with_pools(shape, layers, &stream)
    }

    /// Sets layer `layer`'s dequantisation scales (8-bit caches only). Values already in the
    /// layer are not rewritten: they are read with the new scales from now on. A scale that is
    /// zero, negative, NaN or infinite is an error, as is a 16-bit cache.
    pub fn set_scales(&mut self, layer: usize, scales: KvScales) -> Result<()> {
        if !T::DTYPE.is_fp8() {
            return Err(Error::UnsupportedDType { what: "KV scales (8-bit caches only)", dtype: T::DTYPE.name() });
        }
        check_scale("k_scale", layer, None, scales.k)?;
        check_scale("v_scale", layer, None, scales.v)?;
        let num_layers = self.layers.len();
        *self.scales.get_mut(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })? = scales;
        Ok(())
    }

    /// Layer `layer`'s dequantisation scales (1 for a 16-bit cache).
    pub fn scales(&self, layer: usize) -> Result<KvScales> {
        let num_layers = self.layers.len();
        self.scales.get(layer).copied().ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// Sets layer `layer`'s per-KV-head dequantisation scales (8-bit caches only): a stored
    /// value `x` of KV head `h` then means `x × k_scale × scales.k[h]` (K) or
    /// `x × v_scale × scales.v[h]` (V), with the layer's [`KvScales`]; appends and scatters
    /// from now on store `x · ((1 / k_scale) · (1 / scales.k[h]))` quantised
    /// ([`E4m3::quantise_head`](crate::E4m3::quantise_head)). Values already in the layer are
    /// not rewritten. Without head scales every head's scale is 1.
    ///
    /// Each of `scales.k` and `scales.v` has `num_kv_heads` entries, else
    /// [`Error::BufferLength`]; a scale that is zero, negative, NaN or infinite is
    /// [`Error::BadScale`] naming the head and the value; a 16-bit cache is
    /// [`Error::UnsupportedDType`], a layer past the last [`Error::LayerOutOfRange`], a stream
    /// of another context [`Error::DeviceMismatch`]. On an error nothing changes.
    ///
    /// The scales (and their f32 reciprocals, for quantising) are copied from host memory into
    /// a device buffer of the cache on `stream`, after the work queued there so far (so not
    /// while `stream` is being captured); cudarc's tracking orders the copy after launches
    /// still reading the buffer on other streams, and later launches after it. The buffer is
    /// allocated with the cache and never moves, and launches read it when they run, not when
    /// they are enqueued: a `run` captured in a CUDA graph reads the head scales current when
    /// the graph is launched (the layer's [`KvScales`], passed by value, stay those of the
    /// capture).
    ///
    /// ```no_run
    /// use ferrinfer::{CacheShape, Device, E4m3, KvHeadScales, KvLayout, KvScales, PagedKvCache};
    ///
    /// let dev = Device::new(0)?;
    /// let shape = CacheShape { num_pages: 64, page_size: 16, num_kv_heads: 2, head_dim: 128, layout: KvLayout::Nhd };
    /// let mut cache = PagedKvCache::<E4m3>::new(&dev, shape, 1)?;
    /// cache.set_scales(0, KvScales { k: 0.02, v: 0.01 })?;
    /// cache.set_head_scales(dev.stream(), 0, KvHeadScales { k: &[1.0, 1.5], v: &[0.8, 1.25] })?;
    /// // A stored K value x of KV head 1 now means x × 0.02 × 1.5.
    /// # Ok::<(), ferrinfer::Error>(())
    /// ```
    pub fn set_head_scales(&mut self, stream: &Arc<CudaStream>, layer: usize, scales: KvHeadScales<'_>) -> Result<()> {
        let entries = head_scale_entries(T::DTYPE, layer, self.layers.len(), self.shape.num_kv_heads, scales)?;
        self.write_head_scales(stream, layer, &entries)?;
        self.head_scales[layer] = [scales.k, scales.v].concat();
        Ok(())
    }

    /// Removes layer `layer`'s per-KV-head scales (8-bit caches only): every head's scale is 1
    /// again. Written on `stream` as [`set_head_scales`](Self::set_head_scales) writes.
    pub fn clear_head_scales(&mut self, stream: &Arc<CudaStream>, layer: usize) -> Result<()> {
        let ones = vec![1.0; self.shape.num_kv_heads];
        self.set_head_scales(stream, layer, KvHeadScales { k: &ones, v: &ones })?;
        self.head_scales[layer].clear();
        Ok(())
    }

    /// Layer `layer`'s per-KV-head scales, or `None` where none are set (every head's scale is
    /// 1; always for a 16-bit cache).
    pub fn head_scales(&self, layer: usize) -> Result<Option<KvHeadScales<'_>>> {
        let num_layers = self.layers.len();
        let set = self.head_scales.get(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })?;
        Ok((!set.is_empty()).then(|| {
            let (k, v) = set.split_at(self.shape.num_kv_heads);
            KvHeadScales { k, v }
        }))
    }

    /// Copies a layer's head-scale entries into the device buffer on `stream`.
    fn write_head_scales(&mut self, stream: &Arc<CudaStream>, layer: usize, entries: &[KvHeadScale]) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::DeviceMismatch { what: "stream" });
        }
        let heads = self.shape.num_kv_heads;
        let buffer = self.head_scales_dev.as_mut().expect("an 8-bit cache has device head scales");
        stream
            .memcpy_htod(entries, &mut buffer.slice_mut(layer * heads..(layer + 1) * heads))
            .map_err(Error::driver("copying KV head scales to the device"))
    }

    /// Layer `layer`'s dequantisation as a launch reads it.
    pub(crate) fn layer_dequant(&self, layer: usize) -> Result<LayerDequant<'_>> {
        self.layer(layer)?;
        Ok(Self::dequant(&self.scales, self.head_scales_dev.as_ref(), self.shape.num_kv_heads, layer))
    }

    /// [`layer_dequant`](Self::layer_dequant) from the cache's fields (`layer` is in range).
    fn dequant<'a>(
        scales: &[KvScales],
        head_scales_dev: Option<&'a CudaSlice<KvHeadScale>>,
        heads: usize,
        layer: usize,
    ) -> LayerDequant<'a> {
        LayerDequant {
            scales: scales[layer],
            heads: head_scales_dev.map(|b| b.slice(layer * heads..(layer + 1) * heads)),
        }
    }

    /// The pools, layer by layer (the reverse of [`from_layers`](Self::from_layers)).
    pub fn into_layers(self) -> Vec<LayerPools<T>> {
        self.layers
    }

    /// The dimensions of each page pool.
    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }

    /// Layers in the cache.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The CUDA context the pools live in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The pools of layer `layer`, to read.
    pub fn layer(&self, layer: usize) -> Result<&LayerPools<T>> {
        let num_layers = self.layers.len();
        self.layers.get(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// Layer `layer`'s K and V pools as mutable views, to write their contents (a view has the
    /// pool's fixed length; it cannot replace the pool).
    pub fn pools_mut(&mut self, layer: usize) -> Result<(CudaViewMut<'_, T>, CudaViewMut<'_, T>)> {
        let num_layers = self.layers.len();
        let pools = self.layers.get_mut(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })?;
        Ok((pools.k.as_view_mut(), pools.v.as_view_mut()))
    }

    /// Layer `layer`'s pools for a launch planned for `shape`: the same shape (so each pool has
    /// the planned length) and the same context as `device`, with the layer's dequantisation.
    /// The lengths are checked again, cheaply, so a launch never relies on one invariant alone.
    pub(crate) fn pools_for(
        &self,
        device: &Device,
        shape: &CacheShape,
        layer: usize,
    ) -> Result<(&CudaSlice<T>, &CudaSlice<T>, LayerDequant<'_>)> {
        if self.shape != *shape {
            return Err(Error::ShapeMismatch { planned: shape.to_string(), got: self.shape.to_string() });
        }
        device.check_context("cache", &self.ctx)?;
        let pools = self.layer(layer)?;
        for (what, pool) in [("K page pool", &pools.k), ("V page pool", &pools.v)] {
            if pool.len() != shape.pool_elems() {
                return Err(Error::BufferLength { what, got: pool.len(), expected: shape.pool_elems() });
            }
        }
        Ok((&pools.k, &pools.v, self.layer_dequant(layer)?))
    }

    /// Layer `layer`'s pools to write, for a launch planned for `shape` (as
    /// [`pools_for`](Self::pools_for)), with the layer's dequantisation.
    pub(crate) fn pools_for_mut(
        &mut self,
        device: &Device,
        shape: &CacheShape,
        layer: usize,
    ) -> Result<(&mut CudaSlice<T>, &mut CudaSlice<T>, LayerDequant<'_>)> {
        self.pools_for(device, shape, layer)?;
        let dequant = Self::dequant(&self.scales, self.head_scales_dev.as_ref(), shape.num_kv_heads, layer);
        let pools = &mut self.layers[layer];
        Ok((&mut pools.k, &mut pools.v, dequant))
    }

    /// Applies the allocator's copy-on-write copies: each `dst` page becomes a copy of `src`, in
    /// every layer, K and V, on `stream`. A page is contiguous in both layouts.
    pub fn copy_pages(&mut self, stream: &Arc<CudaStream>, copies: &[PageCopy]) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::DeviceMismatch { what: "stream" });
        }
        let (n, num_pages) = (self.shape.page_elems(), self.shape.num_pages);
        for layer in &mut self.layers {
            copy_pages_in_pool(stream, &mut layer.k, n, num_pages, copies)?;
            copy_pages_in_pool(stream, &mut layer.v, n, num_pages, copies)?;
        }
        Ok(())
    }
}

/// Copies page `c.src` of `pool` (pages of `page_elems` contiguous elements, `num_pages` of
/// them) onto page `c.dst` for each copy, on `stream`; a page past the pool is an error, found
/// before anything is copied.
pub(crate) fn copy_pages_in_pool<T: KvDType>(
    stream: &Arc<CudaStream>,
    pool: &mut CudaSlice<T>,
    page_elems: usize,
    num_pages: usize,
    copies: &[PageCopy],
) -> Result<()> {
    for c in copies {
        for page in [c.src, c.dst] {
            if page as usize >= num_pages {
                return Err(Error::TooLarge { what: "page of a page copy", value: page as usize, max: num_pages - 1 });
            }
        }
    }
    let n = page_elems;
    for c in copies.iter().filter(|c| c.src != c.dst) {
        let (src, dst) = (c.src as usize * n, c.dst as usize * n);
        // Disjoint halves of one allocation: split at the later page.
        let (mut lo, mut hi) = pool.split_at_mut(src.max(dst));
        let (from, mut to) = if src < dst {
            (lo.slice(src..src + n), hi.slice_mut(0..n))
        } else {
            (hi.slice(0..n), lo.slice_mut(dst..dst + n))
        };
        stream.memcpy_dtod(&from, &mut to).map_err(Error::driver("copying a page"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `head_scale_entries` for layer `layer` of an e4m3 cache of 2 layers and 3 KV heads.
    fn entries(layer: usize, k: &[f32], v: &[f32]) -> Result<Vec<KvHeadScale>> {
        head_scale_entries(DType::E4M3, layer, 2, 3, KvHeadScales { k, v })
    }

    #[test]
    fn head_scales_become_each_heads_scales_and_reciprocals() {
        let got = entries(1, &[0.5, 3.0, 1.0], &[7.0, 0.1, 2.0]).unwrap();
        assert_eq!(got[1], KvHeadScale { k: 3.0, v: 0.1, k_rcp: 1.0 / 3.0, v_rcp: 1.0 / 0.1 });
        assert_eq!(got.iter().map(|e| (e.k, e.v)).collect::<Vec<_>>(), [(0.5, 7.0), (3.0, 0.1), (1.0, 2.0)]);
        let e5m2 = head_scale_entries(DType::E5M2, 0, 1, 1, KvHeadScales { k: &[2.0], v: &[4.0] }).unwrap();
        assert_eq!(e5m2, [KvHeadScale { k: 2.0, v: 4.0, k_rcp: 0.5, v_rcp: 0.25 }]);
    }

    #[test]
    fn zero_negative_nan_or_infinite_head_scales_are_errors_naming_head_and_value() {
        for bad in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = entries(1, &[1.0, 1.0, 1.0], &[1.0, 1.0, bad]).unwrap_err();
            let Error::BadScale { what: "v head scale", layer: 1, kv_head: Some(2), value } = e else {
                panic!("wrong error for v {bad}: {e}");
            };
            assert_eq!(value.to_bits(), bad.to_bits());
            assert!(e.to_string().starts_with(&format!("v head scale of KV head 2 of layer 1 is {bad};")), "{e}");
            let e = entries(0, &[bad, 1.0, 1.0], &[1.0; 3]).unwrap_err();
            assert!(matches!(e, Error::BadScale { what: "k head scale", layer: 0, kv_head: Some(0), .. }), "{e}");
        }
        // A layer's own scale names no head.
        let e = check_scale("k_scale", 4, None, 0.0).unwrap_err();
        assert_eq!(e.to_string(), "k_scale of layer 4 is 0; a scale must be finite and positive");
    }

    #[test]
    fn head_scales_of_another_length_than_the_kv_heads_are_errors() {
        let e = entries(0, &[1.0, 1.0], &[1.0; 3]).unwrap_err();
        assert!(matches!(e, Error::BufferLength { what: "k head scales", got: 2, expected: 3 }), "{e}");
        let e = entries(0, &[1.0; 3], &[1.0; 4]).unwrap_err();
        assert!(matches!(e, Error::BufferLength { what: "v head scales", got: 4, expected: 3 }), "{e}");
        let e = entries(0, &[], &[]).unwrap_err();
        assert!(matches!(e, Error::BufferLength { got: 0, expected: 3, .. }), "{e}");
    }

    #[test]
    fn head_scales_of_a_16_bit_cache_or_a_layer_out_of_range_are_errors() {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let e = head_scale_entries(dtype, 0, 2, 3, KvHeadScales { k: &[1.0; 3], v: &[1.0; 3] }).unwrap_err();
            assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
        }
        let e = entries(2, &[1.0; 3], &[1.0; 3]).unwrap_err();
        assert!(matches!(e, Error::LayerOutOfRange { layer: 2, num_layers: 2 }), "{e}");
        // The type is checked first, then the layer, then the lengths, then the values.
        let e = head_scale_entries(DType::F16, 9, 2, 3, KvHeadScales { k: &[0.0], v: &[] }).unwrap_err();
        assert!(matches!(e, Error::UnsupportedDType { .. }), "{e}");
        let e = entries(9, &[0.0], &[]).unwrap_err();
        assert!(matches!(e, Error::LayerOutOfRange { .. }), "{e}");
        let e = entries(0, &[0.0], &[]).unwrap_err();
        assert!(matches!(e, Error::BufferLength { .. }), "{e}");
    }
}
