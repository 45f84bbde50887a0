//! Output file names: the folder and name a `filename_prefix` gives, and the next free counter.

use std::fs;
use std::path::{Component, Path, PathBuf};

use super::{io_error, MediaError};

/// The longest file or folder name a prefix may give, in bytes: the temporary file adds a dot,
/// the process id and a counter, the output file a counter and an extension, within the 255
/// bytes that common filesystems allow.
pub const MAX_NAME_BYTES: usize = 200;

/// Splits `filename_prefix` into the folder under `output_dir` it names and the file name
/// prefix, refusing prefixes that are absolute, empty, end in a separator, climb out of
/// `output_dir` with `..`, hold control characters or over-long names, or pass through a
/// symbolic link below `output_dir` (which could lead anywhere).
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
    if let Some(c) = filename_prefix.chars().find(|c| c.is_control()) {
        return Err(refuse(&format!(
            "contains the control character U+{:04X}",
            u32::from(c)
        )));
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
    if let Some(long) = parts.iter().find(|p| p.len() > MAX_NAME_BYTES) {
        return Err(refuse(&format!(
            "has a name of {} bytes (`{}…`); at most {MAX_NAME_BYTES} are allowed",
            long.len(),
            long.chars().take(16).collect::<String>()
        )));
    }
    let Some(name) = parts.pop() else {
        return Err(refuse("names no file"));
    };
    let mut folder = output_dir.to_path_buf();
    for part in parts {
        folder.push(part);
        let is_link = fs::symlink_metadata(&folder).is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            return Err(refuse(&format!(
                "goes through `{part}`, a symbolic link in the output folder; outputs are \
                 written only into real folders under it"
            )));
        }
    }
    Ok((folder, name.to_string()))
}

/// The name of the temporary file a save of `name` by this process writes first.
pub fn temporary_name(name: &str, sequence: u64) -> String {
    format!(".{name}.{}.{sequence}.tmp", std::process::id())
}

/// Removes the temporary files in `folder` that processes no longer running left behind (a
/// crash, a kill): their names carry the process id of the writer.
pub fn remove_stale_temporaries(folder: &Path) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(temporary_writer) else {
            continue;
        };
        if pid != std::process::id() && !process_is_running(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The process id in a temporary file name `.{name}.{pid}.{sequence}.tmp`.
fn temporary_writer(file_name: &str) -> Option<u32> {
    let inner = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut fields = inner.rsplitn(3, '.');
    let sequence = fields.next()?;
    let pid = fields.next()?;
    fields.next()?;
    sequence.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether process `pid` exists. Where that cannot be told, every process counts as running,
/// so nothing is removed.
fn process_is_running(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
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
    fn temporaries_of_dead_writers_are_removed_and_others_kept() {
        let dir = TempDir::new("stale");
        // No process has id 4294967295 on Linux (ids stop at 2^22).
        let stale = ".clip.4294967295.3.tmp";
        let own = temporary_name("clip", 7);
        for name in [
            stale,
            own.as_str(),
            ".notes.txt",
            "clip_00001_.gif",
            ".x.12.tmp",
        ] {
            fs::write(dir.0.join(name), b"").unwrap();
        }
        remove_stale_temporaries(&dir.0);
        let mut expected = vec![own.as_str(), ".notes.txt", ".x.12.tmp", "clip_00001_.gif"];
        if !cfg!(target_os = "linux") {
            expected.push(stale);
        }
        expected.sort();
        assert_eq!(names_in(&dir.0), expected);
        assert_eq!(temporary_writer(stale), Some(u32::MAX));
        assert_eq!(temporary_writer(".a.b.12.3.tmp"), Some(12));
    }

    #[test]
    fn control_characters_long_names_and_links_in_prefixes_are_refused() {
        let dir = TempDir::new("prefix-rules");
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        for (prefix, reason) in [
            ("a\nb", "U+000A"),
            ("nul\0", "U+0000"),
            ("tab/\tx", "U+0009"),
            (long.as_str(), "at most 200"),
        ] {
            let err = resolve_prefix(&dir.0, prefix).unwrap_err();
            assert!(
                matches!(err, MediaError::Prefix { .. }),
                "{prefix:?}: {err}"
            );
            assert!(err.to_string().contains(reason), "{prefix:?}: {err}");
        }
        #[cfg(unix)]
        {
            let elsewhere = TempDir::new("prefix-elsewhere");
            std::os::unix::fs::symlink(&elsewhere.0, dir.0.join("link")).unwrap();
            let err = resolve_prefix(&dir.0, "link/escaped").unwrap_err();
            assert!(err.to_string().contains("symbolic link"), "{err}");
            let clip = gradient_clip(1, 4, 4);
            assert!(save_video(&clip, &dir.0, "link/escaped", VideoFormat::Gif, 8.0, 0).is_err());
            assert!(names_in(&elsewhere.0).is_empty());
            // A link given as the output folder itself is the user's choice and is followed.
            let (folder, _) = resolve_prefix(&dir.0.join("link"), "inside").unwrap();
            assert_eq!(folder, dir.0.join("link"));
        }
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
