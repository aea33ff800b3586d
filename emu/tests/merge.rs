//! `merge_states` (FlashInfer's, and cascade's merge) on the emulator against the reference,
//! from the host's own parameters (`merge_states_params`, `merge_states_blocks`): one to seven
//! states, head dims 64 to 256, states without keys (LSE −∞) among them, rows of all-empty
//! states (zeros and −∞).
use ferrinfer::internals::abi::MERGE_THREADS;
use ferrinfer::internals::{merge_states_blocks, merge_states_params};
use ferrinfer::{bf16, f16, reference, KvDType, StateShape};
use ferrinfer_emu::gpu::half::{self, Half};
use ferrinfer_emu::{launch, merge, DeviceBuffer, LaunchConfig};
use ferrinfer_tests::compare::expect_attention_close;
use ferrinfer_tests::workload::{poison, random_values, rng};
use rand::Rng;

fn run<T: KvDType, H: Half + 'static>(tokens: usize, num_states: usize, heads: usize, head_dim: usize, seed: u64) {
    let mut r = rng(seed);
    let v: Vec<T> = random_values(&mut r, tokens * num_states * heads * head_dim);
    // LSEs around 10 apart at most; a fifth of the states empty, and token 0's all of them.
    let s: Vec<f32> =
        (0..tokens * num_states * heads)
            .map(|i| {
                if i < num_states * heads || r.random_bool(0.2) {
                    f32::NEG_INFINITY
                } else {
                    r.random_range(-5.0..5.0)
                }
            })
            .collect();
    let (b_v, b_s) = (DeviceBuffer::from_slice("v", &v), DeviceBuffer::from_slice("s", &s));
    let b_out = DeviceBuffer::filled("v_out", tokens * heads * head_dim, poison::<T>());
    let b_s_out = DeviceBuffer::filled("s_out", tokens * heads, f32::NAN);
    let shape = StateShape { heads, head_dim };
    let params = merge_states_params(shape, num_states, tokens, [b_v.ptr(), b_s.ptr(), b_out.ptr(), b_s_out.ptr()]);
    let cfg = LaunchConfig { grid: (merge_states_blocks(&params), 1), threads: MERGE_THREADS, smem_bytes: 0 };
    launch(cfg, move || unsafe { merge::merge_states::<H>(&params) }).unwrap_or_else(|f| panic!("merge_states: {f}"));
    let (want, want_lse) = reference::merge_states(&v, &s, num_states, heads, head_dim);
    expect_attention_close(&b_out.to_vec(), &want, &b_s_out.to_vec(), &want_lse, heads, head_dim, "token")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn merge_two_states_head_dim_128_f16() {
    run::<f16, half::F16>(9, 2, 4, 128, 1);
}

#[test]
fn merge_one_state_head_dim_64_bf16() {
    run::<bf16, half::Bf16>(5, 1, 3, 64, 2);
}

#[test]
fn merge_seven_states_head_dim_256_f16() {
    run::<f16, half::F16>(4, 7, 2, 256, 3);
}

#[test]
fn merge_three_states_head_dim_96_bf16() {
    run::<bf16, half::Bf16>(6, 3, 5, 96, 4);
}
