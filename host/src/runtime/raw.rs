//! Device buffers given by address and length, for stacks that do not hold their tensors in
//! cudarc buffers (the `unsafe` `run_raw` forms).
use std::marker::PhantomData;

use cudarc::driver::sys::CUdeviceptr;

/// A device buffer the caller owns, given by address and length in elements of `T`: the raw
/// form of every `run`, for stacks that do not hold their tensors in cudarc buffers.
#[derive(Clone, Copy, Debug)]
pub struct RawSlice<T> {
    ptr: CUdeviceptr,
    len: usize,
    _element: PhantomData<*const T>,
}

impl<T> RawSlice<T> {
    /// # Safety
    /// `ptr` is the address of `len` elements of `T` in device memory of the plan's
    /// [`Device`](crate::Device)'s context (allocated there, or reachable from it), aligned for
    /// `T`, and stays allocated until every launch given this slice has completed.
    pub unsafe fn new(ptr: CUdeviceptr, len: usize) -> Self {
        RawSlice { ptr, len, _element: PhantomData }
    }

    /// The device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Elements of `T`.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
