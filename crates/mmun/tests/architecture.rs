//! The module graph of the workspace's library crates, file by file: no two
//! modules of a crate import each other, directly or around a circle (the
//! layering docs/ARCHITECTURE.md describes). An import is any `crate::`,
//! `super::` or `self::` path outside a crate's unit tests, resolved to the
//! longest module path that is a file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates checked, by directory under `crates/`.
const CRATES: [&str; 7] = [
    "mmu-notifier",
    "softmm",
    "mirrors",
    "regcache",
    "uffd",
    "mmfeed",
    "uring-registrar",
];

type Module = Vec<String>;

/// Every `.rs` file under `src`, by module path (`lib.rs` and `mod.rs` name
/// their directory's module).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut m: Module = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(m.last().map(String::as_str), Some("lib" | "main" | "mod")) {
                    m.pop();
                }
                out.insert(m, path);
            }
        }
    }
    out
}

/// The source without comments and without the unit tests at its end.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read a source file");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths that follow `crate::`, `super::` or `self::` in `code`, each
/// with its anchor; a `{ a, b::c }` group gives one path per item.
fn paths(code: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for anchor in ["crate", "super", "self"] {
        let pat = format!("{anchor}::");
        let mut from = 0;
        while let Some(i) = code[from..].find(&pat) {
            let start = from + i;
            from = start + pat.len();
            if code[..start].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let rest = &code[from..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level items only: `a::{B, C}` names module `a`.
                let mut depth = 0;
                let mut item = 0;
                for (i, c) in group.char_indices() {
                    let top_end = match c {
                        '{' => {
                            depth += 1;
                            false
                        }
                        '}' if depth == 0 => true,
                        '}' => {
                            depth -= 1;
                            false
                        }
                        ',' => depth == 0,
                        _ => false,
                    };
                    if top_end {
                        let p = path_of(group[item..i].trim());
                        if !p.is_empty() {
                            out.push((anchor, p));
                        }
                        item = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                }
            } else {
                out.push((anchor, path_of(rest)));
            }
        }
    }
    out
}

/// The leading `a::b::c` of `s`.
fn path_of(s: &str) -> Vec<String> {
    let end = s
        .find(|c: char| !(is_ident(c) || c == ':'))
        .unwrap_or(s.len());
    s[..end]
        .split("::")
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Module-to-module imports of one crate.
fn imports(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = modules(src);
    let mut edges = BTreeMap::new();
    for (m, path) in &files {
        let mut to = BTreeSet::new();
        for (anchor, p) in paths(&code(path)) {
            let mut full: Module = match anchor {
                "crate" => Vec::new(),
                "self" => m.clone(),
                _ => m[..m.len().saturating_sub(1)].to_vec(),
            };
            full.extend(p);
            let target = (1..=full.len())
                .rev()
                .map(|n| full[..n].to_vec())
                .find(|prefix| files.contains_key(prefix));
            // An ancestor (a `mod.rs` or the crate root) is where the module
            // is declared, not something it builds on.
            if let Some(t) = target.filter(|t| t != m && !m.starts_with(t)) {
                to.insert(t);
            }
        }
        edges.insert(m.clone(), to);
    }
    edges
}

/// A circle through `from`, if any (depth-first search back to it).
fn circle(edges: &BTreeMap<Module, BTreeSet<Module>>, from: &Module) -> Option<Vec<Module>> {
    fn walk(
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        goal: &Module,
        at: &Module,
        seen: &mut BTreeSet<Module>,
        path: &mut Vec<Module>,
    ) -> bool {
        for next in &edges[at] {
            if next == goal {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(edges, goal, next, seen, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.clone()];
    walk(edges, from, from, &mut BTreeSet::new(), &mut path).then_some(path)
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("/")
    }
}

#[test]
fn no_two_modules_of_a_crate_import_each_other() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    for krate in CRATES {
        let edges = imports(&crates.join(krate).join("src"));
        assert!(edges.len() > 1, "{krate}: no modules found");
        for m in edges.keys() {
            if let Some(c) = circle(&edges, m) {
                let names: Vec<_> = c.iter().map(name).collect();
                found.push(format!("{krate}: {} -> {}", names.join(" -> "), names[0]));
            }
        }
    }
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

/// The checker sees a circle where there is one.
#[test]
fn a_circle_of_two_modules_is_found() {
    let dir = std::env::temp_dir().join(format!("mmun-architecture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(dir.join("a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
    // The import of `a` comes after a nested group.
    std::fs::write(
        dir.join("b.rs"),
        "use crate::{c::{C, D}, a::A};\npub struct B;\n",
    )
    .unwrap();
    std::fs::write(dir.join("c.rs"), "pub struct C;\npub struct D;\n").unwrap();
    let edges = imports(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let a = vec!["a".to_string()];
    assert_eq!(circle(&edges, &a).map(|c| c.len()), Some(2));
    assert!(circle(&edges, &Vec::new()).is_none());
}
