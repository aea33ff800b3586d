//! GPU timing: the L2 flushed before each call, CUDA events around the call, warm-up calls
//! first, the median of many. The flush writes a buffer larger than the L2 (evicting whatever a
//! call left) and then reads another one, so the timed call starts with a cold L2 holding only
//! clean lines: no write-back of the flush's dirty lines is charged to it. The flush also keeps
//! the GPU busy while the host enqueues the call, so the events time the kernel, not the launch.
use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use ferrinfer::internals::ReadStream;
use ferrinfer::Device;

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

pub struct Timer {
    stream: Arc<CudaStream>,
    flush_write: CudaSlice<u8>,
    flush_read: ReadStream,
    runs: usize,
}

impl Timer {
    pub fn new(device: &Device, runs: usize) -> BoxResult<Self> {
        // Larger than any L2 (50 MB on H100, 60 MB on H200).
        let flush_write = device.alloc_zeros::<u8>(256 << 20)?;
        let flush_read = ReadStream::new(device, 256 << 20)?;
        Ok(Timer { stream: device.stream().clone(), flush_write, flush_read, runs: runs.max(1) })
    }

    /// Writes one buffer and reads another, both larger than the L2.
    fn flush(&mut self) -> BoxResult<()> {
        self.stream.memset_zeros(&mut self.flush_write)?;
        self.flush_read.run(&self.stream)?;
        Ok(())
    }

    /// Timed runs per measurement.
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// Median microseconds of `f` over the configured runs, after 3 warm-up calls.
    pub fn median_us(&mut self, mut f: impl FnMut() -> ferrinfer::Result<()>) -> BoxResult<f64> {
        for _ in 0..3 {
            f()?;
        }
        let ctx = self.stream.context().clone();
        let mut times = Vec::with_capacity(self.runs);
        for _ in 0..self.runs {
            let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            self.flush()?;
            start.record(&self.stream)?;
            f()?;
            end.record(&self.stream)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? as f64 * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}
