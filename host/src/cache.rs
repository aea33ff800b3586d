//! Device storage for one layer's K and V pages.
use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::dtype::KvDType;
use crate::error::{Error, Result};
use crate::layout::CacheShape;

/// K and V page pools of one layer, each `num_pages × page_size × num_kv_heads × head_dim`
/// elements of `T` in the shape's layout. Page size is any value ≥ 1, chosen at run time.
pub struct PagedKvCache<T: KvDType> {
    shape: CacheShape,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
}

impl<T: KvDType> PagedKvCache<T> {
    /// Allocates zeroed pools on `device`.
    pub fn new(device: &Device, shape: CacheShape) -> Result<Self> {
        shape.validate(T::DTYPE)?;
        let k = device.alloc_zeros(shape.pool_elems())?;
        let v = device.alloc_zeros(shape.pool_elems())?;
        Ok(PagedKvCache { shape, k, v })
    }

    /// Wraps existing pools (for example filled by the caller), checking their lengths.
    pub fn from_buffers(shape: CacheShape, k: CudaSlice<T>, v: CudaSlice<T>) -> Result<Self> {
        shape.validate(T::DTYPE)?;
        for (what, buf) in [("K page pool", &k), ("V page pool", &v)] {
            if buf.len() != shape.pool_elems() {
                return Err(Error::BufferLength { what, got: buf.len(), expected: shape.pool_elems() });
            }
        }
        Ok(PagedKvCache { shape, k, v })
    }

    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }

    pub fn k(&self) -> &CudaSlice<T> {
        &self.k
    }

    pub fn v(&self) -> &CudaSlice<T> {
        &self.v
    }

    pub fn k_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.k
    }

    pub fn v_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.v
    }
}
