//! Attention entropy (METHODS.md §3): an observer that measures, for every attention layer and
//! sampling step, the mean entropy of the weights actually applied, its normalised form and the
//! energy of the output, without changing anything; the table it fills, as CSV, a heatmap and a
//! ranking of layers.
//!
//! For a map A with rows summing to 1 over N keys, H = −(1/Q)·Σ_i Σ_j A_ij·ln A_ij, averaged over
//! query rows, heads and the batch; H / ln N ∈ [0, 1] compares layers of different N (0: every
//! query attends to one key, 1: uniform). E = Σ_i ‖(AV)_i‖², summed over the queries and
//! averaged over heads and the batch. Maps with many queries are measured on
//! [`PROBE_QUERY_ROWS`] evenly spaced query rows; the energy always uses every row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};

use crate::models::attention::{
    AttentionCall, AttentionKind, AttentionObserver, ObservedAttention,
};

use super::io::{save_atomically, MediaError};

/// Query rows measured per attention call when it has more: 64 of the 1024 rows of SD's first
/// spatial layers at 32×32 latents, every row of temporal attention (one per frame).
pub const PROBE_QUERY_ROWS: usize = 64;

/// The CSV header of [`EntropyTable::to_csv`].
pub const CSV_HEADER: &str = "step,timestep,layer,kind,entropy,entropy_normalized,energy";

/// `count` evenly spaced rows of `total` (all of them when `count` ≥ `total`).
pub fn sampled_rows(total: usize, count: usize) -> Vec<usize> {
    if count >= total {
        return (0..total).collect();
    }
    (0..count).map(|i| i * total / count).collect()
}

/// The mean entropy −Σ_j p_j·ln p_j of the rows of `weights` (…, keys), with 0·ln 0 = 0.
pub fn mean_row_entropy(weights: &Tensor) -> Result<f64> {
    let weights = weights.to_dtype(DType::F32)?;
    // ln of a floor keeps 0·ln 0 at 0 (the floor's log is finite) and changes nothing else.
    let logs = weights.clamp(f32::MIN_POSITIVE, 1.0)?.log()?;
    let rows = weights.elem_count() / weights.dims().last().copied().unwrap_or(1).max(1);
    // The products in f32, their sum in f64: a map has millions of terms.
    let total = (weights * logs)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(-total / rows.max(1) as f64)
}

/// Σ over queries of ‖out_i‖², averaged over the other leading dimensions of
/// (batch, heads, queries, head_dim).
pub fn output_energy(output: &Tensor) -> Result<f64> {
    let (batch, heads, _, _) = output.dims4()?;
    let total = output
        .to_dtype(DType::F32)?
        .sqr()?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(total / (batch * heads).max(1) as f64)
}

/// One row of the table: a layer at a step.
#[derive(Debug, Clone, PartialEq)]
pub struct EntropyRow {
    pub step: usize,
    pub timestep: f64,
    pub layer: String,
    pub kind: AttentionKind,
    pub entropy: f64,
    pub entropy_normalized: f64,
    pub energy: f64,
}

/// Sums of the calls of one layer at one step (several with context windows).
#[derive(Debug, Clone)]
struct Cell {
    timestep: f64,
    kind: AttentionKind,
    entropy: f64,
    entropy_normalized: f64,
    energy: f64,
    calls: usize,
}

/// The measurements of the runs of a probed model, by step and layer.
#[derive(Debug, Default)]
pub struct EntropyTable {
    cells: Mutex<BTreeMap<(usize, String), Cell>>,
}

impl EntropyTable {
    pub fn new() -> Self {
        Self::default()
    }

    fn record(
        &self,
        step: usize,
        timestep: f64,
        layer: &str,
        kind: AttentionKind,
        stats: [f64; 3],
    ) {
        let [entropy, entropy_normalized, energy] = stats;
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let cell = cells.entry((step, layer.to_string())).or_insert(Cell {
            timestep,
            kind,
            entropy: 0.0,
            entropy_normalized: 0.0,
            energy: 0.0,
            calls: 0,
        });
        cell.entropy += entropy;
        cell.entropy_normalized += entropy_normalized;
        cell.energy += energy;
        cell.calls += 1;
    }

    /// Every (step, layer), by step then layer path, averaged over the calls of that step.
    pub fn rows(&self) -> Vec<EntropyRow> {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        cells
            .iter()
            .map(|((step, layer), cell)| {
                let calls = cell.calls.max(1) as f64;
                EntropyRow {
                    step: *step,
                    timestep: cell.timestep,
                    layer: layer.clone(),
                    kind: cell.kind,
                    entropy: cell.entropy / calls,
                    entropy_normalized: cell.entropy_normalized / calls,
                    energy: cell.energy / calls,
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.lock().map(|c| c.is_empty()).unwrap_or(true)
    }

    /// The layers (of `kind`, or all) by their normalised entropy averaged over the steps,
    /// lowest first.
    pub fn ranking(&self, kind: Option<AttentionKind>) -> Vec<(String, f64)> {
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for row in self.rows() {
            if kind.is_none_or(|k| k == row.kind) {
                let sum = sums.entry(row.layer).or_default();
                sum.0 += row.entropy_normalized;
                sum.1 += 1;
            }
        }
        let mut ranking: Vec<(String, f64)> = sums
            .into_iter()
            .map(|(layer, (sum, n))| (layer, sum / n as f64))
            .collect();
        ranking.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        ranking
    }

    /// The table as CSV with the header [`CSV_HEADER`].
    pub fn to_csv(&self) -> String {
        let mut csv = format!("{CSV_HEADER}\n");
        for row in self.rows() {
            csv.push_str(&format!(
                "{},{},{},{},{:.6},{:.6},{:.6e}\n",
                row.step,
                row.timestep,
                row.layer,
                row.kind.name(),
                row.entropy,
                row.entropy_normalized,
                row.energy
            ));
        }
        csv
    }

    /// Writes the CSV and the heatmap PNG into `output_dir` under `filename_prefix`, each
    /// atomically; returns their paths.
    pub fn save(
        &self,
        output_dir: &Path,
        filename_prefix: &str,
    ) -> std::result::Result<(PathBuf, PathBuf), MediaError> {
        let csv = self.to_csv();
        let csv_path = save_atomically(output_dir, filename_prefix, "csv", |temp| {
            std::fs::write(temp, csv.as_bytes()).map_err(|source| MediaError::Io {
                path: temp.to_path_buf(),
                source,
            })
        })?;
        let heatmap = super::heatmap::entropy_heatmap(&self.rows());
        let png_path = save_atomically(output_dir, filename_prefix, "png", |temp| {
            heatmap
                .save_with_format(temp, image::ImageFormat::Png)
                .map_err(|e| MediaError::Invalid(format!("{}: {e}", temp.display())))
        })?;
        Ok((csv_path, png_path))
    }
}

/// The entropy probe: records every attention call of a model into its table.
pub struct EntropyProbe {
    table: Arc<EntropyTable>,
    query_rows: usize,
}

impl EntropyProbe {
    pub fn new(table: Arc<EntropyTable>) -> Self {
        Self::with_query_rows(table, PROBE_QUERY_ROWS)
    }

    /// A probe measuring at most `query_rows` query rows per call.
    pub fn with_query_rows(table: Arc<EntropyTable>, query_rows: usize) -> Self {
        Self {
            table,
            query_rows: query_rows.max(1),
        }
    }

    /// H, H / ln N and E of one call.
    pub fn measure(&self, call: &AttentionCall, seen: &ObservedAttention) -> Result<[f64; 3]> {
        let (_, _, queries, _) = seen.q.dims4()?;
        let keys = seen.k.dim(2)?;
        let rows = sampled_rows(queries, self.query_rows);
        let entropy = mean_row_entropy(&seen.weights(call, &rows)?)?;
        let normalized = if keys > 1 {
            entropy / (keys as f64).ln()
        } else {
            0.0
        };
        Ok([entropy, normalized, output_energy(seen.output)?])
    }
}

impl AttentionObserver for EntropyProbe {
    fn observe(&self, call: &AttentionCall, seen: &ObservedAttention) -> Result<()> {
        let (step, timestep) = match call.step() {
            Some(step) => (step.index, step.timestep),
            // Outside a sampling run: one row per layer at step 0.
            None => (0, f64::NAN),
        };
        let stats = self.measure(call, seen)?;
        self.table
            .record(step, timestep, call.layer, call.kind, stats);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn entropy_of_uniform_rows_is_log_n_and_of_one_hot_rows_zero() -> Result<()> {
        let dev = Device::Cpu;
        let uniform = Tensor::full(0.125f32, (2, 3, 4, 8), &dev)?;
        assert!((mean_row_entropy(&uniform)? - 8f64.ln()).abs() < 1e-6);
        let one_hot = Tensor::eye(8, DType::F32, &dev)?.reshape((1, 1, 8, 8))?;
        assert_eq!(mean_row_entropy(&one_hot)?, 0.0);
        Ok(())
    }

    #[test]
    fn rows_are_spread_over_the_queries() {
        assert_eq!(sampled_rows(5, 10), vec![0, 1, 2, 3, 4]);
        assert_eq!(sampled_rows(8, 4), vec![0, 2, 4, 6]);
        assert_eq!(sampled_rows(1024, 64).len(), 64);
    }

    #[test]
    fn the_table_averages_calls_and_ranks_layers() {
        let table = EntropyTable::new();
        table.record(0, 981.0, "b", AttentionKind::Temporal, [1.0, 0.5, 2.0]);
        table.record(0, 981.0, "b", AttentionKind::Temporal, [3.0, 0.7, 4.0]);
        table.record(0, 981.0, "a", AttentionKind::SpatialSelf, [2.0, 0.9, 1.0]);
        table.record(1, 961.0, "a", AttentionKind::SpatialSelf, [2.0, 0.7, 1.0]);
        let rows = table.rows();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].layer, "b");
        assert_eq!((rows[1].entropy, rows[1].energy), (2.0, 3.0));
        assert!((rows[1].entropy_normalized - 0.6).abs() < 1e-12);
        let ranking = table.ranking(None);
        assert_eq!(ranking[0].0, "b");
        assert_eq!(table.ranking(Some(AttentionKind::SpatialSelf)).len(), 1);
        let csv = table.to_csv();
        assert!(csv.starts_with(&format!("{CSV_HEADER}\n0,981,a,spatial,")));
        assert_eq!(csv.lines().count(), 4);
    }
}
