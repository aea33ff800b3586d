//! GPU timing as FlashInfer's benchmark does it: the L2 flushed before each call, CUDA events
//! around the call, warm-up calls first, the median of many. The flush also keeps the GPU busy
//! while the host enqueues the call, so the events time the kernel, not the launch.
use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use ferrinfer::Device;

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

pub struct Timer {
    stream: Arc<CudaStream>,
    flush: CudaSlice<u8>,
    runs: usize,
}

impl Timer {
    pub fn new(dev: &Device, runs: usize) -> BoxResult<Self> {
        // Larger than any L2 (50 MB on H100, 60 MB on H200): writing it evicts what a call left.
        let flush = dev.alloc_zeros::<u8>(256 << 20)?;
        Ok(Timer { stream: dev.stream().clone(), flush, runs: runs.max(1) })
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
            self.stream.memset_zeros(&mut self.flush)?;
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
