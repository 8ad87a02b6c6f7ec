//! The crate's module graph keeps the shape DESIGN.md gives it: arrows only
//! point one way (no two modules use each other, directly or around a
//! loop), and they point up the layers: the core knows no backend and no
//! middleware, a backend knows no middleware, the middleware knows no
//! concrete backend.
//!
//! Read from the sources: every `crate::`, `super::` and `self::` path
//! outside comments and `#[cfg(test)]` modules is an arrow from the file
//! it is in to the file that defines the module it names. `src/lib.rs`,
//! the crate's facade, is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// A module path from the crate root, e.g. `["layer", "service"]`.
type Module = Vec<String>;

/// Every module of the crate that has a file, with that file's code.
fn modules() -> BTreeMap<Module, String> {
    let mut found = BTreeMap::new();
    collect(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut Vec::new(),
        &mut found,
    );
    found
}

fn collect(dir: &Path, prefix: &mut Module, found: &mut BTreeMap<Module, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .expect("src is readable")
        .flatten()
        .collect();
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            prefix.push(name);
            collect(&path, prefix, found);
            prefix.pop();
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let mut module = prefix.clone();
            if stem != "mod" && stem != "lib" {
                module.push(stem.to_owned());
            }
            let code = fs::read_to_string(&path).expect("a source file is readable");
            found.insert(module, code);
        }
    }
}

/// The code without comments, string literals and `#[cfg(test)]` modules.
fn code_only(source: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<usize> = None;
    let mut depth = 0usize;
    let mut pending_test = false;
    for line in source.lines() {
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]" {
            pending_test = true;
            continue;
        }
        if pending_test && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            skip_depth = Some(depth);
        }
        pending_test = false;
        for c in line.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if let Some(at) = skip_depth {
            if depth <= at {
                skip_depth = None;
            }
            continue;
        }
        // String literals may hold `::` (Lua, messages); drop them.
        let mut in_string = false;
        let mut escaped = false;
        for c in line.chars() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if c == '"' {
                in_string = true;
            } else {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The paths a file names: each as the words after `crate::`, `super::`
/// or `self::`, with `{a::b, c}` groups unfolded.
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let chars: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let starts_word = at == 0 || !(chars[at - 1].is_alphanumeric() || chars[at - 1] == '_');
        let root = ["crate", "super", "self"].into_iter().find(|root| {
            let end = at + root.len();
            end + 2 <= chars.len()
                && chars[at..end].iter().copied().eq(root.chars())
                && chars[end] == ':'
                && chars[end + 1] == ':'
        });
        match root {
            Some(root) if starts_word => {
                at += root.len() + 2;
                for path in group(&chars, &mut at) {
                    found.push((root.to_owned(), path));
                }
            }
            _ => at += 1,
        }
    }
    found
}

/// Reads `a::b::{c, d::e}` from `at`, unfolded into `[a, b, c]` and
/// `[a, b, d, e]`.
fn group(chars: &[char], at: &mut usize) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    loop {
        while *at < chars.len() && chars[*at].is_whitespace() {
            *at += 1;
        }
        if *at < chars.len() && chars[*at] == '{' {
            *at += 1;
            let mut all = Vec::new();
            loop {
                for tail in group(chars, at) {
                    let mut path = prefix.clone();
                    path.extend(tail);
                    all.push(path);
                }
                while *at < chars.len() && chars[*at].is_whitespace() {
                    *at += 1;
                }
                match chars.get(*at) {
                    Some(',') => *at += 1,
                    Some('}') => {
                        *at += 1;
                        return all;
                    }
                    _ => return all,
                }
            }
        }
        let start = *at;
        while *at < chars.len() && (chars[*at].is_alphanumeric() || chars[*at] == '_') {
            *at += 1;
        }
        if *at == start {
            return vec![prefix];
        }
        prefix.push(chars[start..*at].iter().collect());
        if chars.get(*at) == Some(&':') && chars.get(*at + 1) == Some(&':') {
            *at += 2;
        } else {
            return vec![prefix];
        }
    }
}

/// The module a path names from `from`: the longest prefix of its words
/// that is a module with a file.
fn target(
    from: &Module,
    root: &str,
    words: &[String],
    known: &BTreeMap<Module, String>,
) -> Option<Module> {
    let mut base = match root {
        "crate" => Vec::new(),
        "self" => from.clone(),
        _ => from[..from.len().checked_sub(1)?].to_vec(),
    };
    let mut best = base.clone();
    for word in words {
        base.push(word.clone());
        if known.contains_key(&base) {
            best = base.clone();
        } else {
            break;
        }
    }
    Some(best)
}

/// The arrows between files: who uses whom.
fn arrows() -> BTreeMap<Module, BTreeSet<Module>> {
    let known = modules();
    let mut arrows: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, source) in &known {
        if module.is_empty() {
            continue;
        }
        let used = arrows.entry(module.clone()).or_default();
        let code = code_only(source);
        // A parent names its children without a root: `child::item`.
        for (child, _) in known.range(module.clone()..) {
            if child.len() == module.len() + 1
                && child.starts_with(module)
                && names_child(&code, &child[module.len()])
            {
                used.insert(child.clone());
            }
        }
        for (root, words) in paths(&code) {
            if let Some(to) = target(module, &root, &words, &known)
                && !to.is_empty()
                && &to != module
            {
                used.insert(to);
            }
        }
    }
    arrows
}

/// Whether `code` names `child::something` other than as the tail of a
/// longer path (`a::child::x` is not the child).
fn names_child(code: &str, child: &str) -> bool {
    let pattern = format!("{child}::");
    code.match_indices(&pattern).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

fn show(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

/// The modules on a loop of arrows, one loop at a time.
fn loops(arrows: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    let mut loops = Vec::new();
    for start in arrows.keys() {
        // A path from `start` back to `start`, if any (breadth first, so the
        // shortest).
        let mut came_from: BTreeMap<Module, Module> = BTreeMap::new();
        let mut frontier = vec![start.clone()];
        let mut closed = None;
        while closed.is_none() && !frontier.is_empty() {
            let mut next = Vec::new();
            for module in frontier {
                for to in arrows.get(&module).into_iter().flatten() {
                    if to == start {
                        closed = Some(module.clone());
                        break;
                    }
                    if !came_from.contains_key(to) {
                        came_from.insert(to.clone(), module.clone());
                        next.push(to.clone());
                    }
                }
                if closed.is_some() {
                    break;
                }
            }
            frontier = next;
        }
        if let Some(mut last) = closed {
            let mut cycle = vec![start.clone()];
            let mut back = Vec::new();
            while &last != start {
                back.push(last.clone());
                last = came_from[&last].clone();
            }
            cycle.extend(back.into_iter().rev());
            let mut sorted = cycle.clone();
            sorted.sort();
            if !loops.iter().any(|known: &Vec<Module>| {
                let mut other = known.clone();
                other.sort();
                other == sorted
            }) {
                loops.push(cycle);
            }
        }
    }
    loops
}

#[test]
fn no_two_modules_use_each_other() {
    let arrows = arrows();
    let loops = loops(&arrows);
    let shown: Vec<String> = loops
        .iter()
        .map(|cycle| {
            let mut names: Vec<String> = cycle.iter().map(show).collect();
            names.push(show(&cycle[0]));
            names.join(" -> ")
        })
        .collect();
    assert!(shown.is_empty(), "import loops:\n{}", shown.join("\n"));
}

/// Which layer of DESIGN.md a module is in: 0 core, 1 backend, 2
/// middleware, 3 framework.
fn layer_of(module: &Module) -> usize {
    match module.first().map(String::as_str) {
        Some("memory" | "redis" | "any") => 1,
        Some("layer" | "idempotency") => 2,
        Some("axum") => 3,
        _ => 0,
    }
}

#[test]
fn arrows_point_up_the_layers_and_the_middleware_knows_no_backend() {
    let mut wrong = Vec::new();
    for (from, used) in arrows() {
        for to in used {
            let (a, b) = (layer_of(&from), layer_of(&to));
            // A layer uses those below it; the middleware and the
            // frameworks use only the core and each other's layer.
            let allowed = b == a || (b < a && !(a >= 2 && b == 1));
            if !allowed && from.first() != to.first() {
                wrong.push(format!("{} -> {}", show(&from), show(&to)));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows against DESIGN.md's layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reader_finds_the_paths_a_file_names() {
    // The parser itself, on the shapes the sources use.
    let code = code_only(
        "use super::{held::{A, B}, lease::C};\n\
         use crate::sync::DistMutex; // crate::layer in a comment\n\
         let s = \"crate::redis\";\n\
         fn f() -> crate::error::Error { self::child::g() }\n\
         #[cfg(test)]\nmod tests {\n    use crate::memory::X;\n}\n",
    );
    let found = paths(&code);
    let words = |root: &str, path: &[&str]| {
        (
            root.to_owned(),
            path.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        found,
        vec![
            words("super", &["held", "A"]),
            words("super", &["held", "B"]),
            words("super", &["lease", "C"]),
            words("crate", &["sync", "DistMutex"]),
            words("crate", &["error", "Error"]),
            words("self", &["child", "g"]),
        ]
    );
}
