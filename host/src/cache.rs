//! Device storage for K and V pages, any number of layers.
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::allocator::PageCopy;
use crate::device::Device;
use crate::dtype::KvDType;
use crate::error::{Error, Result};
use crate::layout::CacheShape;

/// One layer's K and V page pools.
pub struct LayerPools<T: KvDType> {
    /// The layer's K page pool.
    pub k: CudaSlice<T>,
    /// The layer's V page pool.
    pub v: CudaSlice<T>,
}

/// K and V page pools for `num_layers` layers, each pool `num_pages × page_size × num_kv_heads ×
/// head_dim` elements of `T` in the shape's layout. Page size is any value ≥ 1, chosen at run
/// time. Each layer is its own pair of allocations (no pool is limited by another's size, and a
/// layer's buffers can be handed to other code as they are); page `p` means the same tokens in
/// every layer, so one page table serves them all.
pub struct PagedKvCache<T: KvDType> {
    shape: CacheShape,
    layers: Vec<LayerPools<T>>,
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
                Ok(LayerPools {
                    k: device.alloc_zeros(shape.pool_elems())?,
                    v: device.alloc_zeros(shape.pool_elems())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(PagedKvCache { shape, layers })
    }

    /// Wraps existing pools (for example filled by the caller), checking their lengths.
    pub fn from_layers(shape: CacheShape, layers: Vec<LayerPools<T>>) -> Result<Self> {
        shape.validate(T::DTYPE)?;
        if layers.is_empty() {
            return Err(Error::ZeroDimension { what: "num_layers" });
        }
        for layer in &layers {
            for (what, buf) in [("K page pool", &layer.k), ("V page pool", &layer.v)] {
                if buf.len() != shape.pool_elems() {
                    return Err(Error::BufferLength { what, got: buf.len(), expected: shape.pool_elems() });
                }
            }
        }
        Ok(PagedKvCache { shape, layers })
    }

    /// The dimensions of each page pool.
    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }

    /// Layers in the cache.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The pools of layer `layer`.
    pub fn layer(&self, layer: usize) -> Result<&LayerPools<T>> {
        let num_layers = self.layers.len();
        self.layers.get(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// The pools of layer `layer`, mutably.
    pub fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerPools<T>> {
        let num_layers = self.layers.len();
        self.layers.get_mut(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// Applies the allocator's copy-on-write copies: each `dst` page becomes a copy of `src`, in
    /// every layer, K and V, on `stream`. A page is contiguous in both layouts.
    pub fn copy_pages(&mut self, stream: &Arc<CudaStream>, copies: &[PageCopy]) -> Result<()> {
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
