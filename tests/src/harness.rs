//! A test harness for GPU tests (libtest-compatible command line). Each test body gets the
//! shared [`Device`]. Where no GPU can be opened every test is reported as ignored, after one
//! line saying why: GPU tests never pass without running.
use std::sync::Arc;

use ferrinfer::Device;
use libtest_mimic::{Arguments, Failed, Trial};

pub type TestResult = Result<(), Failed>;

/// One GPU test: a name that says the case, and its body.
pub struct GpuTest {
    pub name: String,
    pub body: Box<dyn Fn(&Device) -> TestResult + Send + Sync>,
    /// GPUs the test needs (its body opens those past the first itself).
    pub gpus: usize,
    /// Whether the test needs NCCL (`TensorParallel`).
    pub nccl: bool,
}

impl GpuTest {
    pub fn new(name: impl Into<String>, body: impl Fn(&Device) -> TestResult + Send + Sync + 'static) -> Self {
        GpuTest { name: name.into(), body: Box::new(body), gpus: 1, nccl: false }
    }

    /// The test needs `gpus` GPUs and NCCL: where either is missing it is reported as ignored,
    /// after a line saying why.
    pub fn tensor_parallel(mut self, gpus: usize) -> Self {
        (self.gpus, self.nccl) = (gpus, true);
        self
    }
}

/// Fails the test with a message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

/// Runs `tests` on GPU 0 (or `FERRINFER_DEVICE`) and exits with libtest's status.
pub fn run(tests: Vec<GpuTest>) -> ! {
    let args = Arguments::from_args();
    let ordinal = std::env::var("FERRINFER_DEVICE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let device = if args.list {
        Err("listing only".to_string())
    } else {
        Device::new(ordinal).map(Arc::new).map_err(|e| e.to_string())
    };
    match &device {
        Ok(d) => eprintln!("GPU tests on {} (compute capability {:?})", d.name(), d.compute_capability()),
        Err(reason) if !args.list => eprintln!("GPU tests SKIPPED, no GPU could be opened: {reason}"),
        Err(_) => {}
    }
    let (gpus, nccl) = (ferrinfer::TensorParallel::gpu_count(), ferrinfer::TensorParallel::nccl_present());
    let unmet = |t: &GpuTest| t.gpus > gpus || (t.nccl && !nccl);
    let skipped = tests.iter().filter(|t| unmet(t)).count();
    if skipped > 0 && device.is_ok() {
        eprintln!(
            "{skipped} tensor-parallel GPU test(s) SKIPPED: this machine has {gpus} GPU(s) and {}",
            if nccl { "NCCL" } else { "no NCCL (libnccl.so)" }
        );
    }
    let trials = tests
        .into_iter()
        .map(|t| {
            let device = device.clone();
            let skip = device.is_err() || unmet(&t);
            Trial::test(t.name, move || match &device {
                Ok(d) => (t.body)(d),
                Err(reason) => Err(format!("no GPU: {reason}").into()),
            })
            .with_ignored_flag(skip)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}
