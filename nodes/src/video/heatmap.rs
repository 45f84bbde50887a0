//! A readable PNG heatmap of the entropy table: one row per attention layer (labelled with its
//! path), one column per sampling step (numbered), the normalised entropy in colour, a colour
//! bar and a title.

use std::collections::BTreeMap;

use image::{Rgb, RgbImage};

use super::entropy::EntropyRow;

const GLYPH: u32 = 8;
const CELL_WIDTH: u32 = 12;
const CELL_HEIGHT: u32 = 10;
const MARGIN: u32 = 8;
const BAR_WIDTH: u32 = 14;
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// Viridis at eleven stops, interpolated: dark blue (0) through green to yellow (1).
const VIRIDIS: [[u8; 3]; 11] = [
    [68, 1, 84],
    [72, 36, 117],
    [65, 68, 135],
    [53, 95, 141],
    [42, 120, 142],
    [33, 145, 140],
    [34, 168, 132],
    [68, 191, 112],
    [122, 209, 81],
    [189, 223, 38],
    [253, 231, 37],
];

fn colour(value: f64) -> Rgb<u8> {
    if !value.is_finite() {
        return Rgb([200, 200, 200]);
    }
    let position = value.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = (low + 1).min(VIRIDIS.len() - 1);
    let t = position - low as f64;
    let mix = |c: usize| (VIRIDIS[low][c] as f64 * (1.0 - t) + VIRIDIS[high][c] as f64 * t) as u8;
    Rgb([mix(0), mix(1), mix(2)])
}

/// Writes ASCII `text` with its top-left corner at (x, y); other characters print as `?`.
fn draw_text(image: &mut RgbImage, x: u32, y: u32, text: &str) {
    for (i, c) in text.chars().enumerate() {
        let code = if c.is_ascii() {
            c as usize
        } else {
            b'?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (row, bits) in glyph.iter().enumerate() {
            for column in 0..GLYPH {
                if bits & (1 << column) != 0 {
                    let (px, py) = (x + i as u32 * GLYPH + column, y + row as u32);
                    if px < image.width() && py < image.height() {
                        image.put_pixel(px, py, INK);
                    }
                }
            }
        }
    }
}

fn fill(image: &mut RgbImage, x: u32, y: u32, width: u32, height: u32, colour: Rgb<u8>) {
    for py in y..(y + height).min(image.height()) {
        for px in x..(x + width).min(image.width()) {
            image.put_pixel(px, py, colour);
        }
    }
}

/// The heatmap of `rows`: layers top to bottom in path order, steps left to right.
pub fn entropy_heatmap(rows: &[EntropyRow]) -> RgbImage {
    let mut layers: Vec<&str> = rows.iter().map(|r| r.layer.as_str()).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut steps: Vec<usize> = rows.iter().map(|r| r.step).collect();
    steps.sort_unstable();
    steps.dedup();
    let values: BTreeMap<(usize, &str), f64> = rows
        .iter()
        .map(|r| ((r.step, r.layer.as_str()), r.entropy_normalized))
        .collect();

    let title = "normalized attention entropy H / ln N (rows: layers, columns: steps)";
    let label_width = layers.iter().map(|l| l.len()).max().unwrap_or(0) as u32 * GLYPH;
    let grid_x = MARGIN + label_width + MARGIN;
    let grid_y = MARGIN + 2 * GLYPH + MARGIN;
    let grid_width = steps.len().max(1) as u32 * CELL_WIDTH;
    let grid_height = layers.len().max(1) as u32 * CELL_HEIGHT;
    let bar_x = grid_x + grid_width + 2 * MARGIN;
    let width =
        (bar_x + BAR_WIDTH + MARGIN + 3 * GLYPH).max(MARGIN * 2 + title.len() as u32 * GLYPH);
    let height = grid_y + grid_height + MARGIN + 3 * GLYPH + MARGIN;
    let mut image = RgbImage::from_pixel(width, height, BACKGROUND);

    draw_text(&mut image, MARGIN, MARGIN, title);
    draw_text(&mut image, MARGIN, grid_y - GLYPH - 2, "layer");
    for (row, layer) in layers.iter().enumerate() {
        let y = grid_y + row as u32 * CELL_HEIGHT;
        draw_text(&mut image, MARGIN, y + (CELL_HEIGHT - GLYPH) / 2, layer);
        for (column, step) in steps.iter().enumerate() {
            let value = values.get(&(*step, *layer)).copied().unwrap_or(f64::NAN);
            let x = grid_x + column as u32 * CELL_WIDTH;
            fill(&mut image, x, y, CELL_WIDTH, CELL_HEIGHT, colour(value));
        }
    }
    // Step numbers under the grid, as many as fit without overlapping.
    let widest = steps.last().map_or(1, |s| s.to_string().len()) as u32 * GLYPH + GLYPH;
    let every = widest.div_ceil(CELL_WIDTH).max(1) as usize;
    let ticks_y = grid_y + grid_height + 4;
    for (column, step) in steps.iter().enumerate().step_by(every) {
        draw_text(
            &mut image,
            grid_x + column as u32 * CELL_WIDTH,
            ticks_y,
            &step.to_string(),
        );
    }
    draw_text(&mut image, grid_x, ticks_y + GLYPH + 6, "step");
    // The colour bar: 1 at the top, 0 at the bottom.
    for y in 0..grid_height {
        let value = 1.0 - y as f64 / (grid_height.max(2) - 1) as f64;
        fill(&mut image, bar_x, grid_y + y, BAR_WIDTH, 1, colour(value));
    }
    draw_text(&mut image, bar_x + BAR_WIDTH + 4, grid_y, "1");
    draw_text(
        &mut image,
        bar_x + BAR_WIDTH + 4,
        grid_y + grid_height - GLYPH,
        "0",
    );
    image
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::attention::AttentionKind;

    #[test]
    fn the_heatmap_has_a_cell_per_layer_and_step_in_its_colour() {
        let row = |step, layer: &str, value| EntropyRow {
            step,
            timestep: 0.0,
            layer: layer.to_string(),
            kind: AttentionKind::Temporal,
            entropy: 0.0,
            entropy_normalized: value,
            energy: 0.0,
        };
        let rows = [
            row(0, "a.attn1", 0.0),
            row(1, "a.attn1", 1.0),
            row(0, "b", 0.5),
        ];
        let image = entropy_heatmap(&rows);
        let grid_x = MARGIN + 7 * GLYPH + MARGIN;
        let grid_y = MARGIN + 2 * GLYPH + MARGIN;
        let centre = |column: u32, row: u32| {
            *image.get_pixel(
                grid_x + column * CELL_WIDTH + CELL_WIDTH / 2,
                grid_y + row * CELL_HEIGHT + CELL_HEIGHT / 2,
            )
        };
        assert_eq!(centre(0, 0), colour(0.0));
        assert_eq!(centre(1, 0), colour(1.0));
        assert_eq!(centre(0, 1), colour(0.5));
        // A step a layer was not measured at is grey, not a colour of the scale.
        assert_eq!(centre(1, 1), Rgb([200, 200, 200]));
        // The labels put ink in the left margin.
        assert!((0..grid_x).any(|x| *image.get_pixel(x, grid_y + 4) == INK));
    }
}
