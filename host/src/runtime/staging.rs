//! Uploads that do not stall the GPU. A copy from ordinary (pageable) host memory makes the
//! driver wait for the stream first, which would serialise a serving engine's planning with
//! the previous step's kernels. Plans instead write their metadata straight into one of a few
//! pinned buffers and enqueue an asynchronous copy from it; the buffer's event (cudarc's) says
//! when the copy has read it, so reusing it four uploads later waits only if that copy is still
//! queued.
use std::sync::Arc;

use cudarc::driver::result;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, HostSlice, PinnedHostSlice};

use crate::error::{Error, Result};

/// Pinned buffers in the ring: uploads in flight before one waits for the oldest.
const SLOTS: usize = 4;
/// The smallest pinned buffer (pinning is slow, so buffers grow in powers of two).
const MIN_BYTES: usize = 64 << 10;

/// A device's ring of pinned staging buffers.
#[derive(Default)]
pub(crate) struct StagingRing {
    slots: [Option<PinnedHostSlice<u8>>; SLOTS],
    next: usize,
}

impl StagingRing {
    /// Enqueues on `stream` a copy of `len` bytes, written by `fill` into a pinned buffer, to
    /// the start of `dst` (at least `len` bytes). Returns once the copy is queued; cudarc's
    /// tracking orders later users of `dst` on any stream after it, and it after earlier ones.
    pub fn upload(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
        dst: &mut CudaSlice<u8>,
    ) -> Result<()> {
        assert!(dst.len() >= len, "an upload larger than its destination");
        if len == 0 {
            return Ok(());
        }
        let slot = &mut self.slots[self.next];
        self.next = (self.next + 1) % SLOTS;
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None; // frees the old buffer (after its copy) before pinning a larger one
                          // SAFETY: the buffer is written by `fill` before anything reads it.
            let buffer = unsafe { ctx.alloc_pinned_with_flags::<u8>(len.next_power_of_two().max(MIN_BYTES), 0) }
                .map_err(Error::driver("allocating pinned staging memory"))?;
            *slot = Some(buffer);
        }
        let buffer = slot.as_mut().expect("a staging buffer was just ensured");
        // Waits for this buffer's previous copy, if it has not run yet.
        let host = buffer.as_mut_slice().map_err(Error::driver("waiting for a staging buffer"))?;
        fill(&mut host[..len]);
        // SAFETY: the slice is used only by the copy below, on `stream`, and the returned guard
        // records the buffer's event after it.
        let (host, _record_host) = unsafe { buffer.stream_synced_slice(stream) };
        let (dst, _record_dst) = dst.device_ptr_mut(stream);
        // SAFETY: `dst` holds at least `len` bytes; `host` is pinned and stays allocated until its
        // event (recorded after the copy) completes.
        unsafe { result::memcpy_htod_async(dst, &host[..len], stream.cu_stream()) }
            .map_err(Error::driver("copying plan metadata to the device"))
    }
}
