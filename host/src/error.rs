//! The one error type: every mistake a caller can make, and every driver failure, with the
//! offending value in the message.
use cudarc::driver::DriverError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no CUDA driver found (libcuda could not be loaded); ferrinfer needs an NVIDIA driver for CUDA 12 or newer"
    )]
    NoDriver,
    #[error("CUDA driver error while {context}: {source}")]
    Driver { context: &'static str, source: DriverError },
    #[error("GPU {name} has compute capability {major}.{minor}; ferrinfer needs 8.0 (Ampere) or newer")]
    UnsupportedDevice { name: String, major: i32, minor: i32 },

    #[error("page_size must be at least 1, got 0")]
    ZeroPageSize,
    #[error("{what} must be at least 1, got 0")]
    ZeroDimension { what: &'static str },
    #[error("head_dim {head_dim} of {dtype} is {bytes} bytes per row, not a multiple of 16 bytes")]
    UnalignedHeadDim { head_dim: usize, dtype: &'static str, bytes: usize },
    #[error("{what} = {value} exceeds the supported maximum {max}")]
    TooLarge { what: &'static str, value: usize, max: usize },

    #[error("{what} has {got} entries; a batch of {batch} sequences needs {}", batch + 1)]
    IndptrLength { what: &'static str, got: usize, batch: usize },
    #[error("{what} is empty; it needs batch_size + 1 entries")]
    EmptyIndptr { what: &'static str },
    #[error("{what}[0] is {first}; it must be 0")]
    IndptrStart { what: &'static str, first: u32 },
    #[error("{what} decreases at index {index}: {prev} then {next}")]
    IndptrNotMonotone { what: &'static str, index: usize, prev: u32, next: u32 },
    #[error("kv_indptr ends at {end} but kv_indices has {len} entries")]
    IndptrEnd { end: u32, len: usize },
    #[error("kv_indices[{index}] = {page} is out of range for a cache of {num_pages} pages")]
    PageOutOfRange { index: usize, page: u32, num_pages: usize },
    #[error("kv_last_page_len[{seq}] = {len}: a sequence with pages needs 1..={page_size}")]
    LastPageLen { seq: usize, len: u32, page_size: usize },
    #[error("kv_last_page_len[{seq}] = {len} but sequence {seq} has no pages; it must be 0")]
    LastPageLenOfEmpty { seq: usize, len: u32 },

    #[error("the cache has shape {got:?} but the plan was made for {planned:?}")]
    ShapeMismatch { planned: crate::layout::CacheShape, got: crate::layout::CacheShape },
    #[error("sequences {first_seq} and {second_seq} would both write slot {slot} of page {page}")]
    OverlappingWrites { page: u32, slot: usize, first_seq: usize, second_seq: usize },
    #[error("request {seq} has {qo_len} query tokens but only {kv_len} keys (its new tokens must be in the cache)")]
    QueryLongerThanKeys { seq: usize, qo_len: usize, kv_len: usize },
    #[error("sequence {seq} appends {append_len} tokens but holds only {kv_len}")]
    AppendLongerThanSequence { seq: usize, append_len: usize, kv_len: usize },
    #[error("layer {layer} does not exist; the cache has {num_layers} layers")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    #[error("out of pages: {needed} needed, {free} free")]
    OutOfPages { needed: usize, free: usize },
    #[error("sequence {0:?} does not exist (never created, or freed)")]
    UnknownSequence(crate::allocator::SeqId),
    #[error("head_dim {head_dim} is not supported here; supported: {supported:?}")]
    UnsupportedHeadDim { head_dim: usize, supported: &'static [usize] },
    #[error("{what} does not take {dtype}")]
    UnsupportedDType { what: &'static str, dtype: &'static str },
    #[error("num_qo_heads {num_qo_heads} is not a positive multiple of num_kv_heads {num_kv_heads}")]
    GroupSize { num_qo_heads: usize, num_kv_heads: usize },
    #[error("bad option: {what}")]
    BadOption { what: &'static str },
    #[error("{what} holds {got} elements; the shapes need {expected}")]
    BufferLength { what: &'static str, got: usize, expected: usize },
}

impl Error {
    /// Wraps a driver error with what ferrinfer was doing.
    pub(crate) fn driver(context: &'static str) -> impl FnOnce(DriverError) -> Error {
        move |source| Error::Driver { context, source }
    }
}
