//! Names that arrive over HTTP, turned into paths that stay inside one folder.

use std::path::{Component, Path, PathBuf};

/// Whether `name` (a file name or a `/`-separated subfolder) is safe to join under a folder:
/// no NUL, no backslash, no separators that survived one round of URL decoding (`%2F`,
/// `%5C`, which would mean the client encoded them twice), no absolute path, and no `.`/`..`
/// components.
fn is_plain_relative(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if name.contains('\0')
        || name.contains('\\')
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00")
        || name.starts_with('/')
    {
        return false;
    }
    Path::new(name)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
}

/// `base/subfolder/filename`, or `None` when either part could leave `base` by its spelling.
/// `filename` must be a single component. The result may not exist yet; [`inside`] checks
/// where it really leads once it does.
pub fn join(base: &Path, subfolder: &str, filename: &str) -> Option<PathBuf> {
    if filename.is_empty() || filename.contains('/') || !is_plain_relative(filename) {
        return None;
    }
    if !subfolder.is_empty() && !is_plain_relative(subfolder) {
        return None;
    }
    Some(base.join(subfolder).join(filename))
}

/// `base/relative` for a `/`-separated path of one or more components, or `None` as for
/// [`join`].
pub fn join_relative(base: &Path, relative: &str) -> Option<PathBuf> {
    if relative.is_empty() || !is_plain_relative(relative) {
        return None;
    }
    Some(base.join(relative))
}

/// Whether the existing `path` resolves (symlinks followed) to somewhere inside `base`.
pub fn inside(base: &Path, path: &Path) -> bool {
    match (base.canonicalize(), path.canonicalize()) {
        (Ok(base), Ok(path)) => path.starts_with(base),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_spellings_are_refused() {
        let base = Path::new("/srv/out");
        for (sub, name) in [
            ("", "../x.gif"),
            ("..", "x.gif"),
            ("a/../..", "x.gif"),
            ("/etc", "passwd"),
            ("", "/etc/passwd"),
            ("", "a%2Fb"),
            ("a%5c..", "x"),
            ("", "a\\b"),
            ("", "x\0y"),
            ("", ""),
            ("", "a/b"),
        ] {
            assert_eq!(join(base, sub, name), None, "{sub:?} {name:?}");
        }
        assert_eq!(
            join(base, "clips/a", "x.gif"),
            Some(PathBuf::from("/srv/out/clips/a/x.gif"))
        );
        assert_eq!(join_relative(base, "workflows/../x"), None);
        assert_eq!(
            join_relative(base, "workflows/w.json"),
            Some(PathBuf::from("/srv/out/workflows/w.json"))
        );
    }
}
