//! The layering rule, checked: each folder of the crate imports only from the layers below it
//! (`error` < `runtime` < `cache` < `plan` < `attention`, `ops` < `parallel`), so the import graph has no
//! circles and the runtime knows no algorithm.
use std::path::Path;

/// Each layer (a folder, or `error.rs`) and the crate-root modules it may import.
const RULES: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("runtime", &["error"]),
    ("cache", &["error", "runtime"]),
    ("plan", &["error", "runtime", "cache"]),
    ("attention", &["error", "runtime", "cache", "plan"]),
    ("ops", &["error", "runtime", "cache", "plan"]),
    ("parallel", &["error", "runtime", "cache", "plan", "attention", "ops"]),
];

/// The crate-root modules a source file names through `crate::` paths (`crate::a::b` and
/// `crate::{a::b, c}`), comments skipped.
fn crate_imports(source: &str) -> Vec<String> {
    let code: String = source.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // A brace group: the first segment of each comma-separated path at depth 1.
            let (mut depth, mut start) = (1, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => {
                        found.push(first_segment(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        found.push(first_segment(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(first_segment(rest));
        }
    }
    found.retain(|s| !s.is_empty());
    found
}

fn first_segment(path: &str) -> String {
    path.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading host/src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn each_layer_imports_only_from_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = 0;
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let layer = rel.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or("");
        let layer = layer.strip_suffix(".rs").unwrap_or(layer);
        let Some((_, allowed)) = RULES.iter().find(|(name, _)| *name == layer) else { continue };
        let source = std::fs::read_to_string(&file).expect("reading a source file");
        for import in crate_imports(&source) {
            assert!(
                import == layer || allowed.contains(&import.as_str()),
                "{} (layer `{layer}`) imports crate::{import}, which is not below it",
                rel.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} files checked: the layers moved?");
}

#[test]
fn the_import_scanner_reads_both_path_forms() {
    let source = "use crate::cache::layout::CacheShape;\n// use crate::ops::x;\nuse crate::{error::Error, runtime::{abi::X, device}};\nlet x = crate::plan::f();";
    assert_eq!(crate_imports(source), ["cache", "error", "runtime", "plan"]);
}
