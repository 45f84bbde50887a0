//! Prompt travel: a prompt per keyframe, interpolated into one text embedding per frame, as
//! AnimateDiff-Evolved's prompt scheduling reads and blends them.
//!
//! The schedule is a list of `index: prompt` entries, in JSON style (`"0": "a cat", "8": "a
//! dog"`) or Python style (`0 = "a cat", 8 = "a dog"`), optionally inside `{ }`. An index is a
//! frame number, a negative number counted from the end, a fraction of the clip in [0, 1]
//! written with a decimal point (`0.5`), or a range `a:b` (every frame from a to b − 1, each
//! a keyframe); a trailing `:` (`8:`) holds that prompt unchanged up to the next keyframe
//! instead of blending toward it.
//!
//! Frames before the first keyframe take its prompt, frames after the last one the last
//! prompt. Between keyframes a and b the embedding moves toward b's: frame a + k is the
//! previous frame's embedding blended toward b's with weight k/(b − a), as AnimateDiff-Evolved
//! computes it (so the blend reaches b's embedding at b, faster than a straight line).
//! Embeddings of prompts of different lengths (chunked long prompts) are padded with zeros on
//! both ends to the longest.

use std::str::FromStr;

use candle_core::{Result, Tensor};

/// How two embeddings are blended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blend {
    /// (1 − w)·a + w·b.
    #[default]
    Lerp,
    /// Spherical interpolation of the whole tensors (linear when nearly parallel).
    Slerp,
}

impl Blend {
    pub const NAMES: [&'static str; 2] = ["lerp", "slerp"];
}

impl FromStr for Blend {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "lerp" => Ok(Self::Lerp),
            "slerp" => Ok(Self::Slerp),
            other => Err(format!(
                "unknown interpolation `{other}` (expected lerp or slerp)"
            )),
        }
    }
}

/// One keyframe of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyframe {
    pub frame: usize,
    pub prompt: String,
    /// Keep this prompt until the next keyframe rather than blend toward it.
    pub hold: bool,
}

/// The keyframes of `text` for a clip of `frames` frames, in frame order; errors say where
/// the text could not be read.
pub fn parse_schedule(text: &str, frames: usize) -> std::result::Result<Vec<Keyframe>, String> {
    let mut text = text.trim();
    if text.starts_with('{') && text.ends_with('}') && text.len() >= 2 {
        text = text[1..text.len() - 1].trim();
    }
    if text.is_empty() {
        return Err("the prompt schedule is empty".into());
    }
    let chars: Vec<char> = text.chars().collect();
    let mut at = 0;
    let mut keyframes = Vec::new();
    let skip_space = |at: &mut usize| {
        while *at < chars.len() && chars[*at].is_whitespace() {
            *at += 1;
        }
    };
    let entry_error = |at: usize| {
        let rest: String = chars[at..].iter().take(40).collect();
        format!(
            "cannot read the prompt schedule at character {at} (`{rest}`): expected entries \
             like \"0\": \"a prompt\", or 0 = \"a prompt\", separated by commas"
        )
    };
    while at < chars.len() {
        skip_space(&mut at);
        let quoted_key = chars[at] == '"';
        if quoted_key {
            at += 1;
        }
        let key_start = at;
        while at < chars.len() && (chars[at].is_ascii_digit() || ":-.".contains(chars[at])) {
            at += 1;
        }
        let key: String = chars[key_start..at].iter().collect();
        if key.is_empty() {
            return Err(entry_error(key_start));
        }
        skip_space(&mut at);
        if quoted_key {
            if chars.get(at) != Some(&'"') {
                return Err(entry_error(at));
            }
            at += 1;
            skip_space(&mut at);
        }
        match chars.get(at) {
            Some(':') if quoted_key => at += 1,
            Some('=') if !quoted_key => at += 1,
            _ => return Err(entry_error(at)),
        }
        skip_space(&mut at);
        if chars.get(at) != Some(&'"') {
            return Err(entry_error(at));
        }
        let prompt_start = at + 1;
        let Some(length) = chars[prompt_start..].iter().position(|&c| c == '"') else {
            return Err(format!(
                "the prompt starting at character {prompt_start} has no closing quote"
            ));
        };
        let prompt: String = chars[prompt_start..prompt_start + length].iter().collect();
        at = prompt_start + length + 1;
        skip_space(&mut at);
        if chars.get(at) == Some(&',') {
            at += 1;
        } else if at < chars.len() {
            return Err(entry_error(at));
        }
        for (frame, hold) in key_frames(&key, frames)? {
            keyframes.push(Keyframe {
                frame,
                prompt: prompt.clone(),
                hold,
            });
        }
        skip_space(&mut at);
    }
    keyframes.sort_by_key(|k| k.frame);
    Ok(keyframes)
}

/// The frames an index expression names, each with whether it holds.
fn key_frames(key: &str, frames: usize) -> std::result::Result<Vec<(usize, bool)>, String> {
    if key.starts_with(':') {
        return Err(format!("index `{key}` cannot begin with ':'"));
    }
    if key.matches(':').count() > 1 {
        return Err(format!("index `{key}` has more than one ':'"));
    }
    let (key, hold) = match key.strip_suffix(':') {
        Some(rest) => (rest, true),
        None => (key, false),
    };
    match key.split_once(':') {
        Some((start, end)) => {
            let start = index(start, frames, true)?;
            let end = if end.is_empty() {
                frames
            } else {
                index(end, frames, true)?
            };
            let (start, end) = (start.min(end), start.max(end));
            if start == end {
                return Ok(vec![(start, hold)]);
            }
            Ok((start..end).map(|f| (f, hold)).collect())
        }
        None => Ok(vec![(index(key, frames, false)?, hold)]),
    }
}

/// One index: an integer (negative counts from the end) or a fraction of the clip.
fn index(text: &str, frames: usize, in_range: bool) -> std::result::Result<usize, String> {
    let value: i64 = if text.contains('.') {
        let fraction: f64 = text
            .parse()
            .map_err(|_| format!("index `{text}` is not a number"))?;
        if !(0.0..=1.0).contains(&fraction) {
            return Err(format!("a fractional index must lie in [0, 1], got {text}"));
        }
        if (fraction - 1.0).abs() < 1e-9 {
            frames as i64 - 1
        } else {
            (fraction * frames as f64) as i64
        }
    } else {
        text.parse()
            .map_err(|_| format!("index `{text}` is not an integer"))?
    };
    if value >= 0 {
        return Ok(value as usize);
    }
    let from_end = frames as i64 + value;
    if from_end < 0 && !in_range {
        return Err(format!(
            "index {value} is before the first of {frames} frames"
        ));
    }
    Ok(from_end.max(0) as usize)
}

/// AnimateDiff-Evolved's joining of prepend and append text to a prompt, with one comma
/// between the parts.
pub fn with_affixes(prompt: &str, prepend: &str, append: &str) -> String {
    let mut prompt = prompt.trim().to_owned();
    let prepend = prepend.trim().trim_end_matches(',').trim();
    if !prepend.is_empty() {
        prompt = if prompt.starts_with(',') {
            format!("{prepend}{prompt}")
        } else {
            format!("{prepend}, {prompt}")
        };
    }
    let append = append.trim().trim_start_matches(',').trim();
    if !append.is_empty() {
        prompt = if prompt.ends_with(',') {
            format!("{prompt} {append}")
        } else {
            format!("{prompt}, {append}")
        };
    }
    prompt
}

/// One text embedding per frame, (frames, tokens, width), from the keyframes and an encoder of
/// one prompt to (1, tokens, width).
pub fn frame_embeddings(
    keyframes: &[Keyframe],
    frames: usize,
    blend: Blend,
    mut encode: impl FnMut(&str) -> Result<Tensor>,
) -> Result<Tensor> {
    if keyframes.is_empty() || frames == 0 {
        candle_core::bail!("a prompt schedule needs at least one keyframe and one frame");
    }
    // Each prompt encoded once, all padded to the longest.
    let mut encoded: Vec<(String, Tensor)> = Vec::new();
    for keyframe in keyframes {
        if !encoded.iter().any(|(p, _)| *p == keyframe.prompt) {
            encoded.push((keyframe.prompt.clone(), encode(&keyframe.prompt)?));
        }
    }
    let longest = encoded
        .iter()
        .map(|(_, t)| t.dim(1))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let mut padded = Vec::with_capacity(encoded.len());
    for (prompt, embedding) in encoded {
        let pad = longest - embedding.dim(1)?;
        let embedding = if pad > 0 {
            embedding.pad_with_zeros(1, pad / 2, pad - pad / 2)?
        } else {
            embedding
        };
        padded.push((prompt, embedding));
    }
    let of = |prompt: &str| -> Result<Tensor> {
        padded
            .iter()
            .find(|(p, _)| p == prompt)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("prompt `{prompt}` was not encoded")))
    };

    let mut per_frame: Vec<Option<Tensor>> = vec![None; frames];
    let first = &keyframes[0];
    for slot in per_frame.iter_mut().take(first.frame.min(frames - 1) + 1) {
        *slot = Some(of(&first.prompt)?);
    }
    for pair in keyframes.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        if from.frame >= frames {
            break;
        }
        let target = of(&to.prompt)?;
        if to.frame <= from.frame + 1 || from.hold {
            let held = of(&from.prompt)?;
            for slot in per_frame
                .iter_mut()
                .take(to.frame.min(frames))
                .skip(from.frame + 1)
            {
                *slot = Some(held.clone());
            }
            if to.frame < frames {
                per_frame[to.frame] = Some(target);
            }
            continue;
        }
        // The previous frame's embedding blended toward the target with weight k/span.
        let span = (to.frame - from.frame) as f64;
        let mut current = of(&from.prompt)?;
        for k in 0..=(to.frame - from.frame) {
            let frame = from.frame + k;
            if frame >= frames {
                break;
            }
            current = mix(blend, &current, &target, k as f64 / span)?;
            per_frame[frame] = Some(current.clone());
        }
    }
    // Frames after the last keyframe keep the last embedding.
    let mut last = None;
    for slot in per_frame.iter_mut() {
        match slot {
            Some(t) => last = Some(t.clone()),
            None => *slot = last.clone(),
        }
    }
    let rows: Vec<Tensor> = per_frame.into_iter().flatten().collect();
    Tensor::cat(&rows, 0)
}

fn mix(blend: Blend, from: &Tensor, to: &Tensor, weight: f64) -> Result<Tensor> {
    let lerp = || (from * (1.0 - weight))? + (to * weight)?;
    match blend {
        Blend::Lerp => lerp(),
        Blend::Slerp => {
            let norm = |t: &Tensor| -> Result<f64> {
                Ok(f64::from(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?))
            };
            let (from_norm, to_norm) = (norm(from)?, norm(to)?);
            let dot =
                f64::from((from * to)?.sum_all()?.to_scalar::<f32>()?) / (from_norm * to_norm);
            if dot.abs() > 0.9995 {
                return lerp();
            }
            let omega = dot.acos();
            let a = ((1.0 - weight) * omega).sin() / omega.sin();
            let b = (weight * omega).sin() / omega.sin();
            (from * a)? + (to * b)?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn frames_of(keyframes: &[Keyframe]) -> Vec<(usize, &str, bool)> {
        keyframes
            .iter()
            .map(|k| (k.frame, k.prompt.as_str(), k.hold))
            .collect()
    }

    #[test]
    fn both_styles_ranges_negatives_fractions_and_holds_parse() {
        let json = parse_schedule("{\"0\": \"a cat\",\n \"8\" : \"a dog\"}", 16).unwrap();
        assert_eq!(frames_of(&json), [(0, "a cat", false), (8, "a dog", false)]);
        let python = parse_schedule("0 = \"a\", -1 = \"b\", 0.5: = \"c\", 2:4 = \"d\"", 10);
        assert_eq!(
            frames_of(&python.unwrap()),
            [
                (0, "a", false),
                (2, "d", false),
                (3, "d", false),
                (5, "c", true),
                (9, "b", false)
            ]
        );
        for bad in [
            "",
            "0: \"a\"",
            "\"0\" = \"a\"",
            "0 = a",
            "0 = \"a\" 1 = \"b\"",
            ":3 = \"a\"",
            "-20 = \"a\"",
        ] {
            assert!(parse_schedule(bad, 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_blend_toward_each_keyframe_and_hold_where_asked() {
        // Prompts encode to constants: "a" = 0, "b" = 1, "c" = 2.
        let encode = |prompt: &str| -> Result<Tensor> {
            let value = match prompt {
                "a" => 0.0,
                "b" => 1.0,
                _ => 2.0,
            };
            Tensor::full(value as f32, (1, 2, 3), &Device::Cpu)
        };
        let keyframes =
            parse_schedule("\"1\": \"a\", \"3\": \"b\", \"4:\": \"c\", \"6\": \"a\"", 8).unwrap();
        let out = frame_embeddings(&keyframes, 8, Blend::Lerp, encode).unwrap();
        assert_eq!(out.dims(), [8, 2, 3]);
        let values: Vec<f32> = out
            .narrow(1, 0, 1)
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // 0, 1: a; 2: a→b at ½; 3: b; 4, 5: c held; 6, 7: a.
        assert_eq!(values, [0.0, 0.0, 0.5, 1.0, 2.0, 2.0, 0.0, 0.0]);
        // Compounding: frame k is the previous frame blended with weight k/span.
        let keyframes = parse_schedule("0 = \"a\", 4 = \"b\"", 5).unwrap();
        let out = frame_embeddings(&keyframes, 5, Blend::Lerp, encode).unwrap();
        let values: Vec<f32> = out
            .narrow(1, 0, 1)
            .unwrap()
            .narrow(2, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = [0.0, 0.25, 0.25 + 0.75 * 0.5, 0.625 + 0.375 * 0.75, 1.0];
        for (v, e) in values.iter().zip(expected) {
            assert!((v - e).abs() < 1e-6, "{values:?}");
        }
    }

    #[test]
    fn affixes_join_with_one_comma() {
        assert_eq!(
            with_affixes("a cat", "best quality,", ", 4k"),
            "best quality, a cat, 4k"
        );
        assert_eq!(with_affixes(", a cat", "x", ""), "x, a cat");
    }
}
