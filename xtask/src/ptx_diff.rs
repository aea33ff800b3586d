//! A short line diff of two PTX texts, for `build-kernels --check` to report how the committed
//! PTX differs from a fresh build: counts, and the first differing lines in unified-diff form.
use std::collections::HashMap;

/// Most line edits the exact diff looks for; past this (a different compiler renumbers
/// registers throughout) the report counts lines as multisets instead.
const MAX_EDITS: usize = 1000;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Edit {
    Keep,
    Delete,
    Insert,
}

/// The shortest edit script from `a` to `b` (Myers' O(ND) algorithm), or `None` if it has more
/// than `max_edits` insertions and deletions.
fn myers(a: &[u32], b: &[u32], max_edits: usize) -> Option<Vec<Edit>> {
    let (n, m) = (a.len() as isize, b.len() as isize);
    let max = max_edits.min(a.len() + b.len()) as isize;
    let off = max + 1;
    let at = |k: isize| (k + off) as usize;
    // v[k]: the furthest x reached on diagonal k = x - y. Before step d, the diagonals it reads
    // (-d-1..=d+1) are kept for the backtrack: O(D²) memory, 8 MB at most.
    let mut v = vec![0isize; 2 * max as usize + 3];
    let mut trace = Vec::new();
    for d in 0..=max {
        trace.push(v[at(-d - 1)..=at(d + 1)].to_vec());
        for k in (-d..=d).step_by(2) {
            let mut x =
                if k == -d || (k != d && v[at(k - 1)] < v[at(k + 1)]) { v[at(k + 1)] } else { v[at(k - 1)] + 1 };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[at(k)] = x;
            if x >= n && y >= m {
                return Some(backtrack(&trace, n, m));
            }
        }
    }
    None
}

/// The edits along the path `myers` found; `trace[d]` holds diagonals -d-1..=d+1 before step d.
fn backtrack(trace: &[Vec<isize>], n: isize, m: isize) -> Vec<Edit> {
    let (mut x, mut y) = (n, m);
    let mut edits = Vec::new();
    for (d, v) in trace.iter().enumerate().rev() {
        let (d, k) = (d as isize, x - y);
        let at = |k: isize| (k + d + 1) as usize;
        let prev_k = if k == -d || (k != d && v[at(k - 1)] < v[at(k + 1)]) { k + 1 } else { k - 1 };
        let prev_x = v[at(prev_k)];
        let prev_y = prev_x - prev_k;
        while x > prev_x && y > prev_y {
            edits.push(Edit::Keep);
            x -= 1;
            y -= 1;
        }
        if d > 0 {
            edits.push(if x == prev_x { Edit::Insert } else { Edit::Delete });
        }
        (x, y) = (prev_x, prev_y);
    }
    edits.reverse();
    edits
}

/// A hunk's start as `diff` writes it: its first line, or for an empty side the line before it.
fn hunk_start(lines: &[(usize, String)], index: usize, len: usize) -> usize {
    match (len, index) {
        (0, 0) => 0,
        (0, _) => lines[index - 1].0,
        _ => lines[index].0,
    }
}

/// Each line as a number, equal lines equal numbers (faster to compare than text).
fn intern<'a>(ids: &mut HashMap<&'a str, u32>, lines: &'a [(usize, String)]) -> Vec<u32> {
    lines
        .iter()
        .map(|(_, l)| {
            let next = ids.len() as u32;
            *ids.entry(l.as_str()).or_insert(next)
        })
        .collect()
}

/// How `new` differs from `old`, ignoring lines that start with `ignore` (the toolchain header
/// line); `None` when they are otherwise equal. Shows at most `shown` changed lines.
pub fn report(old: &str, new: &str, ignore: &str, shown: usize) -> Option<String> {
    let numbered = |text: &'_ str| -> Vec<(usize, String)> {
        text.lines().enumerate().filter(|(_, l)| !l.starts_with(ignore)).map(|(i, l)| (i + 1, l.to_string())).collect()
    };
    let (old, new) = (numbered(old), numbered(new));
    let prefix = old.iter().zip(&new).take_while(|(a, b)| a.1 == b.1).count();
    if prefix == old.len() && prefix == new.len() {
        return None;
    }
    let suffix = old[prefix..].iter().rev().zip(new[prefix..].iter().rev()).take_while(|(a, b)| a.1 == b.1).count();
    let (a, b) = (&old[prefix..old.len() - suffix], &new[prefix..new.len() - suffix]);
    // Where a region that is empty on one side sits: before the next line, or after the last.
    let line_at =
        |side: &[(usize, String)], i: usize| side.get(i).map_or_else(|| side.last().map_or(1, |l| l.0 + 1), |l| l.0);
    let mut ids = HashMap::new();
    let (ia, ib) = (intern(&mut ids, a), intern(&mut ids, b));
    let Some(edits) = myers(&ia, &ib, MAX_EDITS) else {
        // Too many edits to align: count the lines without a counterpart, show where it starts.
        let mut count: HashMap<u32, i64> = HashMap::new();
        ia.iter().for_each(|&l| *count.entry(l).or_default() += 1);
        ib.iter().for_each(|&l| *count.entry(l).or_default() -= 1);
        let only_old: i64 = count.values().filter(|&&c| c > 0).sum();
        let only_new: i64 = -count.values().filter(|&&c| c < 0).sum::<i64>();
        let mut out = format!(
            "over {MAX_EDITS} lines differ: {only_old} lines only in the committed PTX and {only_new} only in the \
             fresh build (counted as multisets; {} and {} lines in all); from the first difference on:\n\
             @@ -{} +{} @@",
            old.len(),
            new.len(),
            line_at(&old, prefix),
            line_at(&new, prefix)
        );
        for (sign, side) in [('-', a), ('+', b)] {
            side.iter().take(shown / 2).for_each(|(_, l)| out += &format!("\n{sign}{l}"));
        }
        return Some(out);
    };
    let deleted = edits.iter().filter(|&&e| e == Edit::Delete).count();
    let inserted = edits.iter().filter(|&&e| e == Edit::Insert).count();
    // Hunks without context lines, as `diff -U0` prints them, up to `shown` changed lines.
    let (mut i, mut j, mut printed, mut hunks) = (0, 0, 0, 0);
    let mut body = String::new();
    let mut e = 0;
    while e < edits.len() {
        if edits[e] == Edit::Keep {
            (i, j, e) = (i + 1, j + 1, e + 1);
            continue;
        }
        let (i0, j0) = (i, j);
        while e < edits.len() && edits[e] != Edit::Keep {
            if edits[e] == Edit::Delete {
                i += 1
            } else {
                j += 1
            }
            e += 1;
        }
        hunks += 1;
        if printed >= shown {
            continue;
        }
        let (da, db) = (hunk_start(&old, prefix + i0, i - i0), hunk_start(&new, prefix + j0, j - j0));
        body += &format!("\n@@ -{da},{} +{db},{} @@", i - i0, j - j0);
        for (sign, lines) in [('-', &a[i0..i]), ('+', &b[j0..j])] {
            for (_, l) in lines.iter().take(shown.saturating_sub(printed)) {
                body += &format!("\n{sign}{l}");
                printed += 1;
            }
        }
    }
    let shown_hunks = body.matches("\n@@ ").count();
    let more = if hunks > shown_hunks { format!(" ({} more not shown)", hunks - shown_hunks) } else { String::new() };
    Some(format!(
        "{deleted} lines removed, {inserted} added in {hunks} places{more} ({} and {} lines in all):{body}",
        old.len(),
        new.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TC: &str = "// toolchain:";

    fn ptx(toolchain: &str, body: &str) -> String {
        format!("// kernels\n// source-hash: abc\n// toolchain: {toolchain}\n{body}")
    }

    #[test]
    fn only_the_ignored_line_differing_is_no_difference() {
        let body = ".version 8.0\n.entry k(\n)\n";
        assert_eq!(report(&ptx("rustc 1.96", body), &ptx("rustc 1.97", body), TC, 5), None);
    }

    #[test]
    fn scattered_changes_are_separate_hunks_with_their_line_numbers() {
        let old = ptx("a", "l1\nl2\nmov r1\nl4\nl5\nl6\nl7\nadd r2\n");
        let new = ptx("b", "l1\nl2\nmov r3\nl4\nl5\nsub r4\nl6\nl7\n");
        let r = report(&old, &new, TC, 8).expect("they differ");
        assert_eq!(
            r,
            "2 lines removed, 2 added in 3 places (10 and 10 lines in all):\n\
             @@ -6,1 +6,1 @@\n-mov r1\n+mov r3\n\
             @@ -8,0 +9,1 @@\n+sub r4\n\
             @@ -11,1 +11,0 @@\n-add r2"
        );
    }

    #[test]
    fn the_shown_limit_cuts_the_listing_and_counts_the_rest() {
        let old = ptx("a", "x\ny\n");
        let new = ptx("b", "x\n1\n2\n3\ny\n4\n");
        let r = report(&old, &new, TC, 2).expect("they differ");
        assert_eq!(
            r,
            "0 lines removed, 4 added in 2 places (1 more not shown) (4 and 8 lines in all):\n@@ -4,0 +5,3 @@\n+1\n+2"
        );
    }

    #[test]
    fn edit_scripts_are_minimal_and_complete() {
        let (a, b) = ([1, 2, 3, 4, 5, 6], [1, 3, 4, 7, 5, 6, 8]);
        let edits = myers(&a, &b, 100).expect("within the limit");
        let count = |k| edits.iter().filter(|&&e| e == k).count();
        assert_eq!((count(Edit::Delete), count(Edit::Insert), count(Edit::Keep)), (1, 2, 5));
        assert_eq!(myers(&a, &b, 2), None);
        assert_eq!(myers(&[], &[], 0), Some(vec![]));
    }

    #[test]
    fn edit_scripts_turn_a_into_b_with_the_fewest_edits() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as u32
        };
        for _ in 0..300 {
            let (la, lb) = (next(25) as usize, next(25) as usize);
            let a: Vec<u32> = (0..la).map(|_| next(4)).collect();
            let b: Vec<u32> = (0..lb).map(|_| next(4)).collect();
            let edits = myers(&a, &b, 100).expect("within the limit");
            // Replaying the script on a gives b.
            let (mut i, mut out) = (0, Vec::new());
            for e in &edits {
                match e {
                    Edit::Keep => {
                        out.push(a[i]);
                        i += 1;
                    }
                    Edit::Delete => i += 1,
                    Edit::Insert => out.push(b[out.len()]),
                }
            }
            assert_eq!((i, &out), (la, &b), "{a:?} -> {b:?}: {edits:?}");
            // As few edits as the longest common subsequence allows.
            let mut lcs = vec![vec![0usize; lb + 1]; la + 1];
            for p in 1..=la {
                for q in 1..=lb {
                    lcs[p][q] =
                        if a[p - 1] == b[q - 1] { lcs[p - 1][q - 1] + 1 } else { lcs[p - 1][q].max(lcs[p][q - 1]) };
                }
            }
            let changes = edits.iter().filter(|&&e| e != Edit::Keep).count();
            assert_eq!(changes, la + lb - 2 * lcs[la][lb], "{a:?} -> {b:?}");
        }
    }

    #[test]
    fn past_the_edit_limit_lines_are_counted_as_multisets() {
        let old: String = (0..3000).map(|i| format!("mov %r{i}\n")).collect();
        let new: String = (0..3000).map(|i| format!("mov %r{}\n", i + 5000)).collect();
        let r = report(&ptx("a", &old), &ptx("b", &new), TC, 4).expect("they differ");
        let start = format!("over {MAX_EDITS} lines differ: 3000 lines only in the committed PTX and 3000 only");
        assert!(r.starts_with(&start), "{r}");
        assert!(r.ends_with("@@ -4 +4 @@\n-mov %r0\n-mov %r1\n+mov %r5000\n+mov %r5001"), "{r}");
    }
}
