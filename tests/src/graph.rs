//! CUDA-graph capture of a `run`: a plan's launch must replay bit for bit.
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, CudaStream};
use ferrinfer::{f16, Device};

/// A device handle of its own for a test that captures a CUDA graph (the test device the other
/// tests share will not do: a capture on its stream takes in their work there, and both fail
/// with `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`), with cudarc's cross-stream event tracking off,
/// as graph capture needs. Use it on its one stream (`Device::stream`) only.
pub fn capture_device() -> ferrinfer::Result<Device> {
    let dev = Device::new(0)?;
    // SAFETY: a context object of its own, used by the one test that opened it, on one stream
    // (the contract above).
    unsafe { dev.context().disable_event_tracking() };
    Ok(dev)
}

/// Runs `run` into one output directly and, captured in a CUDA graph replayed three times,
/// into another; errors unless the two are identical. `dev` must have cudarc's cross-stream
/// event tracking off (graph capture needs it).
pub fn expect_graph_replay_matches(
    dev: &Device,
    elems: usize,
    mut run: impl FnMut(&CudaStream, &mut CudaSlice<f16>) -> ferrinfer::Result<()>,
) -> crate::harness::TestResult {
    expect_graph_replay_after(dev, elems, &mut (), |_, stream, out| run(stream, out), |_| Ok(()))
}

/// [`expect_graph_replay_matches`] with `change` called on `state` (which `run` reads too)
/// between the capture and the replays, before the direct run: what the captured launches read
/// when they are replayed, not what they saw when captured, makes the output.
pub fn expect_graph_replay_after<S>(
    dev: &Device,
    elems: usize,
    state: &mut S,
    mut run: impl FnMut(&mut S, &CudaStream, &mut CudaSlice<f16>) -> ferrinfer::Result<()>,
    change: impl FnOnce(&mut S) -> ferrinfer::Result<()>,
) -> crate::harness::TestResult {
    let (mut direct, mut replayed) = (dev.alloc_zeros::<f16>(elems)?, dev.alloc_zeros::<f16>(elems)?);
    // A direct run first, so that nothing the first run may do lazily happens in the capture.
    run(state, dev.stream(), &mut direct)?;
    dev.synchronize()?;
    let stream = dev.stream();
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = run(state, stream, &mut replayed);
    let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)?;
    captured?;
    let graph = graph.ok_or("capture produced no graph")?;
    change(state)?;
    for _ in 0..3 {
        graph.launch()?;
    }
    run(state, dev.stream(), &mut direct)?;
    dev.synchronize()?;
    if dev.download(&direct)? != dev.download(&replayed)? {
        return Err("graph replay differs from the direct run".into());
    }
    Ok(())
}
