//! Page-table validation against a bounds model: any table `validate` accepts maps every position
//! below each sequence's length to a slot inside the pool, and any set of writes
//! `validate_disjoint_writes` accepts touches no slot twice. Nothing panics on any input.
#![no_main]
use std::collections::HashSet;

use arbitrary::Arbitrary;
use ferrinfer::PageTable;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    page_size: u8,
    num_pages: u8,
    kv_indptr: Vec<u8>,
    kv_indices: Vec<u8>,
    kv_last_page_len: Vec<u8>,
    write_starts: Vec<u16>,
}

fuzz_target!(|input: Input| {
    let table = PageTable {
        kv_indptr: input.kv_indptr.iter().map(|&x| x as u32).collect(),
        kv_indices: input.kv_indices.iter().map(|&x| x as u32).collect(),
        kv_last_page_len: input.kv_last_page_len.iter().map(|&x| x as u32).collect(),
    };
    let (page_size, num_pages) = (input.page_size as usize, input.num_pages as usize);
    if table.validate(page_size, num_pages).is_err() {
        return;
    }
    let kv_lens = table.kv_lens(page_size);
    for (seq, &kv_len) in kv_lens.iter().enumerate() {
        let pages = (table.kv_indptr[seq + 1] - table.kv_indptr[seq]) as usize;
        assert!(kv_len <= pages * page_size && (pages == 0 || kv_len > (pages - 1) * page_size));
        for pos in 0..kv_len {
            let (page, slot) = table.locate(seq, pos, page_size);
            assert!(page < num_pages && slot < page_size, "seq {seq} pos {pos} -> ({page}, {slot})");
        }
    }
    let starts: Vec<usize> = kv_lens
        .iter()
        .enumerate()
        .map(|(i, &len)| input.write_starts.get(i).map_or(0, |&s| s as usize % (len + 1)))
        .collect();
    if table.validate_disjoint_writes(page_size, &starts).is_ok() {
        let mut written = HashSet::new();
        for (seq, &len) in kv_lens.iter().enumerate() {
            for pos in starts[seq]..len {
                assert!(written.insert(table.locate(seq, pos, page_size)), "slot written twice");
            }
        }
    }
});
