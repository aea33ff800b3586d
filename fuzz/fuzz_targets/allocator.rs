//! The sequence allocator under any sequence of operations: no panic, and after each one the
//! live sequences' page table validates against the pool, every page is free or held, a page's
//! reference count is the number of sequences holding it, copy-on-write copies go to fresh
//! private pages, and the cascade levels of any grouping of the live sequences are valid tables
//! whose shared and own pages make up each sequence exactly.
#![no_main]
use std::collections::HashMap;

use arbitrary::Arbitrary;
use ferrinfer::SequenceAllocator;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Create,
    Reserve { seq: u8, tokens: u8 },
    Fork { seq: u8 },
    Free { seq: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    num_pages: u8,
    page_size: u8,
    ops: Vec<Op>,
    /// Family sizes for the cascade check (the live sequences, in order).
    families: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let (num_pages, page_size) = (input.num_pages as usize, input.page_size as usize);
    let Ok(mut alloc) = SequenceAllocator::new(num_pages, page_size) else { return };
    let mut live = Vec::new();
    let pick = |live: &Vec<_>, i: u8| (!live.is_empty()).then(|| live[i as usize % live.len()]);
    for op in input.ops {
        match op {
            Op::Create => live.push(alloc.create()),
            Op::Reserve { seq, tokens } => {
                if let Some(id) = pick(&live, seq) {
                    let before = alloc.free_pages();
                    if let Ok(copies) = alloc.reserve(id, tokens as usize) {
                        for c in copies {
                            assert_ne!(c.src, c.dst);
                            assert_eq!(alloc.page_refcount(c.dst), 1, "a copy's destination is private");
                        }
                    } else {
                        assert_eq!(alloc.free_pages(), before, "a failed reserve changes nothing");
                    }
                }
            }
            Op::Fork { seq } => {
                if let Some(id) = pick(&live, seq) {
                    live.push(alloc.fork(id).expect("a live sequence forks"));
                }
            }
            Op::Free { seq } => {
                if let Some(id) = pick(&live, seq) {
                    alloc.free(id).expect("a live sequence frees");
                    live.retain(|&s| s != id);
                }
            }
        }
        let table = alloc.page_table(&live).expect("live sequences have a table");
        table.validate(page_size, num_pages).expect("the allocator's table is valid");
        let mut holders: HashMap<u32, u32> = HashMap::new();
        for seq in 0..live.len() {
            let pages = &table.kv_indices[table.kv_indptr[seq] as usize..table.kv_indptr[seq + 1] as usize];
            for &p in pages {
                *holders.entry(p).or_default() += 1;
            }
        }
        for (&page, &count) in &holders {
            assert_eq!(alloc.page_refcount(page), count, "page {page}");
        }
        assert_eq!(holders.len() + alloc.free_pages(), num_pages, "every page is free or held");
    }
    // Group the live sequences into families of the given sizes (the rest one each).
    let mut families: Vec<Vec<_>> = Vec::new();
    let mut rest = live.as_slice();
    for &size in &input.families {
        let n = (size as usize % 4 + 1).min(rest.len());
        if n == 0 {
            break;
        }
        families.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    families.extend(rest.iter().map(|&id| vec![id]));
    let levels = alloc.cascade_levels(&families).expect("live families have levels");
    levels.shared.validate(page_size, num_pages).expect("a valid shared level");
    levels.unique.validate(page_size, num_pages).expect("a valid own level");
    let pages = |t: &ferrinfer::PageTable, i: usize| {
        t.kv_indices[t.kv_indptr[i] as usize..t.kv_indptr[i + 1] as usize].to_vec()
    };
    let (shared_lens, own_lens) = (levels.shared.kv_lens(page_size), levels.unique.kv_lens(page_size));
    let mut request = 0;
    for (f, family) in families.iter().enumerate() {
        assert_eq!(levels.members[f + 1] - levels.members[f], family.len() as u32);
        assert_eq!(shared_lens[f] % page_size, 0, "the shared level holds full pages only");
        let whole = alloc.page_table(family).expect("a family's table");
        for (i, &id) in family.iter().enumerate() {
            assert_eq!([pages(&levels.shared, f), pages(&levels.unique, request)].concat(), pages(&whole, i));
            assert_eq!(shared_lens[f] + own_lens[request], alloc.len(id).expect("live"));
            request += 1;
        }
    }
});
