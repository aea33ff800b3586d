//! GPU kernels against the CPU reference. Run with `cargo test -p ferrinfer-tests --test gpu`
//! (or the GPU bundle's run.sh); where there is no GPU every test is reported as ignored, after
//! a line saying why.
mod allocator;
mod cascade;
mod decode;
mod fp8;
mod helpers;
mod merge;
mod mla;
mod page_copy;
mod parallel;
mod prefill;
mod prefill_mask;
mod raw;
mod reliability;
mod rope;
mod soundness;

fn main() {
    let tests = helpers::tests()
        .into_iter()
        .chain(page_copy::tests())
        .chain(allocator::tests())
        .chain(decode::tests())
        .chain(fp8::tests())
        .chain(prefill::tests())
        .chain(prefill_mask::tests())
        .chain(merge::tests())
        .chain(mla::tests())
        .chain(cascade::tests())
        .chain(raw::tests())
        .chain(reliability::tests())
        .chain(rope::tests())
        .chain(soundness::tests())
        .chain(parallel::tests())
        .collect();
    ferrinfer_tests::harness::run(tests)
}
