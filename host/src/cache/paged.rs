//! Device storage for K and V pages, any number of layers.
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaViewMut};

use super::allocator::PageCopy;
use super::layout::CacheShape;
use crate::error::{Error, Result};
use crate::runtime::device::Device;
use crate::runtime::dtype::{check_scale, KvDType};

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
/// 1 until [`set_scales`](Self::set_scales); appends quantise with them and attention
/// dequantises with them, so the two cannot disagree.
pub struct PagedKvCache<T: KvDType> {
    shape: CacheShape,
    layers: Vec<LayerPools<T>>,
    scales: Vec<KvScales>,
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
        Ok(PagedKvCache { shape, scales: vec![KvScales::default(); num_layers], layers, ctx: device.context().clone() })
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
        Ok(PagedKvCache { shape, scales: vec![KvScales::default(); layers.len()], layers, ctx })
    }

    /// Sets layer `layer`'s dequantisation scales (8-bit caches only). Values already in the
    /// layer are not rewritten: they are read with the new scales from now on. A scale that is
    /// zero, negative, NaN or infinite is an error, as is a 16-bit cache.
    pub fn set_scales(&mut self, layer: usize, scales: KvScales) -> Result<()> {
        if !T::DTYPE.is_fp8() {
            return Err(Error::UnsupportedDType { what: "KV scales (8-bit caches only)", dtype: T::DTYPE.name() });
        }
        check_scale("k_scale", layer, scales.k)?;
        check_scale("v_scale", layer, scales.v)?;
        let num_layers = self.layers.len();
        *self.scales.get_mut(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })? = scales;
        Ok(())
    }

    /// Layer `layer`'s dequantisation scales (1 for a 16-bit cache).
    pub fn scales(&self, layer: usize) -> Result<KvScales> {
        let num_layers = self.layers.len();
        self.scales.get(layer).copied().ok_or(Error::LayerOutOfRange { layer, num_layers })
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
    /// the planned length) and the same context as `device`. The lengths are checked again,
    /// cheaply, so a launch never relies on one invariant alone.
    pub(crate) fn pools_for(
        &self,
        device: &Device,
        shape: &CacheShape,
        layer: usize,
    ) -> Result<(&CudaSlice<T>, &CudaSlice<T>)> {
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
        Ok((&pools.k, &pools.v))
    }

    /// Layer `layer`'s pools to write, for a launch planned for `shape` (as
    /// [`pools_for`](Self::pools_for)).
    pub(crate) fn pools_for_mut(
        &mut self,
        device: &Device,
        shape: &CacheShape,
        layer: usize,
    ) -> Result<(&mut CudaSlice<T>, &mut CudaSlice<T>)> {
        self.pools_for(device, shape, layer)?;
        let pools = &mut self.layers[layer];
        Ok((&mut pools.k, &mut pools.v))
    }

    /// Applies the allocator's copy-on-write copies: each `dst` page becomes a copy of `src`, in
    /// every layer, K and V, on `stream`. A page is contiguous in both layouts.
    pub fn copy_pages(&mut self, stream: &Arc<CudaStream>, copies: &[PageCopy]) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::DeviceMismatch { what: "stream" });
        }
        let (n, num_pages) = (self.shape.page_elems(), self.shape.num_pages);
        for c in copies {
            for page in [c.src, c.dst] {
                if page as usize >= num_pages {
                    return Err(Error::TooLarge {
                        what: "page of a page copy",
                        value: page as usize,
                        max: num_pages - 1,
                    });
                }
            }
        }
        for layer in &mut self.layers {
            for pool in [&mut layer.k, &mut layer.v] {
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
            }
        }
        Ok(())
    }
}
