//! TMA tensor maps (`cuTensorMapEncodeTiled`): the descriptors Hopper's bulk tensor copies
//! read, encoded on the host by the driver. Only the form the kernels use: a 2-D row-major
//! tensor of 16-bit elements, boxes of 64 elements (128 bytes, the 128-byte swizzle that
//! `wgmma` reads) by a power of two of rows, zeros for rows past the tensor.
use cudarc::driver::{sys, DriverError};

use super::dtype::DType;
use crate::error::{Error, Result};

/// Bytes of an encoded map (`CUtensorMap`).
pub(crate) const TENSOR_MAP_BYTES: usize = 128;

/// Elements of a box row: 128 bytes of 16-bit values, the swizzle's span.
pub(crate) const BOX_COLUMNS: u32 = 64;

/// A map over `rows` rows of `width` 16-bit elements of `dtype` (f16 or bf16) from `base`
/// (rows packed, 16-byte aligned), boxes of [`BOX_COLUMNS`] × `box_rows`. A copy reads only
/// inside the tensor: rows past `rows` arrive as zeros.
pub(crate) fn encode_2d(
    dtype: DType,
    base: u64,
    width: u64,
    rows: u64,
    box_rows: u32,
) -> Result<[u8; TENSOR_MAP_BYTES]> {
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        other => return Err(Error::UnsupportedDType { what: "a TMA map (f16 or bf16)", dtype: other.name() }),
    };
    let dims = [width, rows];
    let row_bytes = [width * 2];
    let boxes = [BOX_COLUMNS, box_rows];
    let element_strides = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array holds the rank's entries (the strides one fewer); the driver writes
    // the map and reads nothing else.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            2,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            row_bytes.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::driver("encoding a TMA map")(DriverError(status)));
    }
    // SAFETY: written by the driver above; a `CUtensorMap` is 128 plain bytes.
    Ok(unsafe { std::mem::transmute::<sys::CUtensorMap, [u8; TENSOR_MAP_BYTES]>(map.assume_init()) })
}
