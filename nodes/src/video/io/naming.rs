//! Output file names: the folder and name a `filename_prefix` gives, and the next free counter.

use std::fs;
use std::path::{Component, Path, PathBuf};

use super::{io_error, MediaError};

/// Splits `filename_prefix` into the folder under `output_dir` it names and the file name
/// prefix, refusing prefixes that are absolute, empty, end in a separator, or climb out of
/// `output_dir` with `..`.
pub fn resolve_prefix(
    output_dir: &Path,
    filename_prefix: &str,
) -> Result<(PathBuf, String), MediaError> {
    let refuse = |reason: &str| MediaError::Prefix {
        prefix: filename_prefix.to_string(),
        reason: reason.to_string(),
    };
    if filename_prefix.is_empty() {
        return Err(refuse("is empty"));
    }
    if filename_prefix.ends_with(['/', std::path::MAIN_SEPARATOR]) {
        return Err(refuse("must end with a file name, not a folder separator"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for component in Path::new(filename_prefix).components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| refuse("is not valid UTF-8"))?)
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(refuse("leaves the output folder"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("must be relative to the output folder"))
            }
        }
    }
    let Some(name) = parts.pop() else {
        return Err(refuse("names no file"));
    };
    let folder = parts
        .iter()
        .fold(output_dir.to_path_buf(), |dir, part| dir.join(part));
    Ok((folder, name.to_string()))
}

/// One past the highest counter among the files `{name}_{counter}…` in `folder` (1 when there
/// are none), as ComfyUI's `get_save_image_path` counts, across all extensions.
pub fn next_counter(folder: &Path, name: &str) -> Result<u64, MediaError> {
    let entries = match fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(1),
        Err(err) => return Err(io_error(folder)(err)),
    };
    let lead = format!("{name}_");
    let mut highest = 0;
    for entry in entries {
        let file_name = entry.map_err(io_error(folder))?.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&lead)) else {
            continue;
        };
        let digits = rest.split('_').next().unwrap_or_default();
        if let Ok(counter) = digits.parse::<u64>() {
            highest = highest.max(counter);
        }
    }
    Ok(highest + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::video::io::tests::{gradient_clip, names_in};
    use crate::video::io::{save_video, VideoFormat};
    use crate::video::TempDir;

    #[test]
    fn counter_increments_past_the_highest_existing_file() {
        let dir = TempDir::new("counter");
        let clip = gradient_clip(1, 4, 4);
        let first = save_video(&clip, &dir.0, "out/clip", VideoFormat::Png, 8.0, 0).unwrap();
        assert_eq!(first, dir.0.join("out").join("clip_00001_.png"));
        let second = save_video(&clip, &dir.0, "out/clip", VideoFormat::Gif, 8.0, 0).unwrap();
        assert_eq!(second.file_name().unwrap(), "clip_00002_.gif");
        fs::write(dir.0.join("out").join("clip_00041_.latent"), b"").unwrap();
        fs::write(dir.0.join("out").join("clipper_00099_.png"), b"").unwrap();
        let third = save_video(&clip, &dir.0, "out/clip", VideoFormat::Png, 8.0, 0).unwrap();
        assert_eq!(third.file_name().unwrap(), "clip_00042_.png");
        // No temporary files are left behind.
        assert!(names_in(&dir.0.join("out"))
            .iter()
            .all(|n| !n.starts_with('.')));
        let other = save_video(&clip, &dir.0, "./a/../other", VideoFormat::Png, 8.0, 0).unwrap();
        assert_eq!(other, dir.0.join("other_00001_.png"));
    }

    #[test]
    fn prefixes_outside_the_output_folder_are_refused() {
        let dir = TempDir::new("escape");
        let clip = gradient_clip(1, 4, 4);
        for prefix in ["../x", "a/../../x", "/tmp/x", "", "sub/"] {
            let err = save_video(&clip, &dir.0, prefix, VideoFormat::Png, 8.0, 0).unwrap_err();
            assert!(
                matches!(err, MediaError::Prefix { .. }),
                "{prefix:?}: {err}"
            );
        }
        assert!(names_in(&dir.0).is_empty());
        assert!(!dir.0.parent().unwrap().join("x_00001_.png").exists());
    }
}
