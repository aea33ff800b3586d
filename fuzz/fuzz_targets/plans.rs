//! The decode, prefill and MLA planners (`decode_split`, `prefill_split`, `plan_prefill_split`
//! and `mla_split`, the device-free part of planning) against a bounds model: every accepted batch's work items read
//! only keys below their request's length, through their request's pages, write only rows of
//! their request's queries, cover every key a query may see exactly once across a split's
//! parts, and use partial slots and merge counters inside what the plan sized. Nothing panics.
#![no_main]
use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use ferrinfer::internals::{
    decode_split, decode_split_tokens, persistent_schedule, plan_prefill_split, prefill_block_rows, prefill_split,
    HopperPrefill, PrefillWorkItem, MAX_DECODE_TOKENS, NO_PARTIAL,
};
use ferrinfer::{
    mla_split, CacheShape, DecodeOptions, KvLayout, MlaCacheShape, MlaOptions, PageTable, PrefillKernel, PrefillOptions,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    page_size: u8,
    num_kv_heads: u8,
    group: u8,
    head_dim: u8,
    hnd: bool,
    window_left: i8,
    causal: bool,
    /// (kv_len / 7, qo_len) per request.
    lens: Vec<(u8, u8)>,
    /// Queries may outnumber keys (the planner must refuse).
    unchecked_qo: bool,
    shuffle: u64,
    spare_pages: u8,
    sms: u8,
    blocks_per_sm: u8,
    /// Plan prefill for each block height a kernel exists for, not only the planner's pick.
    every_block_height: bool,
}

/// A page table for the lengths, pages drawn from a shuffled pool.
fn table(kv_lens: &[usize], page_size: usize, spare: usize, mut seed: u64) -> (PageTable, usize) {
    let needed: usize = kv_lens.iter().map(|l| l.div_ceil(page_size)).sum();
    let num_pages = needed + spare;
    let mut pool: Vec<u32> = (0..num_pages as u32).collect();
    for i in (1..pool.len()).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        pool.swap(i, (seed >> 33) as usize % (i + 1));
    }
    let mut t = PageTable { kv_indptr: vec![0], ..Default::default() };
    for &len in kv_lens {
        let pages = len.div_ceil(page_size);
        t.kv_indices.extend(pool.drain(..pages));
        t.kv_indptr.push(t.kv_indices.len() as u32);
        t.kv_last_page_len.push(if len == 0 { 0 } else { ((len - 1) % page_size + 1) as u32 });
    }
    (t, num_pages.max(1))
}

/// Checks that `parts` (start, end, slot, first_slot, parts) cover `lo..hi` in order, once.
fn check_parts(mut parts: Vec<(u32, u32, u32, u32, u32)>, lo: u32, hi: u32, slots: usize) {
    parts.sort();
    let n = parts.len() as u32;
    let mut at = lo;
    for &(start, end, slot, first_slot, count) in &parts {
        assert_eq!(start, at, "parts leave a gap or overlap");
        assert!(start <= end && count == n);
        if n == 1 {
            assert_eq!(slot, NO_PARTIAL);
        } else {
            assert!(slot >= first_slot && slot < first_slot + n && (first_slot + n) as usize <= slots);
        }
        at = end;
    }
    assert_eq!(at, hi, "parts do not reach the end");
}

fuzz_target!(|input: Input| {
    let page_size = input.page_size as usize;
    if page_size == 0 {
        return;
    }
    let kv_lens: Vec<usize> = input.lens.iter().map(|&(kv, _)| kv as usize * 7).collect();
    let (table, num_pages) = table(&kv_lens, page_size, input.spare_pages as usize, input.shuffle);
    let shape = CacheShape {
        num_pages,
        page_size,
        num_kv_heads: (input.num_kv_heads % 8) as usize + 1,
        head_dim: [64, 128, 256, 96][input.head_dim as usize % 4],
        layout: if input.hnd { KvLayout::Hnd } else { KvLayout::Nhd },
    };
    let heads = shape.num_kv_heads * (input.group % 24) as usize;
    let window_left = (input.window_left as i32).max(-2);
    let (sms, per_sm) = (input.sms as usize, input.blocks_per_sm as usize % 4 + 1);

    let decode = DecodeOptions { window_left, ..Default::default() };
    // One query token a request (decode), and a few (draft tokens: causal ones need the last
    // `tokens − 1` keys of a split request in its last part).
    let tokens = input.spare_pages as usize % MAX_DECODE_TOKENS + 1;
    if let Ok(split) = decode_split_tokens(&shape, heads, &table, decode, tokens, sms, per_sm) {
        assert_eq!(split.row_tiles, (tokens * split.group_size).div_ceil(16));
        for w in split.work.iter().filter(|w| w.parts > 1 && w.slot == w.first_slot + w.parts - 1) {
            assert!(w.start as usize + tokens - 1 <= w.end as usize, "a split request's last part is too short");
        }
    }
    if let Ok(split) = decode_split(&shape, heads, &table, decode, sms, per_sm) {
        let heads_blocks = (shape.num_kv_heads * split.row_tiles) as u32;
        let mut by_request: BTreeMap<u32, Vec<_>> = BTreeMap::new();
        for w in &split.work {
            let r = w.request as usize;
            assert_eq!(w.pages, table.kv_indptr[r]);
            assert!(w.end as usize <= kv_lens[r]);
            if w.parts > 1 {
                assert!(w.counters + heads_blocks <= split.split_requests as u32 * heads_blocks);
            }
            by_request.entry(w.request).or_default().push((w.start, w.end, w.slot, w.first_slot, w.parts));
        }
        assert_eq!(by_request.len(), kv_lens.len(), "every request has an item");
        for (r, parts) in by_request {
            let len = kv_lens[r as usize];
            let lo = if window_left < 0 { 0 } else { len.saturating_sub(window_left as usize + 1) };
            check_parts(parts, lo as u32, len as u32, split.slots);
        }
    }

    let mut qo_indptr = vec![0u32];
    for (&(_, qo), &kv) in input.lens.iter().zip(&kv_lens) {
        let qo = if input.unchecked_qo { qo as usize } else { qo as usize % (kv + 1) };
        qo_indptr.push(qo_indptr[qo_indptr.len() - 1] + qo as u32);
    }
    check_mla(&input, &kv_lens, &qo_indptr, &table, num_pages, sms, per_sm);
    let prefill = PrefillOptions { causal: input.causal, window_left, ..Default::default() };
    // The planner's own choice of kernel (on Hopper or not), or every kernel there is.
    let splits: Vec<_> = if input.every_block_height {
        prefill_block_rows(shape.head_dim)
            .into_iter()
            .map(|block_rows| PrefillKernel::Portable { block_rows })
            .chain([PrefillKernel::Hopper])
            .map(|kernel| prefill_split(&shape, heads, &qo_indptr, &table, prefill, kernel, sms, per_sm))
            .collect()
    } else {
        [HopperPrefill::Never, HopperPrefill::LongQueries, HopperPrefill::Always]
            .map(|hopper| plan_prefill_split(&shape, heads, &qo_indptr, &table, prefill, hopper, sms, |_| per_sm))
            .into()
    };
    for split in splits.into_iter().flatten() {
        if split.kernel == PrefillKernel::Hopper {
            check_schedule(&split.work, shape.num_kv_heads, sms * per_sm);
        }
        let tile_rows = split.kernel.block_rows();
        let group = split.group_size;
        let mut tiles: BTreeMap<(u32, u32), Vec<_>> = BTreeMap::new();
        for w in &split.work {
            let r = (0..kv_lens.len())
                .find(|&r| qo_indptr[r] == w.q_start && qo_indptr[r + 1] - qo_indptr[r] == w.qo_len && w.qo_len > 0)
                .expect("an item of a request with queries");
            // Positioned (causal or windowed) queries must be among the keys; others need not.
            let positioned = input.causal || window_left >= 0;
            assert!(w.kv_len as usize == kv_lens[r] && w.pages == table.kv_indptr[r]);
            assert!(!positioned || w.qo_len as usize <= kv_lens[r], "positioned queries outnumber the keys");
            assert!(w.first_row % tile_rows == 0 && (w.first_row as usize) < w.qo_len as usize * group);
            assert!(w.kv_start <= w.kv_end && w.kv_end <= w.kv_len);
            assert!((w.q_start + w.qo_len) as usize <= split.total_q);
            if w.parts > 1 {
                assert!((w.counters as usize + shape.num_kv_heads) <= split.split_tiles * shape.num_kv_heads);
            }
            tiles.entry((r as u32, w.first_row)).or_default().push((
                w.kv_start,
                w.kv_end,
                w.slot,
                w.first_slot,
                w.parts,
            ));
        }
        for ((r, first_row), parts) in tiles {
            let r = r as usize;
            let (kv_len, qo_len) = (kv_lens[r], (qo_indptr[r + 1] - qo_indptr[r]) as usize);
            let rows = qo_len * group;
            let (first, last) =
                (first_row as usize / group, ((first_row as usize + tile_rows as usize).min(rows) - 1) / group);
            let (lo, hi) = (parts.iter().map(|p| p.0).min().unwrap(), parts.iter().map(|p| p.1).max().unwrap());
            check_parts(parts, lo, hi, split.slots);
            // Every key a row of the tile may see lies in lo..hi.
            for token in [first, last] {
                let pos = (kv_len + token).saturating_sub(qo_len);
                let see_hi = if input.causal { pos + 1 } else { kv_len };
                let see_lo = if window_left < 0 { 0 } else { pos.saturating_sub(window_left as usize) };
                assert!(see_lo >= lo as usize && see_hi <= hi as usize, "keys {see_lo}..{see_hi} outside {lo}..{hi}");
            }
        }
    }
});

/// The Hopper kernel's persistent schedule, which the kernel indexes unchecked: block `b`'s
/// entries lie inside the array, past the offsets, and together name every unit once; at most
/// `ctas` blocks unless an item is split, and then a block a unit.
fn check_schedule(work: &[PrefillWorkItem], num_kv_heads: usize, ctas: usize) {
    let units = work.len() * num_kv_heads;
    let (schedule, blocks) = persistent_schedule(work, num_kv_heads, 128, units % 2 == 0, ctas);
    let split = work.iter().any(|w| w.parts > 1);
    assert!(if split { blocks == units } else { blocks == ctas.max(1).min(units) });
    assert_eq!(schedule.len(), blocks + 1 + units);
    assert_eq!(schedule[0] as usize, blocks + 1);
    assert!(schedule[..=blocks].windows(2).all(|w| w[0] <= w[1]) && schedule[blocks] as usize == schedule.len());
    let mut seen = vec![false; units];
    for b in 0..blocks {
        let list = &schedule[schedule[b] as usize..schedule[b + 1] as usize];
        assert!(!list.is_empty() && (!split || list.len() == 1), "block {b}: {list:?}");
        for &u in list {
            assert!(!std::mem::replace(&mut seen[u as usize], true), "unit {u} twice");
        }
    }
    assert!(seen.iter().all(|&s| s));
}

/// MLA's split: its work items (one KV head, a group of all the heads, 64-row tiles) as
/// prefill's, each split tile's parts at most `MLA_MAX_PARTS` with one merge entry naming them.
fn check_mla(
    input: &Input,
    kv_lens: &[usize],
    qo_indptr: &[u32],
    table: &PageTable,
    num_pages: usize,
    sms: usize,
    per_sm: usize,
) {
    let shape = MlaCacheShape { num_pages, page_size: input.page_size as usize };
    let heads = input.group as usize % 130;
    let options = MlaOptions { sm_scale: 0.1, causal: input.causal, kv_dtype: None };
    let Ok(split) = mla_split(&shape, heads, qo_indptr, table, options, sms, per_sm) else { return };
    let mut tiles: BTreeMap<(u32, u32), Vec<_>> = BTreeMap::new();
    for w in &split.work {
        let r = (0..kv_lens.len())
            .find(|&r| qo_indptr[r] == w.q_start && qo_indptr[r + 1] - qo_indptr[r] == w.qo_len && w.qo_len > 0)
            .expect("an item of a request with queries");
        assert!(w.kv_len as usize == kv_lens[r] && w.pages == table.kv_indptr[r]);
        assert!(!input.causal || w.qo_len <= w.kv_len, "causal queries outnumber the keys");
        assert!(w.first_row % 64 == 0 && (w.first_row as usize) < w.qo_len as usize * heads);
        assert!(w.kv_start <= w.kv_end && w.kv_end <= w.kv_len && w.parts <= 256);
        assert!((w.q_start + w.qo_len) as usize <= split.total_q);
        tiles.entry((r as u32, w.first_row)).or_default().push((w.kv_start, w.kv_end, w.slot, w.first_slot, w.parts));
    }
    let split_tiles = tiles.values().filter(|parts| parts[0].4 > 1).count();
    assert_eq!(split.merge_tiles.len(), split_tiles, "one merge entry a split tile");
    for m in &split.merge_tiles {
        let parts = tiles.values().find(|p| p.iter().any(|x| x.3 == m.first_slot && x.4 > 1)).expect("its tile");
        assert_eq!((parts.len() as u32, m.slot), (m.parts, m.first_slot));
    }
    for ((r, _), parts) in tiles {
        let kv_len = kv_lens[r as usize] as u32;
        let (lo, hi) = (parts.iter().map(|p| p.0).min().unwrap(), parts.iter().map(|p| p.1).max().unwrap());
        assert!(lo == 0 && (input.causal || hi == kv_len));
        check_parts(parts, lo, hi, split.slots);
    }
}
