//! CUDA-graph capture of a `run`: a plan's launch must replay bit for bit.
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use ferrinfer::{f16, Device};

/// Runs `run` into one output directly and, captured in a CUDA graph replayed three times,
/// into another; errors unless the two are identical. `dev` must have cudarc's cross-stream
/// event tracking off (graph capture needs it).
pub fn expect_graph_replay_matches(
    dev: &Device,
    elems: usize,
    mut run: impl FnMut(&CudaStream, &mut CudaSlice<f16>) -> ferrinfer::Result<()>,
) -> crate::harness::TestResult {
    let (mut direct, mut replayed) = (dev.alloc_zeros::<f16>(elems)?, dev.alloc_zeros::<f16>(elems)?);
    run(dev.stream(), &mut direct)?;
    dev.synchronize()?;
    let stream = dev.stream();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = run(stream, &mut replayed);
    let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)?;
    captured?;
    let graph = graph.ok_or("capture produced no graph")?;
    for _ in 0..3 {
        graph.launch()?;
    }
    dev.synchronize()?;
    if dev.download(&direct)? != dev.download(&replayed)? {
        return Err("graph replay differs from the direct run".into());
    }
    Ok(())
}
