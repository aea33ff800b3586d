//! The device helpers (`kernels-gpu/src/gpu`) against the host.
use ferrinfer::internals::ReadStream;
use ferrinfer::{bf16, f16, Device};
use ferrinfer_tests::harness::{GpuTest, TestResult};
use ferrinfer_tests::workload::rng;

/// Each device helper against the host's exact or f64 result.
fn device_helpers_match_the_host(dev: &Device) -> TestResult {
    use ferrinfer::internals::{helper_outputs, HELPER_OUTPUTS};
    let mut r = rng(5);
    let mut input: Vec<f32> = (0..4096).map(|_| rand::Rng::random_range(&mut r, -20.0f32..20.0)).collect();
    input[..4].copy_from_slice(&[0.5, -0.0, 65504.0, 1e-8]);
    let divisor = 613;
    let out = helper_outputs(dev, &input, divisor)?;
    for (i, (&x, got)) in input.iter().zip(out.chunks(HELPER_OUTPUTS)).enumerate() {
        let warp = &input[i / 32 * 32..][..32];
        let close = |g: f32, want: f64, rel: f64| (g as f64 - want).abs() <= rel * want.abs().max(1e-30);
        let checks = [
            // Past f32's range exp2 overflows to infinity, as it must.
            (
                "exp2",
                close(got[0], (x as f64).exp2(), 1e-6)
                    || ((x as f64).exp2() > f32::MAX as f64 && got[0] == f32::INFINITY),
            ),
            ("log2", (got[1] as f64 - (x.abs() as f64 + 1.0).log2()).abs() <= 1e-6),
            ("rcp", x == 0.0 || close(got[2], 1.0 / x as f64, 1e-6)),
            ("f16", got[3] == f16::from_f32(x).to_f32()),
            ("bf16", got[4] == bf16::from_f32(x).to_f32()),
            // 31 f32 additions: error below 31 ulp of the largest partial sum.
            (
                "warp sum",
                (got[5] as f64 - warp.iter().map(|&v| v as f64).sum::<f64>()).abs()
                    <= 4e-6 * warp.iter().map(|v| v.abs() as f64).sum::<f64>(),
            ),
            ("warp max", got[6] == warp.iter().copied().fold(f32::MIN, f32::max)),
            ("shuffle", got[7].to_bits() == warp[(i % 32) ^ 5].to_bits()),
            ("fast div", got[8] == ((i * 7919) as u32 / divisor) as f32),
            ("fast rem", got[9] == ((i * 7919) as u32 % divisor) as f32),
            ("shared memory", got[10].to_bits() == input[i ^ 1].to_bits()),
        ];
        if let Some((name, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(format!("{name} of input {i} ({x}): GPU gave {:?}", got).into());
        }
    }
    Ok(())
}

/// The read stream reads every vector exactly once: its XOR of all words matches the host's.
fn read_stream_reads_every_word(dev: &Device) -> TestResult {
    let mut r = rng(11);
    // Not a multiple of the grid's stride, so the last round is partial.
    let bytes: Vec<u8> = (0..(48 << 20) + 16 * 37).map(|_| rand::Rng::random(&mut r)).collect();
    let want = bytes.chunks(4).fold(0u32, |a, w| a ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    let mut stream = ReadStream::over(dev, dev.upload(&bytes)?)?;
    stream.run(dev.stream())?;
    let got = stream.checksum()?;
    ferrinfer_tests::ensure!(got == want, "XOR of the words read: GPU {got:#010x}, host {want:#010x}");
    Ok(())
}

pub fn tests() -> Vec<GpuTest> {
    vec![
        GpuTest::new("device_helpers_match_the_host", device_helpers_match_the_host),
        GpuTest::new("read_stream_reads_every_word", read_stream_reads_every_word),
    ]
}
