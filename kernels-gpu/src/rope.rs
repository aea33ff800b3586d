//! Rotary position embeddings over ragged `[token][head][head_dim]` rows, in place, out of
//! place, or into the paged cache (RoPE fused into the append). See `abi::RopeParams` for the
//! work split: a thread computes the cos/sin of its unit's pairs once and applies them to the
//! [`ROPE_GROUP_HEADS`] heads of its group, loading every head's vectors before it stores any.
//!
//! Each thread reads only the elements it writes (a NeoX unit holds both halves of its pairs,
//! a GPT-J unit whole pairs), so in place needs no ordering between threads; loads use the
//! coherent path for that reason.
use crate::abi::{rope_angle, RopeParams, RopeTensor, ROPE_GPTJ, ROPE_GROUP_HEADS, ROPE_NEOX};
use crate::gpu::half::{pack, Half};
use crate::gpu::index::{block_dim_x, block_x, thread_x};
use crate::gpu::math::{cos, fma, rint, sin};
use crate::gpu::mem::{load, store, Vec16};

const G: u32 = ROPE_GROUP_HEADS;

/// Cos and sin of pair `pair` at `position`: from the caller's cache, or from the frequency
/// table with the reduction of [`rope_angle`].
#[inline(always)]
unsafe fn cos_sin(p: &RopeParams, position: u32, pair: u32) -> (f32, f32) {
    if p.cos_sin != 0 {
        let row = (p.cos_sin as *const f32).add(position as usize * p.rotary_dim as usize);
        (*row.add(pair as usize), *row.add((p.rotary_dim / 2 + pair) as usize))
    } else {
        let freq = *(p.freqs as *const [f32; 2]).add(pair as usize);
        let angle = rope_angle(position as f32, freq, fma, rint);
        (cos(angle), sin(angle))
    }
}

/// The first element of head `head`'s row of `token`: where it is read and where it is written.
#[inline(always)]
unsafe fn row(p: &RopeParams, t: &RopeTensor, token: u32, head: u32) -> (*const u16, *mut u16) {
    let flat = (token as usize * t.heads as usize + head as usize) * p.head_dim as usize;
    let dst = if t.paged != 0 {
        let at = *(p.row_offsets as *const u64).add(token as usize) as usize;
        at + head as usize * p.pool_head_stride as usize
    } else {
        flat
    };
    ((t.src as *const u16).add(flat), (t.dst as *mut u16).add(dst))
}

#[inline(always)]
fn unpack<H: Half>(v: Vec16) -> [f32; 8] {
    let mut x = [0.0f32; 8];
    crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        x[j] = H::to_f32((v.0[j / 2] >> (16 * (j % 2))) as u16);
    });
    x
}

/// Copies the 16-byte vector at element `d` of each head of the group.
#[inline(always)]
unsafe fn copy_vector(p: &RopeParams, t: &RopeTensor, token: u32, head0: u32, heads: u32, d: u32) {
    let mut v = [Vec16::default(); G as usize];
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            v[h] = load(row(p, t, token, head0 + h as u32).0.add(d as usize) as *const Vec16);
        }
    });
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            store(row(p, t, token, head0 + h as u32).1.add(d as usize) as *mut Vec16, v[h]);
        }
    });
}

/// NeoX, 16-byte vectors: unit `u` below `rotary_dim / 16` rotates pairs `8u..8u + 8` (the
/// vectors at `8u` and `8u + rotary_dim / 2`); the others copy a vector past `rotary_dim`.
#[inline(always)]
unsafe fn neox<H: Half>(p: &RopeParams, t: &RopeTensor, token: u32, head0: u32, heads: u32, unit: u32) {
    let pair_vecs = p.rotary_dim / 16;
    if unit >= pair_vecs {
        if t.copy_tail != 0 {
            copy_vector(p, t, token, head0, heads, p.rotary_dim + 8 * (unit - pair_vecs));
        }
        return;
    }
    let (d0, half) = (8 * unit, p.rotary_dim / 2);
    let position = *(p.positions as *const u32).add(token as usize);
    let (mut c, mut s) = ([0.0f32; 8], [0.0f32; 8]);
    crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        (c[j], s[j]) = cos_sin(p, position, d0 + j as u32);
    });
    let mut a = [Vec16::default(); G as usize];
    let mut b = [Vec16::default(); G as usize];
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            let src = row(p, t, token, head0 + h as u32).0;
            a[h] = load(src.add(d0 as usize) as *const Vec16);
            b[h] = load(src.add((d0 + half) as usize) as *const Vec16);
        }
    });
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            let (x, y) = (unpack::<H>(a[h]), unpack::<H>(b[h]));
            let (mut lo, mut hi) = ([0.0f32; 8], [0.0f32; 8]);
            crate::unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                lo[j] = fma(x[j], c[j], -(y[j] * s[j]));
                hi[j] = fma(y[j], c[j], x[j] * s[j]);
            });
            let dst = row(p, t, token, head0 + h as u32).1;
            store(dst.add(d0 as usize) as *mut Vec16, pack::<H>(&lo));
            store(dst.add((d0 + half) as usize) as *mut Vec16, pack::<H>(&hi));
        }
    });
}

/// NeoX, one pair a unit (`rotary_dim / 2` not a multiple of 8): unit `u` below
/// `rotary_dim / 2` rotates pair `u`; the others copy the single dim `rotary_dim + u − rotary_dim / 2`.
#[inline(always)]
unsafe fn neox_scalar<H: Half>(p: &RopeParams, t: &RopeTensor, token: u32, head0: u32, heads: u32, unit: u32) {
    let half = p.rotary_dim / 2;
    if unit >= half {
        if t.copy_tail != 0 {
            let d = (p.rotary_dim + unit - half) as usize;
            let mut v = [0u16; G as usize];
            crate::unroll!(h in [0, 1, 2, 3] {
                if (h as u32) < heads {
                    v[h] = *row(p, t, token, head0 + h as u32).0.add(d);
                }
            });
            crate::unroll!(h in [0, 1, 2, 3] {
                if (h as u32) < heads {
                    *row(p, t, token, head0 + h as u32).1.add(d) = v[h];
                }
            });
        }
        return;
    }
    let position = *(p.positions as *const u32).add(token as usize);
    let (c, s) = cos_sin(p, position, unit);
    let (mut a, mut b) = ([0u16; G as usize], [0u16; G as usize]);
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            let src = row(p, t, token, head0 + h as u32).0;
            a[h] = *src.add(unit as usize);
            b[h] = *src.add((unit + half) as usize);
        }
    });
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            let (x, y) = (H::to_f32(a[h]), H::to_f32(b[h]));
            let dst = row(p, t, token, head0 + h as u32).1;
            *dst.add(unit as usize) = H::from_f32(fma(x, c, -(y * s)));
            *dst.add((unit + half) as usize) = H::from_f32(fma(y, c, x * s));
        }
    });
}

/// GPT-J: unit `u` is the row's vector at `8u`; its pairs `(2i, 2i + 1)` below `rotary_dim`
/// are rotated, its dims past `rotary_dim` copied (written only when `copy_tail`).
#[inline(always)]
unsafe fn gptj<H: Half>(p: &RopeParams, t: &RopeTensor, token: u32, head0: u32, heads: u32, unit: u32) {
    let d0 = 8 * unit;
    if d0 >= p.rotary_dim {
        if t.copy_tail != 0 {
            copy_vector(p, t, token, head0, heads, d0);
        }
        return;
    }
    let position = *(p.positions as *const u32).add(token as usize);
    let (mut c, mut s) = ([1.0f32; 4], [0.0f32; 4]);
    crate::unroll!(j in [0, 1, 2, 3] {
        if d0 + 2 * (j as u32) < p.rotary_dim {
            (c[j], s[j]) = cos_sin(p, position, d0 / 2 + j as u32);
        }
    });
    let mut a = [Vec16::default(); G as usize];
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            a[h] = load(row(p, t, token, head0 + h as u32).0.add(d0 as usize) as *const Vec16);
        }
    });
    crate::unroll!(h in [0, 1, 2, 3] {
        if (h as u32) < heads {
            let x = unpack::<H>(a[h]);
            let mut y = x;
            // Pairs past rotary_dim keep their values, bit for bit (±0, ∞ and NaN included).
            crate::unroll!(j in [0, 1, 2, 3] {
                if d0 + 2 * (j as u32) < p.rotary_dim {
                    y[2 * j] = fma(x[2 * j], c[j], -(x[2 * j + 1] * s[j]));
                    y[2 * j + 1] = fma(x[2 * j + 1], c[j], x[2 * j] * s[j]);
                }
            });
            let mut out = pack::<H>(&y);
            // The unrotated words as they were (the f32 round trip keeps values, not NaN payloads).
            crate::unroll!(j in [0, 1, 2, 3] {
                if d0 + 2 * (j as u32) >= p.rotary_dim {
                    out.0[j] = a[h].0[j];
                }
            });
            store(row(p, t, token, head0 + h as u32).1.add(d0 as usize) as *mut Vec16, out);
        }
    });
}

/// One thread's unit (see `abi::RopeParams`). Grid: `ceil(total / ROPE_THREADS)` blocks of
/// `ROPE_THREADS`.
#[inline(always)]
pub unsafe fn rope<H: Half, const MODE: u32>(p: &RopeParams) {
    let e = block_x() * block_dim_x() + thread_x();
    if e >= p.total {
        return;
    }
    let (rest, unit) = p.units.divmod(e);
    let (token, group) = p.groups.divmod(rest);
    // The tensor of this group, by selects (no dynamic index into the parameters).
    let t = if group >= p.tensors[2].first_group {
        p.tensors[2]
    } else if group >= p.tensors[1].first_group {
        p.tensors[1]
    } else {
        p.tensors[0]
    };
    let head0 = (group - t.first_group) * G;
    let heads = (t.heads - head0).min(G);
    if t.rotate == 0 {
        // Values: the row's vectors `unit, unit + units, …`.
        let mut d = 8 * unit;
        while d < p.head_dim {
            copy_vector(p, &t, token, head0, heads, d);
            d += 8 * p.units.divisor;
        }
    } else if MODE == ROPE_NEOX {
        neox::<H>(p, &t, token, head0, heads, unit);
    } else if MODE == ROPE_GPTJ {
        gptj::<H>(p, &t, token, head0, heads, unit);
    } else {
        neox_scalar::<H>(p, &t, token, head0, heads, unit);
    }
}
