//! The one error type: every mistake a caller can make, and every driver failure, with the
//! offending value in the message. The bottom of the crate: it imports nothing of ferrinfer's,
//! so every layer can use it.
use cudarc::driver::DriverError;

/// ferrinfer's result type, with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong: a caller's mistake, caught on the host before any launch, or a
/// CUDA driver failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error(
        "no CUDA driver found (libcuda could not be loaded); ferrinfer needs an NVIDIA driver for CUDA 12 or newer"
    )]
    NoDriver,
    /// A CUDA driver call failed.
    #[error("CUDA driver error while {context}: {source}")]
    Driver {
        /// What ferrinfer was doing, e.g. `"loading the PTX module"`.
        context: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// An operation on one GPU of a [`TensorParallel`](crate::TensorParallel) group failed.
    #[error("GPU {gpu}: {source}")]
    Gpu {
        /// The GPU's rank in the group.
        gpu: usize,
        /// What went wrong there.
        source: Box<Error>,
    },
    /// The NCCL library (libnccl) could not be loaded.
    #[error("no NCCL found (libnccl.so could not be loaded); tensor-parallel runs need NCCL 2.18 or newer")]
    NoNccl,
    /// An NCCL call failed.
    #[error("NCCL error while {context}: {code}")]
    Nccl {
        /// What ferrinfer was doing, e.g. `"all-gathering"`.
        context: &'static str,
        /// NCCL's result code.
        code: String,
    },
    /// One GPU was given twice to a [`TensorParallel`](crate::TensorParallel) group.
    #[error("devices {first} and {second} of the group are the same GPU")]
    SameGpuTwice {
        /// The first handle's rank.
        first: usize,
        /// The second's.
        second: usize,
    },
    /// Heads do not split evenly over the GPUs of a tensor-parallel group.
    #[error("{what} = {count} does not split evenly over {gpus} GPUs")]
    UnevenShards {
        /// What is split, e.g. `"num_kv_heads"`.
        what: &'static str,
        /// Its count.
        count: usize,
        /// GPUs in the group.
        gpus: usize,
    },
    /// The GPU's compute capability is below 8.0 (no PTX module fits it).
    #[error("GPU {name} has compute capability {major}.{minor}; ferrinfer needs 8.0 (Ampere) or newer")]
    UnsupportedDevice {
        /// The GPU's name, as the driver reports it.
        name: String,
        /// The major version of the compute capability.
        major: i32,
        /// The minor version of the compute capability.
        minor: i32,
    },

    /// A page size of 0 was given.
    #[error("page_size must be at least 1, got 0")]
    ZeroPageSize,
    /// A dimension or count that must be at least 1 is 0.
    #[error("{what} must be at least 1, got 0")]
    ZeroDimension {
        /// The name of the dimension, e.g. `"num_layers"`.
        what: &'static str,
    },
    /// A head's row (`head_dim` elements) is not a whole number of 16-byte vectors.
    #[error("head_dim {head_dim} of {dtype} is {bytes} bytes per row, not a multiple of 16 bytes")]
    UnalignedHeadDim {
        /// The head dimension given.
        head_dim: usize,
        /// The name of the element type.
        dtype: &'static str,
        /// Bytes in one head's row: `head_dim` times the element size.
        bytes: usize,
    },
    /// A count or index exceeds what the kernels can address (or what the cache holds).
    #[error("{what} = {value} exceeds the supported maximum {max}")]
    TooLarge {
        /// What is too large, e.g. `"kv_len"`.
        what: &'static str,
        /// The value given or computed.
        value: usize,
        /// The largest value allowed.
        max: usize,
    },

    /// An offset array does not have `batch_size + 1` entries.
    #[error("{what} has {got} entries; a batch of {batch} sequences needs {}", batch + 1)]
    IndptrLength {
        /// The name of the array, e.g. `"kv_indptr"`.
        what: &'static str,
        /// The number of entries it has.
        got: usize,
        /// The number of sequences in the batch.
        batch: usize,
    },
    /// An offset array is empty.
    #[error("{what} is empty; it needs batch_size + 1 entries")]
    EmptyIndptr {
        /// The name of the array, e.g. `"kv_indptr"`.
        what: &'static str,
    },
    /// An offset array does not start at 0.
    #[error("{what}[0] is {first}; it must be 0")]
    IndptrStart {
        /// The name of the array, e.g. `"kv_indptr"`.
        what: &'static str,
        /// Its first entry.
        first: u32,
    },
    /// An offset array decreases somewhere.
    #[error("{what} decreases at index {index}: {prev} then {next}")]
    IndptrNotMonotone {
        /// The name of the array, e.g. `"kv_indptr"`.
        what: &'static str,
        /// The index of the first entry smaller than the one before it.
        index: usize,
        /// The entry at `index - 1`.
        prev: u32,
        /// The entry at `index`.
        next: u32,
    },
    /// The last entry of `kv_indptr` is not the length of `kv_indices`.
    #[error("kv_indptr ends at {end} but kv_indices has {len} entries")]
    IndptrEnd {
        /// The last entry of `kv_indptr`.
        end: u32,
        /// The number of entries in `kv_indices`.
        len: usize,
    },
    /// A page index in `kv_indices` is not a page of the cache.
    #[error("kv_indices[{index}] = {page} is out of range for a cache of {num_pages} pages")]
    PageOutOfRange {
        /// The index into `kv_indices`.
        index: usize,
        /// The page index found there.
        page: u32,
        /// The number of pages in the cache.
        num_pages: usize,
    },
    /// A sequence with pages has a last-page length of 0 or more than `page_size`.
    #[error("kv_last_page_len[{seq}] = {len}: a sequence with pages needs 1..={page_size}")]
    LastPageLen {
        /// The index of the sequence in the batch.
        seq: usize,
        /// Its entry in `kv_last_page_len`.
        len: u32,
        /// Tokens per page.
        page_size: usize,
    },
    /// A sequence with no pages has a non-zero last-page length.
    #[error("kv_last_page_len[{seq}] = {len} but sequence {seq} has no pages; it must be 0")]
    LastPageLenOfEmpty {
        /// The index of the sequence in the batch.
        seq: usize,
        /// Its entry in `kv_last_page_len`.
        len: u32,
    },

    /// A plan was run on a cache of a different shape from the one it was made for.
    #[error("the cache has shape {got} but the plan was made for {planned}")]
    ShapeMismatch {
        /// The shape the plan was made for (`CacheShape`'s display form).
        planned: String,
        /// The shape of the cache it was run on.
        got: String,
    },
    /// A stream, buffer or cache of another CUDA context than the plan's (another GPU, or a
    /// context the `Device` was not opened on) was passed to a launch.
    #[error(
        "{what} belongs to another CUDA context than the plan or Device it was given to; plans, caches, \
         buffers and streams of one launch must come from one context"
    )]
    DeviceMismatch {
        /// Which operand, e.g. `"stream"` or `"q"`.
        what: &'static str,
    },
    /// A plan whose last `replan` failed after it had started changing the plan's device
    /// buffers; it runs again once a `replan` succeeds.
    #[error("the plan's last replan failed part-way; replan it before running it")]
    PlanUnusable,
    /// Two writes of one launch would land in the same slot of a page.
    #[error("sequences {first_seq} and {second_seq} would both write slot {slot} of page {page}")]
    OverlappingWrites {
        /// The page written twice.
        page: u32,
        /// A slot of that page written twice.
        slot: usize,
        /// The index of one writing sequence in the batch.
        first_seq: usize,
        /// The index of the other writing sequence (the same as `first_seq` when a sequence
        /// lists the page twice).
        second_seq: usize,
    },
    /// A prefill request has more query tokens than cached keys.
    #[error("request {seq} has {qo_len} query tokens but only {kv_len} keys (its new tokens must be in the cache)")]
    QueryLongerThanKeys {
        /// The index of the request in the batch.
        seq: usize,
        /// Its number of query tokens.
        qo_len: usize,
        /// Its number of cached tokens.
        kv_len: usize,
    },
    /// An append writes more tokens to a sequence than the page table gives it.
    #[error("sequence {seq} appends {append_len} tokens but holds only {kv_len}")]
    AppendLongerThanSequence {
        /// The index of the sequence in the batch.
        seq: usize,
        /// The number of tokens appended to it.
        append_len: usize,
        /// Its length after the append, from the page table.
        kv_len: usize,
    },
    /// A layer index is not a layer of the cache.
    #[error("layer {layer} does not exist; the cache has {num_layers} layers")]
    LayerOutOfRange {
        /// The layer index given.
        layer: usize,
        /// The number of layers in the cache.
        num_layers: usize,
    },
    /// The allocator has too few free pages for a reservation.
    #[error("out of pages: {needed} needed, {free} free")]
    OutOfPages {
        /// The number of pages the reservation needs.
        needed: usize,
        /// The number of free pages.
        free: usize,
    },
    /// The allocator holds no sequence with this id.
    #[error("sequence {id} does not exist (never created, or freed)")]
    UnknownSequence {
        /// The sequence's id (`SeqId::get`).
        id: u64,
    },
    /// The attention kernels are not built for this head dimension.
    #[error("head_dim {head_dim} is not supported here; supported: {supported:?}")]
    UnsupportedHeadDim {
        /// The head dimension given.
        head_dim: usize,
        /// The head dimensions the kernels are built for.
        supported: Vec<usize>,
    },
    /// Prefill with values narrower than queries and keys is not built for these head dims.
    #[error("head_dim_qk {head_dim_qk} with head_dim_vo {head_dim_vo} is not supported here; supported (qk, vo): {supported:?}")]
    UnsupportedHeadDims {
        /// The query and key head dimension given.
        head_dim_qk: usize,
        /// The value and output head dimension given.
        head_dim_vo: usize,
        /// The (query/key, value) pairs the kernels are built for.
        supported: Vec<(usize, usize)>,
    },
    /// An operation was called with an element type it does not take.
    #[error("{what} does not take {dtype}")]
    UnsupportedDType {
        /// The operation, e.g. `"decode attention"`.
        what: &'static str,
        /// The name of the element type.
        dtype: &'static str,
    },
    /// The number of query heads is 0 or not a multiple of the number of KV heads.
    #[error("num_qo_heads {num_qo_heads} is not a positive multiple of num_kv_heads {num_kv_heads}")]
    GroupSize {
        /// The number of query heads given.
        num_qo_heads: usize,
        /// The number of KV heads of the cache.
        num_kv_heads: usize,
    },
    /// A prefill custom mask does not have the length the batch needs: the flattened booleans
    /// `Σ qo_len · kv_len`, the packed bytes `mask_indptr`'s last entry.
    #[error("{what} has {got} entries; the batch needs {expected}")]
    MaskLength {
        /// `"custom_mask"` or `"packed_custom_mask"`.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length the batch needs.
        expected: usize,
    },
    /// A request's segment of a packed custom mask is not the `⌈qo_len · kv_len / 8⌉` bytes its
    /// queries and keys need.
    #[error("mask_indptr gives request {seq} {got} bytes; its {qo_len} × {kv_len} mask needs {expected}")]
    MaskSegment {
        /// The request.
        seq: usize,
        /// `mask_indptr[seq + 1] − mask_indptr[seq]`.
        got: usize,
        /// `⌈qo_len · kv_len / 8⌉`.
        expected: usize,
        /// The request's query tokens.
        qo_len: usize,
        /// The request's keys.
        kv_len: usize,
    },
    /// An attention option is out of range.
    #[error("bad option: {what}")]
    BadOption {
        /// Which option, and what it must be.
        what: &'static str,
    },
    /// A KV dequantisation scale that is zero, negative, NaN or infinite.
    #[error(
        "{what}{} of layer {layer} is {value}; a scale must be finite and positive",
        .kv_head.map_or(String::new(), |h| format!(" of KV head {h}"))
    )]
    BadScale {
        /// Which scale: `"k_scale"` or `"v_scale"` (a layer's), `"k head scale"` or
        /// `"v head scale"` (a KV head's).
        what: &'static str,
        /// The layer it was given for.
        layer: usize,
        /// The KV head, for a head's scale.
        kv_head: Option<usize>,
        /// The value given.
        value: f32,
    },
    /// A cache's element type is not the one the plan was made for.
    #[error("the cache holds {got} but the plan was made for a {planned} cache")]
    KvDTypeMismatch {
        /// The KV element type the plan was made for (its options' `kv_dtype`, else the query's).
        planned: &'static str,
        /// The cache's element type.
        got: &'static str,
    },
    /// A buffer does not have the length its shapes need.
    #[error("{what} holds {got} elements; the shapes need {expected}")]
    BufferLength {
        /// The name of the buffer, e.g. `"ragged K"`.
        what: &'static str,
        /// The number of elements it holds.
        got: usize,
        /// The number of elements it should hold.
        expected: usize,
    },
    /// A RoPE `rotary_dim` that is 0, odd or larger than `head_dim`.
    #[error("rotary_dim {rotary_dim} must be even and in 2..={head_dim} (head_dim)")]
    RotaryDim {
        /// The rotary dimension given.
        rotary_dim: usize,
        /// The head dimension.
        head_dim: usize,
    },
    /// A token's RoPE position lies past the end of what the angles cover: the caller's cos/sin
    /// cache, or the 2^24 positions the kernels compute angles for.
    #[error("token {token} has position {position}; {what} covers positions below {end}")]
    PositionOutOfRange {
        /// The token's row in the ragged batch.
        token: usize,
        /// Its position.
        position: u64,
        /// The first position not allowed.
        end: u64,
        /// What bounds it, e.g. `"the cos/sin cache"`.
        what: &'static str,
    },
    /// A buffer's device address is not a multiple of 16 bytes (the kernels move 16-byte
    /// vectors); a view that starts part-way into a row has this.
    #[error("{what} starts at device address {address:#x}, which is not 16-byte aligned")]
    UnalignedBuffer {
        /// The name of the buffer, e.g. `"q"`.
        what: &'static str,
        /// Its device address.
        address: u64,
    },
}

/// `(what, got, expected)` for each buffer: the first mismatch is the error
/// ([`Error::BufferLength`]). Here, at the bottom, so that every layer checks lengths alike.
pub(crate) fn check_lengths(buffers: &[(&'static str, usize, usize)]) -> Result<()> {
    match buffers.iter().find(|(_, got, expected)| got != expected) {
        Some(&(what, got, expected)) => Err(Error::BufferLength { what, got, expected }),
        None => Ok(()),
    }
}

impl Error {
    /// This error, as one of GPU `gpu` of a tensor-parallel group ([`Error::Gpu`]); an error
    /// that already names its GPU is left as it is.
    pub fn on_gpu(self, gpu: usize) -> Error {
        match self {
            Error::Gpu { .. } => self,
            e => Error::Gpu { gpu, source: Box::new(e) },
        }
    }

    /// Wraps a driver error with what ferrinfer was doing.
    pub(crate) fn driver(context: &'static str) -> impl FnOnce(DriverError) -> Error {
        move |source| Error::Driver { context, source }
    }
}
