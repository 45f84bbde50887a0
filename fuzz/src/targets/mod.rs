//! The fuzz targets: what each one generates and what it runs.
//!
//! Every target starts from small valid inputs made in code (the seeds) and applies random
//! structured mutations (fields of the format set to edge values, parts dropped, duplicated or
//! swapped, checksums repaired so that the mutation reaches the parser behind them) and plain
//! byte mutations on top.

mod latent;
mod pickle;
mod safetensors;
mod video;
mod workflow;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device};
use fastrand::Rng;

/// A reader under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Target {
    /// `vdm::Workflow::parse` and `vdm::validate` against the plugin's descriptors.
    Workflow,
    /// `open_weights` / `open_safetensors` on a safetensors file, then every tensor read.
    Safetensors,
    /// `open_weights` / `open_torch_checkpoint` on a PyTorch zip checkpoint, every tensor read.
    Pickle,
    /// `load_video` on a GIF.
    Gif,
    /// `load_video` on a still PNG.
    Png,
    /// `load_video` on an animated PNG.
    Apng,
    /// `load_latent` on a `.latent` file.
    Latent,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Workflow,
        Target::Safetensors,
        Target::Pickle,
        Target::Gif,
        Target::Png,
        Target::Apng,
        Target::Latent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Workflow => "workflow",
            Target::Safetensors => "safetensors",
            Target::Pickle => "pickle",
            Target::Gif => "gif",
            Target::Png => "png",
            Target::Apng => "apng",
            Target::Latent => "latent",
        }
    }

    /// The extension of saved inputs.
    pub fn extension(self) -> &'static str {
        match self {
            Target::Workflow => "json",
            Target::Safetensors => "safetensors",
            Target::Pickle => "ckpt",
            Target::Gif => "gif",
            Target::Png | Target::Apng => "png",
            Target::Latent => "latent",
        }
    }

    /// A random input for this target.
    pub fn generate(self, ctx: &Context, rng: &mut Rng) -> Vec<u8> {
        match self {
            Target::Workflow => workflow::generate(ctx, rng),
            Target::Safetensors => safetensors::generate(ctx.seeds(self), rng),
            Target::Pickle => pickle::generate(ctx.seeds(self), rng),
            Target::Gif => video::generate_gif(ctx.seeds(self), rng),
            Target::Png | Target::Apng => video::generate_png(ctx.seeds(self), rng),
            Target::Latent => latent::generate(ctx.seeds(self), rng),
        }
    }

    /// Runs the reader on `input`, returning its error, if any (the expected outcome of most
    /// mutated inputs). A panic here is a crash.
    pub fn execute(self, ctx: &Context, input: &[u8]) -> Result<(), String> {
        match self {
            Target::Workflow => workflow::execute(ctx, input),
            Target::Safetensors => safetensors::execute(ctx, input),
            Target::Pickle => pickle::execute(ctx, input),
            Target::Gif | Target::Png | Target::Apng => video::execute(ctx, self, input),
            Target::Latent => latent::execute(ctx, input),
        }
    }
}

/// What the targets share: a scratch folder for the files they read, their seeds (made on
/// first use), and the plugin whose descriptors workflows are validated against.
pub struct Context {
    scratch: PathBuf,
    seeds: [OnceLock<Vec<Vec<u8>>>; 7],
    plugins: OnceLock<workflow::Plugins>,
}

impl Context {
    /// A context with a fresh scratch folder (in memory under `/dev/shm` where there is one),
    /// removed when the context is dropped.
    pub fn new() -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let scratch = base.join(format!(
            "vdm-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&scratch)?;
        Ok(Self {
            scratch,
            seeds: Default::default(),
            plugins: OnceLock::new(),
        })
    }

    /// The valid inputs that mutations start from.
    pub fn seeds(&self, target: Target) -> &[Vec<u8>] {
        self.seeds[target as usize].get_or_init(|| match target {
            Target::Workflow => workflow::seeds(self),
            Target::Safetensors => safetensors::seeds(),
            Target::Pickle => pickle::seeds(),
            Target::Gif => video::gif_seeds(&self.scratch),
            Target::Png => video::png_seeds(),
            Target::Apng => video::apng_seeds(&self.scratch),
            Target::Latent => latent::seeds(&self.scratch),
        })
    }

    fn plugins(&self) -> &workflow::Plugins {
        self.plugins.get_or_init(workflow::Plugins::load)
    }

    /// Writes `input` to the scratch file `case.{extension}` and returns its path.
    fn case_file(&self, extension: &str, input: &[u8]) -> PathBuf {
        let path = self.scratch.join(format!("case.{extension}"));
        std::fs::write(&path, input).expect("the scratch folder is writable");
        path
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Picks one element of a non-empty slice.
fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// The seeds as slices, for splicing.
/// Opens `input`, written as a file of `extension`, with the weight loaders and reads every
/// tensor, in its own dtype and as f32; the first error is the result.
fn read_every_tensor(ctx: &Context, extension: &str, input: &[u8]) -> Result<(), String> {
    let path = ctx.case_file(extension, input);
    let weights = vdm_nodes::models::load::open_weights(&path).map_err(|e| e.to_string())?;
    let keys: Vec<String> = weights.keys().map(str::to_owned).collect();
    let mut result = Ok(());
    for key in keys {
        let read = weights
            .get(&key)
            .and_then(|_| weights.load(&key, DType::F32, &Device::Cpu));
        if let (Err(e), Ok(())) = (read, &result) {
            result = Err(e.to_string());
        }
    }
    result
}

fn donors(seeds: &[Vec<u8>]) -> Vec<&[u8]> {
    seeds.iter().map(Vec::as_slice).collect()
}
