//! Bandwidth probes: ferrinfer's own pure-read stream, the ceiling for kernels that only read
//! (decode), and a way for benchmarks to leave the L2 holding clean lines of an unrelated buffer.
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::abi::ReadStreamParams;
use super::device::{launch_config, Device, LaunchStream};
use crate::error::{Error, Result};

const THREADS: u32 = 256;

/// A buffer to read and the sink its reads are folded into.
pub struct ReadStream {
    device: Device,
    data: CudaSlice<u8>,
    sink: CudaSlice<u32>,
    blocks: u32,
}

impl ReadStream {
    /// A stream over `bytes` (rounded down to 16) of zeroed device memory.
    pub fn new(device: &Device, bytes: usize) -> Result<Self> {
        Self::over(device, device.alloc_zeros::<u8>(bytes / 16 * 16)?)
    }

    /// A stream over `data`, whose length must be a non-zero multiple of 16 bytes.
    pub fn over(device: &Device, data: CudaSlice<u8>) -> Result<Self> {
        device.check_buffer("read stream data", &data)?;
        if data.is_empty() || !data.len().is_multiple_of(16) {
            return Err(Error::BufferLength {
                what: "read stream data (whole 16-byte vectors)",
                got: data.len(),
                expected: data.len().next_multiple_of(16).max(16),
            });
        }
        // One wave of as many blocks as fit on every SM: grid-stride, so none waits for a slot.
        let per_sm = device
            .kernels()
            .single("read_stream")
            .function
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
            .map_err(Error::driver("reading the read stream's occupancy"))?;
        let blocks = device.multiprocessor_count() as u32 * per_sm.max(1);
        let sink = device.alloc_zeros::<u32>((blocks * THREADS / 32) as usize)?;
        Ok(ReadStream { device: device.clone(), data, sink, blocks })
    }

    /// Bytes one [`run`](Self::run) reads.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// XOR of every 32-bit word read by the last run (waits for the device's stream).
    pub fn checksum(&self) -> Result<u32> {
        Ok(self.device.download(&self.sink)?.into_iter().fold(0, |a, w| a ^ w))
    }

    /// Reads the whole buffer once on `stream`.
    pub fn run(&mut self, stream: &CudaStream) -> Result<()> {
        self.device.check_stream(stream)?;
        let (data, _g0) = self.data.device_ptr(stream);
        let (sink, _g1) = self.sink.device_ptr_mut(stream);
        let params = ReadStreamParams { data, sink, vecs: (self.data.len() / 16) as u64 };
        let cfg = launch_config((self.blocks, 1), THREADS, 0);
        let kernel = &self.device.kernels().single("read_stream").function;
        // SAFETY: reads `vecs` whole vectors of `data`; writes one word per warp of the grid
        // into `sink`, which has exactly that many; both are of this device (checked).
        unsafe { self.device.launch(kernel, cfg, LaunchStream::Cudarc(stream), &params, "launching the read stream") }
    }
}
