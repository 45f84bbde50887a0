//! The plugin's layering, checked on its source: `node` → `video`/`sampling`/`train` → `models`
//! → candle, with `plugin` (the root module the host calls) above everything.
//!
//! Every `crate::…` path and every `super::` chain that climbs to the crate root is resolved to
//! the top-level module it names; an import that the rules table forbids fails the test with
//! the file and line. The table names every top-level module of `nodes/src`, so a new module
//! fails the test until its place in the layering is written down.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// For each top-level module of the plugin, the top-level modules it must never import.
/// A module may list modules that do not exist yet (`train`), so that the rule holds from the
/// day they appear.
const FORBIDDEN_IMPORTS: &[(&str, &[&str])] = &[
    // The root module the host calls: sits above everything and may use anything.
    ("plugin", &[]),
    // Node wrappers: everything below them, never the root module.
    ("node", &["plugin"]),
    // Methods over the models: never the nodes that wrap them.
    ("video", &["node", "plugin"]),
    ("sampling", &["video", "node", "plugin"]),
    ("schedulers", &["video", "node", "plugin"]),
    ("train", &["node", "plugin"]),
    // The layers themselves: nothing above them.
    ("models", &["sampling", "video", "node", "plugin", "train"]),
    // Measures for the unit tests, usable by every module's tests: standalone.
    (
        "test_util",
        &[
            "models",
            "sampling",
            "schedulers",
            "video",
            "node",
            "plugin",
            "train",
        ],
    ),
    // Process-wide heap policy, standalone.
    (
        "allocator",
        &[
            "models",
            "sampling",
            "schedulers",
            "video",
            "node",
            "plugin",
            "train",
        ],
    ),
];

/// Why a module sits where it does, printed with its violations.
fn rule_for(module: &str) -> &'static str {
    match module {
        "models" => "models imports nothing above it (no sampling, video, node, plugin, train)",
        "sampling" | "schedulers" => "sampling and schedulers never import video or node",
        "video" => "video never imports node",
        "train" => "train never imports node",
        "allocator" | "test_util" => "standalone: imports no other module of the plugin",
        _ => "nothing imports plugin, the root module the host calls",
    }
}

/// One reference from a source file to a top-level module of the crate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CrateReference {
    line: usize,
    target: String,
    /// The path as written, for the report (`crate::video::freeinit`, `super::super::node`).
    written: String,
}

#[test]
fn every_import_follows_the_layering() {
    let source_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = rust_files(&source_root);
    assert!(
        !files.is_empty(),
        "no .rs files under {}",
        source_root.display()
    );

    let mut unclassified = BTreeSet::new();
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&source_root).expect("file under src/");
        let module_path = module_path(relative);
        let Some(top) = module_path.first() else {
            continue; // lib.rs: the crate root declares the modules and imports none of them.
        };
        let Some((_, forbidden)) = FORBIDDEN_IMPORTS.iter().find(|(name, _)| name == top) else {
            unclassified.insert(top.clone());
            continue;
        };
        let text = fs::read_to_string(file)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", file.display()));
        for reference in crate_references(&text, &module_path) {
            if forbidden.contains(&reference.target.as_str()) {
                let source_line = text.lines().nth(reference.line - 1).unwrap_or_default();
                violations.push(format!(
                    "nodes/src/{}:{}: `{}` imports {} ({}): {}",
                    relative.display(),
                    reference.line,
                    reference.written,
                    reference.target,
                    rule_for(top),
                    source_line.trim(),
                ));
            }
        }
    }
    assert!(
        unclassified.is_empty(),
        "top-level modules missing from FORBIDDEN_IMPORTS in {}: {unclassified:?}; add each \
         with the modules it must not import",
        file!()
    );
    assert!(
        violations.is_empty(),
        "{} import(s) break the layering:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn the_scan_sees_the_real_imports() {
    // Guards against a scanner that silently finds nothing: the nodes wrap the models.
    let source_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let targets: BTreeSet<String> = rust_files(&source_root.join("node"))
        .iter()
        .flat_map(|file| {
            let relative = file.strip_prefix(&source_root).expect("file under src/");
            let text = fs::read_to_string(file).expect("readable source");
            crate_references(&text, &module_path(relative))
        })
        .map(|reference| reference.target)
        .collect();
    assert!(targets.contains("models"), "{targets:?}");
}

#[test]
fn crate_paths_grouped_imports_and_super_escapes_are_resolved() {
    let source = r#"//! use crate::node::Ignored; in a doc comment
use crate::models::unet::UNet;
use crate::{
    schedulers::Ddim,
    video::{noise, io::load_video},
};
/* crate::plugin in a block comment */
fn f() -> &'static str {
    let quote = '"';
    let _ = crate::node::registry();
    "crate::plugin in a string"
}
mod tests {
    use super::*;
    use super::super::video::freeinit;
    use super::super::super::node::Context;
}
"#;
    let found: Vec<(usize, String)> = crate_references(source, &["sampling".into(), "x".into()])
        .into_iter()
        .map(|r| (r.line, r.target))
        .collect();
    let expected: Vec<(usize, String)> = [
        (2, "models"),
        (4, "schedulers"),
        (5, "video"),
        (10, "node"),
        // `tests` inside sampling::x: two levels up is `sampling`, three is the crate root.
        (16, "node"),
    ]
    .into_iter()
    .map(|(line, target)| (line, target.to_string()))
    .collect();
    assert_eq!(found, expected);
}

#[test]
fn module_paths_follow_the_file_layout() {
    assert_eq!(module_path(Path::new("lib.rs")), Vec::<String>::new());
    assert_eq!(module_path(Path::new("plugin.rs")), ["plugin"]);
    assert_eq!(module_path(Path::new("video/mod.rs")), ["video"]);
    assert_eq!(
        module_path(Path::new("video/io/save.rs")),
        ["video", "io", "save"]
    );
}

/// Every `.rs` file under `dir`, in a stable order.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = fs::read_dir(&folder)
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", folder.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|err| panic!("cannot list {}: {err}", folder.display()))
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The module a file under `src/` defines: `video/io/save.rs` → [video, io, save]; `mod.rs`
/// and `lib.rs` define their folder's module.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.strip_suffix(".rs").unwrap_or(&last);
        if !(stem == "mod" || (parts.is_empty() && stem == "lib")) {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// The top-level modules that `source` (the text of the file defining `module_path`) refers
/// to through `crate::` or through `super::` chains that climb to the crate root, outside
/// comments and string literals.
fn crate_references(source: &str, module_path: &[String]) -> Vec<CrateReference> {
    let code = blank_comments_and_literals(source);
    let chars: Vec<char> = code.chars().collect();
    let mut references = Vec::new();
    // Inline `mod name {` blocks deepen the module path; each entry is the brace depth at
    // which its block closes.
    let mut inline_modules: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut i = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => line += 1,
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if inline_modules.last() == Some(&depth) {
                    inline_modules.pop();
                }
            }
            _ => {}
        }
        if !is_word_start(&chars, i) {
            i += 1;
            continue;
        }
        let word = read_word(&chars, i);
        let after = i + word.chars().count();
        match word.as_str() {
            "mod" => {
                let name_start = skip_spaces(&chars, after);
                let name = read_word(&chars, name_start);
                let brace = skip_spaces(&chars, name_start + name.chars().count());
                if !name.is_empty() && chars.get(brace) == Some(&'{') {
                    inline_modules.push(depth);
                }
            }
            "crate" if starts_with(&chars, after, "::") => {
                for (position, target) in path_heads(&chars, after + 2) {
                    references.push(CrateReference {
                        line: line + newlines(&chars[i..position]),
                        written: format!("crate::{target}"),
                        target,
                    });
                }
            }
            "super" if starts_with(&chars, after, "::") => {
                let mut levels = 1;
                let mut next = after + 2;
                while read_word(&chars, next) == "super" && starts_with(&chars, next + 5, "::") {
                    levels += 1;
                    next += 7;
                }
                let current_depth = module_path.len() + inline_modules.len();
                if levels == current_depth {
                    for (position, target) in path_heads(&chars, next) {
                        references.push(CrateReference {
                            line: line + newlines(&chars[i..position]),
                            written: format!("{}{target}", "super::".repeat(levels)),
                            target,
                        });
                    }
                }
                i = next;
                continue;
            }
            _ => {}
        }
        i = after;
    }
    references
}

/// The first segments, with their positions, of the paths that start at `start`: one name,
/// or each name of a `{a::…, b, …}` group (`*` and `self` name no module and are skipped).
fn path_heads(chars: &[char], start: usize) -> Vec<(usize, String)> {
    let start = skip_spaces(chars, start);
    if chars.get(start) != Some(&'{') {
        let word = read_word(chars, start);
        return if word.is_empty() || word == "self" {
            Vec::new()
        } else {
            vec![(start, word)]
        };
    }
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut expecting_head = true;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '{' => {
                depth += 1;
                expecting_head = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expecting_head = true,
            c if expecting_head && is_ident_char(c) => {
                let word = read_word(chars, i);
                if word != "self" {
                    heads.push((i, word.clone()));
                }
                expecting_head = false;
                i += word.chars().count();
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    heads
}

/// `source` with comments, string literals and char literals replaced by spaces (newlines
/// kept), so that paths mentioned in prose are not taken for imports and lines still count.
fn blank_comments_and_literals(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut nesting = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    nesting += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    nesting -= 1;
                    out.push_str("  ");
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && starts_raw_string_prefix(&chars, i)
            && raw_string_hashes(&chars, i + 1).is_some()
        {
            let hashes = raw_string_hashes(&chars, i + 1).unwrap_or(0);
            let closing = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            let end = (body..chars.len())
                .find(|&k| starts_with(&chars, k, &closing))
                .map_or(chars.len(), |k| k + closing.chars().count());
            for &skipped in &chars[i..end] {
                blank(&mut out, skipped);
            }
            i = end;
        } else if c == '"' {
            blank(&mut out, c);
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            if i < chars.len() {
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '\'' && char_literal_len(&chars, i) > 0 {
            let len = char_literal_len(&chars, i);
            for &skipped in &chars[i..i + len] {
                blank(&mut out, skipped);
            }
            i += len;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether the `r` at `i` begins a raw string's prefix (`r"`, `br"`), rather than ending an
/// identifier.
fn starts_raw_string_prefix(chars: &[char], i: usize) -> bool {
    let word_start = |k: usize| k == 0 || !is_ident_char(chars[k - 1]);
    word_start(i) || (i > 0 && chars[i - 1] == 'b' && word_start(i - 1))
}

/// The number of `#` of a raw string whose `#`s (if any) and opening quote start at `start`.
fn raw_string_hashes(chars: &[char], start: usize) -> Option<usize> {
    let hashes = chars[start..].iter().take_while(|&&c| c == '#').count();
    (chars.get(start + hashes) == Some(&'"')).then_some(hashes)
}

/// The length of the char literal starting at `start` (`'x'`, `'\n'`, `'\u{1F600}'`), or 0
/// where the quote starts a lifetime or label.
fn char_literal_len(chars: &[char], start: usize) -> usize {
    match chars.get(start + 1) {
        Some('\\') => (start + 2..chars.len())
            .take(12)
            .find(|&k| chars[k] == '\'')
            .map_or(0, |k| k + 1 - start),
        Some(_) if chars.get(start + 2) == Some(&'\'') => 3,
        _ => 0,
    }
}

fn newlines(chars: &[char]) -> usize {
    chars.iter().filter(|&&c| c == '\n').count()
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether a word starts at `i` (not in the middle of a longer identifier).
fn is_word_start(chars: &[char], i: usize) -> bool {
    is_ident_char(chars[i]) && (i == 0 || !is_ident_char(chars[i - 1]))
}

fn read_word(chars: &[char], start: usize) -> String {
    chars
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take_while(|&&c| is_ident_char(c))
        .collect()
}

fn skip_spaces(chars: &[char], start: usize) -> usize {
    (start..chars.len())
        .find(|&k| !chars[k].is_whitespace())
        .unwrap_or(chars.len())
}

fn starts_with(chars: &[char], start: usize, text: &str) -> bool {
    (start..)
        .zip(text.chars())
        .all(|(k, expected)| chars.get(k) == Some(&expected))
}
