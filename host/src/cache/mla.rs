//! The paged latent cache of multi-head latent attention (DeepSeek's MLA): per token a
//! compressed latent `ckv` of [`MlaCacheShape::CKV_DIM`] elements and a rotary part `kpe` of
//! [`MlaCacheShape::KPE_DIM`], each layer in two page pools (FlashInfer's `ckv_cache`,
//! `[num_pages][page_size][512]`, and `kpe_cache`, `[num_pages][page_size][64]`). Page `p`
//! means the same tokens in both pools and in every layer, so the standard page tables,
//! [`SequenceAllocator`](crate::SequenceAllocator) and validation serve it unchanged.
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr};

use super::allocator::PageCopy;
use super::layout::{CacheShape, KvLayout};
use super::paged::copy_pages_in_pool;
use crate::error::{check_lengths, Error, Result};
use crate::runtime::abi::{MLA_CKV_DIM, MLA_KPE_DIM, MLA_TMA_MAPS};
use crate::runtime::device::Device;
use crate::runtime::dtype::{check_scale, DType, KvDType};
use crate::runtime::tma::{self, TENSOR_MAP_BYTES};

/// Dimensions of an MLA cache's pools: `num_pages × page_size` tokens, each a ckv row of
/// [`CKV_DIM`](Self::CKV_DIM) and a kpe row of [`KPE_DIM`](Self::KPE_DIM) elements. Any page
/// size from 1 up, chosen at run time.
///
/// ```
/// use ferrinfer::MlaCacheShape;
///
/// let shape = MlaCacheShape { num_pages: 1000, page_size: 7 };
/// shape.validate()?;
/// assert_eq!(shape.ckv_pool_elems(), 1000 * 7 * 512);
/// # Ok::<(), ferrinfer::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaCacheShape {
    /// Pages in each pool.
    pub num_pages: usize,
    /// Tokens (slots) per page.
    pub page_size: usize,
}

impl std::fmt::Display for MlaCacheShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MLA: {} pages × {} tokens × ({} + {}) dims",
            self.num_pages,
            self.page_size,
            Self::CKV_DIM,
            Self::KPE_DIM
        )
    }
}

impl MlaCacheShape {
    /// Elements of a token's compressed latent (DeepSeek-V2/V3's `kv_lora_rank`).
    pub const CKV_DIM: usize = MLA_CKV_DIM as usize;
    /// Elements of a token's rotary part (`qk_rope_head_dim`).
    pub const KPE_DIM: usize = MLA_KPE_DIM as usize;

    /// Checks the dimensions: non-zero, and within the kernels' 32-bit indexing.
    pub fn validate(&self) -> Result<()> {
        self.ckv().validate(DType::F16)
    }

    /// Elements of one layer's ckv pool.
    pub fn ckv_pool_elems(&self) -> usize {
        self.ckv().pool_elems()
    }

    /// Elements of one layer's kpe pool.
    pub fn kpe_pool_elems(&self) -> usize {
        self.kpe().pool_elems()
    }

    /// The ckv pool as a one-head cache (its geometry, for validation and addressing).
    pub(crate) fn ckv(&self) -> CacheShape {
        self.pool(Self::CKV_DIM)
    }

    /// The kpe pool as a one-head cache.
    pub(crate) fn kpe(&self) -> CacheShape {
        self.pool(Self::KPE_DIM)
    }

    fn pool(&self, head_dim: usize) -> CacheShape {
        CacheShape {
            num_pages: self.num_pages,
            page_size: self.page_size,
            num_kv_heads: 1,
            head_dim,
            layout: KvLayout::Nhd,
        }
    }
}

/// One layer's ckv and kpe pools. Read access only once inside an [`MlaKvCache`]: a pool cannot
/// be replaced there (a shorter or foreign pool would be an out-of-bounds launch), only its
/// contents written through [`MlaKvCache::pools_mut`].
pub struct MlaLayerPools<T: KvDType> {
    ckv: CudaSlice<T>,
    kpe: CudaSlice<T>,
}

impl<T: KvDType> MlaLayerPools<T> {
    /// A layer's pools, for [`MlaKvCache::from_layers`] (which checks their lengths).
    pub fn new(ckv: CudaSlice<T>, kpe: CudaSlice<T>) -> Self {
        MlaLayerPools { ckv, kpe }
    }

    /// The layer's ckv pool, `[num_pages][page_size][512]`.
    pub fn ckv(&self) -> &CudaSlice<T> {
        &self.ckv
    }

    /// The layer's kpe pool, `[num_pages][page_size][64]`.
    pub fn kpe(&self) -> &CudaSlice<T> {
        &self.kpe
    }

    /// The two pools, `(ckv, kpe)`.
    pub fn into_parts(self) -> (CudaSlice<T>, CudaSlice<T>) {
        (self.ckv, self.kpe)
    }

    /// Whether each pool has `shape`'s length.
    fn check_lengths(&self, shape: &MlaCacheShape) -> Result<()> {
        let (ckv, kpe) = (
            ("ckv pool", self.ckv.len(), shape.ckv_pool_elems()),
            ("kpe pool", self.kpe.len(), shape.kpe_pool_elems()),
        );
        check_lengths(&[ckv, kpe])
    }
}

/// The paged latent cache of MLA for `num_layers` layers (module documentation): f16 or bf16,
/// or 8-bit ([`E4m3`](crate::E4m3), [`E5m2`](crate::E5m2)) with one dequantisation scale per
/// layer for both pools (vLLM's MLA `k_scale`: a stored value `x` means `x × scale`; 1 until
/// [`set_scale`](Self::set_scale)), which appends quantise with and attention reads with.
/// Every pool has exactly the shape's length and lives in one CUDA context, from construction
/// on; nothing can replace a pool, so a plan that checked the shape and the context launches
/// only inside the pools. On a GPU of compute capability 9 a 16-bit cache also encodes its
/// pools' TMA maps once, at construction (each spans exactly its pool), for the Hopper kernel.
///
/// ```no_run
/// use ferrinfer::{bf16, Device, MlaCacheShape, MlaKvCache, SequenceAllocator};
///
/// let dev = Device::new(0)?;
/// let shape = MlaCacheShape { num_pages: 4096, page_size: 64 };
/// let cache = MlaKvCache::<bf16>::new(&dev, shape, 61)?; // DeepSeek-V3's 61 layers
/// let mut alloc = SequenceAllocator::new(shape.num_pages, shape.page_size)?; // the usual allocator
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub struct MlaKvCache<T: KvDType> {
    shape: MlaCacheShape,
    layers: Vec<MlaLayerPools<T>>,
    /// Each layer's dequantisation scale (1 for a 16-bit cache).
    scales: Vec<f32>,
    ctx: Arc<CudaContext>,
    /// Each layer's TMA maps of its pools for the Hopper kernel ([`tensor_maps`]), or none.
    tensor_maps: Option<CudaSlice<u8>>,
}

/// Bytes of one layer's TMA maps.
const LAYER_MAP_BYTES: usize = MLA_TMA_MAPS * TENSOR_MAP_BYTES;

/// The TMA maps of every layer's pools (`abi::MlaParams::tensor_maps`: for box heights 64, 32,
/// .., 1 rows, the ckv pool's, then the kpe pool's), encoded once here so that a run uploads
/// nothing; for 16-bit caches on a GPU of compute capability 9 (the Hopper kernel's), else
/// none. A map spans exactly its pool: a box reads nothing outside it.
fn tensor_maps<T: KvDType>(
    ctx: &Arc<CudaContext>,
    shape: &MlaCacheShape,
    layers: &[MlaLayerPools<T>],
) -> Result<Option<CudaSlice<u8>>> {
    let rows = shape.num_pages as u64 * shape.page_size as u64;
    let major = ctx.compute_capability().map_err(Error::driver("reading the compute capability"))?.0;
    // TMA coordinates are signed 32-bit; the zero boxes start at the row past the pools.
    if !matches!(T::DTYPE, DType::F16 | DType::BF16) || major != 9 || rows > (i32::MAX as u64) - 64 {
        return Ok(None);
    }
    let stream = ctx.default_stream();
    let mut bytes = Vec::with_capacity(layers.len() * LAYER_MAP_BYTES);
    for layer in layers {
        let (ckv, _ckv_read) = layer.ckv.device_ptr(&stream);
        let (kpe, _kpe_read) = layer.kpe.device_ptr(&stream);
        for i in 0..MLA_TMA_MAPS / 2 {
            bytes.extend(tma::encode_2d(T::DTYPE, ckv, MLA_CKV_DIM as u64, rows, 64 >> i)?);
            bytes.extend(tma::encode_2d(T::DTYPE, kpe, MLA_KPE_DIM as u64, rows, 64 >> i)?);
        }
    }
    let maps = stream.clone_htod(&bytes).map_err(Error::driver("copying TMA maps to the device"))?;
    stream.synchronize().map_err(Error::driver("synchronizing the stream"))?;
    Ok(Some(maps))
}

/// The element types an MLA cache holds (those its kernels read).
fn check_mla_dtype(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::F16 | DType::BF16) || dtype.is_fp8() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { what: "an MLA cache (f16, bf16, e4m3 or e5m2)", dtype: dtype.name() })
    }
}

impl<T: KvDType> MlaKvCache<T> {
    /// Allocates zeroed pools for `num_layers` layers on `device`.
    pub fn new(device: &Device, shape: MlaCacheShape, num_layers: usize) -> Result<Self> {
        check_mla_dtype(T::DTYPE)?;
        shape.validate()?;
        if num_layers == 0 {
            return Err(Error::ZeroDimension { what: "num_layers" });
        }
        let layers = (0..num_layers)
            .map(|_| {
                Ok(MlaLayerPools::new(
                    device.alloc_zeros(shape.ckv_pool_elems())?,
                    device.alloc_zeros(shape.kpe_pool_elems())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let ctx = device.context().clone();
        let tensor_maps = tensor_maps(&ctx, &shape, &layers)?;
        Ok(MlaKvCache { shape, layers, scales: vec![1.0; num_layers], ctx, tensor_maps })
    }

    /// Wraps existing pools (for example filled by the caller), checking their lengths and that
    /// all of them live in one CUDA context.
    pub fn from_layers(shape: MlaCacheShape, layers: Vec<MlaLayerPools<T>>) -> Result<Self> {
        check_mla_dtype(T::DTYPE)?;
        shape.validate()?;
        let Some(first) = layers.first() else {
            return Err(Error::ZeroDimension { what: "num_layers" });
        };
        let ctx = first.ckv.context().clone();
        for layer in &layers {
            layer.check_lengths(&shape)?;
            for (what, buf) in [("ckv pool", &layer.ckv), ("kpe pool", &layer.kpe)] {
                if buf.context().cu_ctx() != ctx.cu_ctx() {
                    return Err(Error::DeviceMismatch { what });
                }
            }
        }
        let tensor_maps = tensor_maps(&ctx, &shape, &layers)?;
        Ok(MlaKvCache { shape, scales: vec![1.0; layers.len()], layers, ctx, tensor_maps })
    }

    /// Sets layer `layer`'s dequantisation scale (8-bit caches only): stored values `x` of both
    /// pools mean `x × scale` from now on (values already in the layer are not rewritten), and
    /// appends store `x · (1 / scale)` quantised. A scale that is zero, negative, NaN or
    /// infinite is an error, as is a 16-bit cache.
    pub fn set_scale(&mut self, layer: usize, scale: f32) -> Result<()> {
        if !T::DTYPE.is_fp8() {
            return Err(Error::UnsupportedDType { what: "an MLA scale (8-bit caches only)", dtype: T::DTYPE.name() });
        }
        check_scale("MLA scale", layer, None, scale)?;
        let num_layers = self.layers.len();
        *self.scales.get_mut(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })? = scale;
        Ok(())
    }

    /// Layer `layer`'s dequantisation scale (1 for a 16-bit cache).
    pub fn scale(&self, layer: usize) -> Result<f32> {
        let num_layers = self.layers.len();
        self.scales.get(layer).copied().ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// The pools, layer by layer (the reverse of [`from_layers`](Self::from_layers)).
    pub fn into_layers(self) -> Vec<MlaLayerPools<T>> {
        self.layers
    }

    /// The dimensions of each layer's pools.
    pub fn shape(&self) -> &MlaCacheShape {
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
    pub fn layer(&self, layer: usize) -> Result<&MlaLayerPools<T>> {
        let num_layers = self.layers.len();
        self.layers.get(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })
    }

    /// Layer `layer`'s ckv and kpe pools as mutable views, to write their contents (a view has
    /// the pool's fixed length; it cannot replace the pool).
    pub fn pools_mut(&mut self, layer: usize) -> Result<(CudaViewMut<'_, T>, CudaViewMut<'_, T>)> {
        let num_layers = self.layers.len();
        let pools = self.layers.get_mut(layer).ok_or(Error::LayerOutOfRange { layer, num_layers })?;
        Ok((pools.ckv.as_view_mut(), pools.kpe.as_view_mut()))
    }

    /// Layer `layer`'s pools for a launch planned for `shape`: the same shape and the same
    /// context as `device`; the lengths are checked again, cheaply. With the layer's scale.
    pub(crate) fn pools_for(
        &self,
        device: &Device,
        shape: &MlaCacheShape,
        layer: usize,
    ) -> Result<(&CudaSlice<T>, &CudaSlice<T>, f32)> {
        if self.shape != *shape {
            return Err(Error::ShapeMismatch { planned: shape.to_string(), got: self.shape.to_string() });
        }
        device.check_context("cache", &self.ctx)?;
        let pools = self.layer(layer)?;
        pools.check_lengths(shape)?;
        Ok((&pools.ckv, &pools.kpe, self.scales[layer]))
    }

    /// Layer `layer`'s TMA maps ([`tensor_maps`]), where the cache has them.
    pub(crate) fn tensor_maps(&self, layer: usize) -> Option<CudaView<'_, u8>> {
        let at = layer * LAYER_MAP_BYTES;
        self.tensor_maps.as_ref().filter(|_| layer < self.layers.len()).map(|m| m.slice(at..at + LAYER_MAP_BYTES))
    }

    /// Layer `layer`'s pools to write, for a launch planned for `shape` (as
    /// [`pools_for`](Self::pools_for)), with the layer's scale.
    pub(crate) fn pools_for_mut(
        &mut self,
        device: &Device,
        shape: &MlaCacheShape,
        layer: usize,
    ) -> Result<(&mut CudaSlice<T>, &mut CudaSlice<T>, f32)> {
        self.pools_for(device, shape, layer)?;
        let pools = &mut self.layers[layer];
        Ok((&mut pools.ckv, &mut pools.kpe, self.scales[layer]))
    }

    /// Applies the allocator's copy-on-write copies: each `dst` page becomes a copy of `src`, in
    /// every layer, both pools, on `stream`.
    pub fn copy_pages(&mut self, stream: &Arc<CudaStream>, copies: &[PageCopy]) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::DeviceMismatch { what: "stream" });
        }
        let (ckv_page, kpe_page) = (self.shape.ckv().page_elems(), self.shape.kpe().page_elems());
        for layer in &mut self.layers {
            copy_pages_in_pool(stream, &mut layer.ckv, ckv_page, self.shape.num_pages, copies)?;
            copy_pages_in_pool(stream, &mut layer.kpe, kpe_page, self.shape.num_pages, copies)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mla_shape_is_two_one_head_pools_of_512_and_64_dims() {
        let shape = MlaCacheShape { num_pages: 10, page_size: 3 };
        assert_eq!((shape.ckv_pool_elems(), shape.kpe_pool_elems()), (10 * 3 * 512, 10 * 3 * 64));
        assert_eq!(shape.ckv().element_index(4, 2, 0, 5), (4 * 3 + 2) * 512 + 5);
        assert_eq!(shape.kpe().element_index(4, 2, 0, 5), (4 * 3 + 2) * 64 + 5);
    }

    #[test]
    fn an_mla_shape_with_a_zero_or_too_many_tokens_is_an_error() {
        assert!(matches!(MlaCacheShape { num_pages: 4, page_size: 0 }.validate(), Err(Error::ZeroPageSize)));
        assert!(matches!(
            MlaCacheShape { num_pages: 0, page_size: 4 }.validate(),
            Err(Error::ZeroDimension { what: "num_pages" })
        ));
        // 2^22 pages × 1024 tokens × 512 dims overflows the kernels' 32-bit indexing.
        let e = MlaCacheShape { num_pages: 1 << 22, page_size: 1024 }.validate().unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[test]
    fn mla_caches_are_16_or_8_bit() {
        for dtype in [DType::F16, DType::BF16, DType::E4M3, DType::E5M2] {
            assert!(check_mla_dtype(dtype).is_ok(), "{dtype:?}");
        }
        assert!(matches!(check_mla_dtype(DType::F32), Err(Error::UnsupportedDType { .. })));
    }
}
