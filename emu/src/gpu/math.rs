//! The special-function unit's approximations, computed exactly in f32 with their flushing of
//! subnormals to zero (`.ftz`).
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}
pub fn exp2(x: f32) -> f32 {
    ftz(ftz(x).exp2())
}
pub fn log2(x: f32) -> f32 {
    ftz(ftz(x).log2())
}
pub fn rcp(x: f32) -> f32 {
    ftz(1.0 / ftz(x))
}
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}
pub fn rint(x: f32) -> f32 {
    x.round_ties_even()
}
pub fn sin(x: f32) -> f32 {
    x.sin()
}
pub fn cos(x: f32) -> f32 {
    x.cos()
}
/// `x` (on the GPU an `asm` statement that pins where it is computed).
pub fn computed_here(x: [u32; 4]) -> [u32; 4] {
    x
}
