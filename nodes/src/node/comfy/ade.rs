//! AnimateDiff-Evolved's nodes (Gen1 and Gen2 loaders, context options, sample settings,
//! multivals) on vdm's model patcher and context windows. What a workflow sets with them
//! travels on the MODEL to `KSampler`: the motion modules as patches, the noise schedule,
//! the context windows and the noise settings.

use std::sync::Arc;

use crate::models::attention::{AttentionKind, KeyScale};
use crate::models::lora::motion_lora_overrides;
use crate::models::motion::TimestepRangeGate;
use crate::models::patcher::{MotionModules, Patch, PatchedUNet};
use crate::models::weights::NamedWeights;
use crate::sampling::comfy_noise::{NoiseSettings, NoiseType, SeedGeneration};
use crate::sampling::k_diffusion::{BetaSchedule, ModelSamplingDiscrete};
use crate::sampling::{ContextFuse, ContextOptions, ContextSchedule};
use crate::schedulers::{BetaSchedule as DiffusersBeta, NoiseScheduleConfig};
use crate::video::freeinit::{ComfyReinit, FreeInitConfig};
use crate::video::prompt_travel::{
    frame_embeddings, parse_schedule, with_affixes, Blend, Keyframe,
};

use super::core::encode_prompt;

use super::super::models::{
    open_motion_module_file, resolve_model, MOTION_LORA_FOLDERS, MOTION_MODULE_FOLDERS,
};
use super::super::objects::{
    AdeMotionModel, AppliedMotionModel, Clip, Conditioning, Context as ContextObject,
    IterationOptions, Model, MotionLora, MotionLoraList, MotionModelList, Multival, SampleSettings,
};
use super::super::{
    Context, DescriptorBuilder, ForInput, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(LoadAnimateDiffModel),
        Box::new(ApplyAnimateDiffModelSimple),
        Box::new(ApplyAnimateDiffModel),
        Box::new(UseEvolvedSampling),
        Box::new(AnimateDiffLoaderGen1),
        Box::new(AnimateDiffLoaderWithContext),
        Box::new(MultivalDynamic),
        Box::new(ContextOptionsNode(ContextKind::StandardStatic)),
        Box::new(ContextOptionsNode(ContextKind::StandardUniform)),
        Box::new(ContextOptionsNode(ContextKind::LoopedUniform)),
        Box::new(ContextOptionsNode(ContextKind::LegacyUniform)),
        Box::new(SampleSettingsNode),
        Box::new(IterationOptsFreeInit),
        Box::new(PromptScheduling { with_latents: true }),
        Box::new(PromptScheduling {
            with_latents: false,
        }),
        Box::new(AnimateDiffLoraLoader),
    ]
}

const CATEGORY: &str = "Animate Diff 🎭🅐🅓";

/// AnimateDiff-Evolved's `beta_schedule` choices that vdm implements (its LCM schedules,
/// which need a distilled model sampling, are not among them).
const BETA_SCHEDULES: [&str; 9] = [
    "autoselect",
    "use existing",
    "sqrt_linear (AnimateDiff)",
    "linear (AnimateDiff-SDXL)",
    "linear (HotshotXL/default)",
    "avg(sqrt_linear,linear)",
    "sqrt",
    "cosine",
    "squaredcos_cap_v2",
];

/// The model sampling of a `beta_schedule` choice, or `None` to keep the model's. With
/// `autoselect`, AnimateDiff SD 1.x motion modules ask for `sqrt_linear`, the schedule they
/// were trained with.
fn model_sampling_for(
    choice: &str,
    has_motion: bool,
) -> Result<Option<Arc<ModelSamplingDiscrete>>, NodeFailure> {
    let fail = |e: candle_core::Error| NodeFailure::input("beta_schedule", e);
    let sampling = match choice {
        "use existing" => return Ok(None),
        "autoselect" if !has_motion => return Ok(None),
        "autoselect" | "sqrt_linear (AnimateDiff)" => {
            ModelSamplingDiscrete::new(BetaSchedule::SqrtLinear).map_err(fail)?
        }
        "linear (HotshotXL/default)" => ModelSamplingDiscrete::sd().map_err(fail)?,
        "linear (AnimateDiff-SDXL)" => {
            let betas = BetaSchedule::Linear
                .betas(
                    ModelSamplingDiscrete::SD_TIMESTEPS,
                    ModelSamplingDiscrete::SD_LINEAR_START,
                    0.020,
                )
                .map_err(fail)?;
            ModelSamplingDiscrete::from_betas(&betas).map_err(fail)?
        }
        "avg(sqrt_linear,linear)" => {
            // The mean of the two σ tables, as a ᾱ table: ᾱ = 1 / (1 + σ²).
            let linear = ModelSamplingDiscrete::sd().map_err(fail)?;
            let sqrt_linear = ModelSamplingDiscrete::new(BetaSchedule::SqrtLinear).map_err(fail)?;
            let alphas: Vec<f64> = linear
                .sigmas()
                .iter()
                .zip(sqrt_linear.sigmas())
                .map(|(&a, &b)| {
                    let sigma = (f64::from(a) + f64::from(b)) / 2.0;
                    1.0 / (1.0 + sigma * sigma)
                })
                .collect();
            ModelSamplingDiscrete::from_alphas_cumprod(&alphas).map_err(fail)?
        }
        "sqrt" => ModelSamplingDiscrete::new(BetaSchedule::Sqrt).map_err(fail)?,
        "cosine" => ModelSamplingDiscrete::new(BetaSchedule::Cosine).map_err(fail)?,
        "squaredcos_cap_v2" => {
            let table = NoiseScheduleConfig {
                num_train_timesteps: ModelSamplingDiscrete::SD_TIMESTEPS,
                beta_start: ModelSamplingDiscrete::SD_LINEAR_START,
                beta_end: ModelSamplingDiscrete::SD_LINEAR_END,
                beta_schedule: DiffusersBeta::SquaredcosCapV2,
                trained_betas: None,
                rescale_betas_zero_snr: false,
            }
            .alphas_cumprod()
            .map_err(fail)?;
            let alphas: Vec<f64> = table.iter().map(|&a| f64::from(a)).collect();
            ModelSamplingDiscrete::from_alphas_cumprod(&alphas).map_err(fail)?
        }
        other => {
            return Err(NodeFailure::input(
                "beta_schedule",
                format!(
                    "`{other}` is not supported (supported: {})",
                    BETA_SCHEDULES.join(", ")
                ),
            ))
        }
    };
    Ok(Some(Arc::new(sampling)))
}

struct LoadAnimateDiffModel;

impl Node for LoadAnimateDiffModel {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new(
            "ADE_LoadAnimateDiffModel",
            "Load AnimateDiff Model 🎭🅐🅓②",
            CATEGORY,
        )
        .description("Loads an AnimateDiff motion module from <models>/animatediff_models/.")
        .string("model_name", "", "The motion module file.")
        .output("MOTION_MODEL_ADE", "MOTION_MODEL")
        .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        super::super::models::check_model(inputs, ctx, "model_name", MOTION_MODULE_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let file = open_motion_module_file(ctx, inputs.string("model_name")?)?;
        Ok(Outputs::one(AdeMotionModel { file }.into_value()))
    }
}

/// The motion LoRAs of an optional `motion_lora` input.
fn motion_loras(inputs: &Inputs) -> Result<Vec<MotionLora>, NodeFailure> {
    Ok(inputs
        .optional_object::<MotionLoraList>("motion_lora")?
        .map(|list| list.loras)
        .unwrap_or_default())
}

/// The value of an optional MULTIVAL input, or 1.
fn multival(inputs: &Inputs, name: &str) -> Result<f64, NodeFailure> {
    Ok(inputs
        .optional_object::<Multival>(name)?
        .map_or(1.0, |m| m.value))
}

/// The motion model of `motion_model` with the settings of the apply nodes.
fn applied(inputs: &Inputs, start: f64, end: f64) -> Result<AppliedMotionModel, NodeFailure> {
    let motion: AdeMotionModel = inputs.object("motion_model")?;
    if start > end {
        return Err(NodeFailure::input(
            "start_percent",
            format!("start_percent {start} is after end_percent {end}"),
        ));
    }
    Ok(AppliedMotionModel {
        file: motion.file,
        loras: motion_loras(inputs)?,
        attention_scale: multival(inputs, "scale_multival")?,
        effect: multival(inputs, "effect_multival")?,
        start_percent: start,
        end_percent: end,
    })
}

fn apply_inputs(builder: DescriptorBuilder) -> DescriptorBuilder {
    builder
        .object(
            "motion_lora",
            "MOTION_LORA",
            "Motion LoRAs to merge into the motion model.",
        )
        .object(
            "scale_multival",
            "MULTIVAL",
            "Motion scale: multiplies the temporal attention's keys.",
        )
        .object(
            "effect_multival",
            "MULTIVAL",
            "Motion effect: 1 as trained, 0 the image model.",
        )
}

struct ApplyAnimateDiffModelSimple;

impl Node for ApplyAnimateDiffModelSimple {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let builder = DescriptorBuilder::new(
            "ADE_ApplyAnimateDiffModelSimple",
            "Apply AnimateDiff Model 🎭🅐🅓②",
            CATEGORY,
        )
        .object(
            "motion_model",
            "MOTION_MODEL_ADE",
            "From Load AnimateDiff Model.",
        )
        .optional();
        apply_inputs(builder).output("M_MODELS", "M_MODELS").build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let models = vec![applied(inputs, 0.0, 1.0)?];
        Ok(Outputs::one(MotionModelList { models }.into_value()))
    }
}

struct ApplyAnimateDiffModel;

impl Node for ApplyAnimateDiffModel {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let builder = DescriptorBuilder::new(
            "ADE_ApplyAnimateDiffModel",
            "Apply AnimateDiff Model (Adv.) 🎭🅐🅓②",
            CATEGORY,
        )
        .object(
            "motion_model",
            "MOTION_MODEL_ADE",
            "From Load AnimateDiff Model.",
        )
        .float(
            "start_percent",
            0.0,
            (0.0, 1.0, 0.001),
            "Where in the schedule the modules start acting.",
        )
        .float("end_percent", 1.0, (0.0, 1.0, 0.001), "Where they stop.")
        .optional();
        apply_inputs(builder)
            .object(
                "prev_m_models",
                "M_MODELS",
                "Motion models applied before this one.",
            )
            .output("M_MODELS", "M_MODELS")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model = applied(
            inputs,
            inputs.float("start_percent")?,
            inputs.float("end_percent")?,
        )?;
        let mut list = inputs
            .optional_object::<MotionModelList>("prev_m_models")?
            .unwrap_or_default();
        // AnimateDiff-Evolved runs the newest first.
        list.models.insert(0, model);
        Ok(Outputs::one(list.into_value()))
    }
}

/// `model` with `motion` applied, each model as a motion patch gated to its step range and,
/// with a scale other than 1, key scaling on the temporal attention.
fn with_motion_models(
    model: &Model,
    motion: &[AppliedMotionModel],
    ctx: &Context,
    input: &str,
) -> Result<PatchedUNet, NodeFailure> {
    let mut unet = model.unet.clone();
    let base = model.unet.base();
    for applied in motion {
        unet.check_motion_channels(&applied.file.config.block_out_channels)
            .map_err(|e| NodeFailure::input(input, e))?;
        let adapter = applied
            .file
            .build(base.config().norm_num_groups, base.dtype(), &ctx.device()?)
            .for_input(input)?;
        let whole_schedule = applied.start_percent <= 0.0 && applied.end_percent >= 1.0;
        let gate = (!whole_schedule).then(|| {
            Arc::new(TimestepRangeGate {
                start_percent: applied.start_percent,
                end_percent: applied.end_percent,
                train_timesteps: ModelSamplingDiscrete::SD_TIMESTEPS,
            }) as Arc<dyn crate::models::motion::ModuleGate>
        });
        unet = unet
            .with_patch(Patch::Motion(MotionModules {
                adapter,
                scale: applied.effect,
                gate,
            }))
            .map_err(|e| NodeFailure::input(input, e))?;
        // Motion LoRAs, each merged into what the ones before left.
        let mut merged = NamedWeights::new();
        for lora in &applied.loras {
            let (overrides, _) =
                motion_lora_overrides(&applied.file, &lora.path, lora.strength, &merged)
                    .map_err(|e| NodeFailure::input("motion_lora", e))?;
            merged.extend(overrides.weights);
        }
        if !merged.is_empty() {
            unet = unet
                .with_weights(merged)
                .map_err(|e| NodeFailure::input("motion_lora", e))?;
        }
        if applied.attention_scale != 1.0 {
            unet = unet.with_processor(
                "",
                Some(AttentionKind::Temporal),
                Arc::new(KeyScale {
                    factor: applied.attention_scale,
                }),
            );
        }
    }
    Ok(unet)
}

/// What the loaders and `ADE_UseEvolvedSampling` set on the model.
struct Evolved<'a> {
    motion: &'a [AppliedMotionModel],
    beta_schedule: &'a str,
    context: Option<ContextOptions>,
    sample_settings: Option<SampleSettings>,
}

impl Evolved<'_> {
    fn apply(
        &self,
        model: &Model,
        ctx: &Context,
        motion_input: &str,
    ) -> Result<Model, NodeFailure> {
        let unet = with_motion_models(model, self.motion, ctx, motion_input)?;
        let mut evolved = model.with_unet(unet);
        if let Some(sampling) = model_sampling_for(self.beta_schedule, !self.motion.is_empty())? {
            evolved.sampling.model_sampling = Some(sampling);
        }
        if let Some(context) = self.context {
            evolved.sampling.context = Some(context);
        }
        if let Some(settings) = self.sample_settings {
            evolved.sampling.noise = settings.noise;
            evolved.sampling.iterations = settings.iterations;
        }
        Ok(evolved)
    }
}

fn context_input(inputs: &Inputs) -> Result<Option<ContextOptions>, NodeFailure> {
    Ok(inputs
        .optional_object::<ContextObject>("context_options")?
        .map(|c| c.options))
}

struct UseEvolvedSampling;

impl Node for UseEvolvedSampling {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ADE_UseEvolvedSampling", "Use Evolved Sampling 🎭🅐🅓②", CATEGORY)
            .description("Applies the motion models to the model, with the noise schedule, context windows and sample settings KSampler then uses.")
            .object("model", "MODEL", "The SD model.")
            .combo("beta_schedule", &BETA_SCHEDULES, "Noise schedule; autoselect takes the motion model's (sqrt_linear for AnimateDiff SD 1.x).")
            .optional()
            .object("m_models", "M_MODELS", "Motion models from Apply AnimateDiff Model.")
            .object("context_options", "CONTEXT_OPTIONS", "Context windows for long clips.")
            .object("sample_settings", "SAMPLE_SETTINGS", "Noise settings.")
            .output("MODEL", "MODEL")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let motion = inputs
            .optional_object::<MotionModelList>("m_models")?
            .unwrap_or_default();
        let evolved = Evolved {
            motion: &motion.models,
            beta_schedule: inputs.string("beta_schedule")?,
            context: context_input(inputs)?,
            sample_settings: inputs.optional_object::<SampleSettings>("sample_settings")?,
        };
        Ok(Outputs::one(
            evolved.apply(&model, ctx, "m_models")?.into_value(),
        ))
    }
}

/// The one-node loaders: the motion module of `model_name` applied to `model` for the whole
/// schedule, with evolved sampling.
fn load_and_apply(
    inputs: &Inputs,
    ctx: &Context,
    attention_scale: f64,
    effect: f64,
) -> Result<Outputs, NodeFailure> {
    let model: Model = inputs.object("model")?;
    let file = open_motion_module_file(ctx, inputs.string("model_name")?)?;
    let motion = [AppliedMotionModel {
        file,
        loras: motion_loras(inputs)?,
        attention_scale,
        effect,
        start_percent: 0.0,
        end_percent: 1.0,
    }];
    let evolved = Evolved {
        motion: &motion,
        beta_schedule: inputs.string("beta_schedule")?,
        context: context_input(inputs)?,
        sample_settings: inputs.optional_object::<SampleSettings>("sample_settings")?,
    };
    Ok(Outputs::one(
        evolved.apply(&model, ctx, "model_name")?.into_value(),
    ))
}

struct AnimateDiffLoaderGen1;

impl Node for AnimateDiffLoaderGen1 {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new(
            "ADE_AnimateDiffLoaderGen1",
            "AnimateDiff Loader 🎭🅐🅓①",
            CATEGORY,
        )
        .description("Loads a motion module and applies it with evolved sampling, in one node.")
        .object("model", "MODEL", "The SD model.")
        .string(
            "model_name",
            "",
            "The motion module file, under <models>/animatediff_models/.",
        )
        .combo(
            "beta_schedule",
            &BETA_SCHEDULES,
            "Noise schedule; autoselect takes the motion model's.",
        )
        .optional()
        .object(
            "context_options",
            "CONTEXT_OPTIONS",
            "Context windows for long clips.",
        )
        .object(
            "motion_lora",
            "MOTION_LORA",
            "Motion LoRAs to merge into the motion model.",
        )
        .object("sample_settings", "SAMPLE_SETTINGS", "Noise settings.")
        .object(
            "scale_multival",
            "MULTIVAL",
            "Motion scale: multiplies the temporal attention's keys.",
        )
        .object(
            "effect_multival",
            "MULTIVAL",
            "Motion effect: 1 as trained, 0 the image model.",
        )
        .output("MODEL", "MODEL")
        .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        super::super::models::check_model(inputs, ctx, "model_name", MOTION_MODULE_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let scale = multival(inputs, "scale_multival")?;
        let effect = multival(inputs, "effect_multival")?;
        load_and_apply(inputs, ctx, scale, effect)
    }
}

struct AnimateDiffLoaderWithContext;

impl Node for AnimateDiffLoaderWithContext {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ADE_AnimateDiffLoaderWithContext", "AnimateDiff Loader [Legacy] 🎭🅐🅓①", CATEGORY)
            .description("The legacy AnimateDiff loader of older workflows: motion_scale multiplies the temporal attention's keys.")
            .object("model", "MODEL", "The SD model.")
            .string("model_name", "", "The motion module file, under <models>/animatediff_models/.")
            .combo("beta_schedule", &BETA_SCHEDULES, "Noise schedule; autoselect takes the motion model's.")
            .optional()
            .object("context_options", "CONTEXT_OPTIONS", "Context windows for long clips.")
            .object("motion_lora", "MOTION_LORA", "Motion LoRAs to merge into the motion model.")
            .object("sample_settings", "SAMPLE_SETTINGS", "Noise settings.")
            .float("motion_scale", 1.0, (0.0, 1e9, 0.001), "Multiplies the temporal attention's keys.")
            .boolean("apply_v2_models_properly", true, "AnimateDiff v2 modules' mid-block module is applied (as vdm always does).")
            .output("MODEL", "MODEL")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        super::super::models::check_model(inputs, ctx, "model_name", MOTION_MODULE_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        load_and_apply(inputs, ctx, inputs.float_or("motion_scale", 1.0)?, 1.0)
    }
}

struct MultivalDynamic;

impl Node for MultivalDynamic {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ADE_MultivalDynamic", "Multival 🎭🅐🅓", CATEGORY)
            .float("float_val", 1.0, (0.0, 1e9, 0.001), "The value.")
            .output("MULTIVAL", "MULTIVAL")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let value = inputs.float("float_val")?;
        Ok(Outputs::one(Multival { value }.into_value()))
    }
}

/// The context option nodes, by the schedule they make.
#[derive(Clone, Copy)]
enum ContextKind {
    StandardStatic,
    StandardUniform,
    LoopedUniform,
    /// `ADE_AnimateDiffUniformContextOptions`, the looped uniform schedule of older workflows.
    LegacyUniform,
}

struct ContextOptionsNode(ContextKind);

const FUSE_METHODS: [&str; 3] = ["pyramid", "flat", "overlap-linear"];

impl Node for ContextOptionsNode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let (class, title) = match self.0 {
            ContextKind::StandardStatic => (
                "ADE_StandardStaticContextOptions",
                "Context Options◆Standard Static 🎭🅐🅓",
            ),
            ContextKind::StandardUniform => (
                "ADE_StandardUniformContextOptions",
                "Context Options◆Standard Uniform 🎭🅐🅓",
            ),
            ContextKind::LoopedUniform => (
                "ADE_LoopedUniformContextOptions",
                "Context Options◆Looped Uniform 🎭🅐🅓",
            ),
            ContextKind::LegacyUniform => (
                "ADE_AnimateDiffUniformContextOptions",
                "Context Options [Legacy] 🎭🅐🅓",
            ),
        };
        let mut builder = DescriptorBuilder::new(class, title, &format!("{CATEGORY}/context opts"))
            .int("context_length", 16, 1, 128, "Frames per window.");
        if !matches!(self.0, ContextKind::StandardStatic) {
            builder = builder.int(
                "context_stride",
                1,
                1,
                32,
                "Largest stride level of the uniform schedule.",
            );
        }
        builder = builder.int(
            "context_overlap",
            4,
            0,
            128,
            "Frames shared by neighbouring windows.",
        );
        if matches!(self.0, ContextKind::LegacyUniform) {
            builder = builder.combo("context_schedule", &["uniform"], "The schedule.");
        }
        if matches!(
            self.0,
            ContextKind::LoopedUniform | ContextKind::LegacyUniform
        ) {
            builder = builder.boolean(
                "closed_loop",
                false,
                "Windows also join the last frames to the first.",
            );
        }
        builder
            .optional()
            .combo("fuse_method", &FUSE_METHODS, "How overlapping windows are blended.")
            .boolean("use_on_equal_length", false, "Accepted as AnimateDiff-Evolved has it; a clip exactly one window long is sampled in one pass either way.")
            .float("start_percent", 0.0, (0.0, 1.0, 0.001), "Where in the schedule windows start; vdm windows from the first step, so only 0 is accepted.")
            .int("guarantee_steps", 1, 0, i64::MAX, "Matters only for chained options, which are not supported.")
            .object("prev_context", "CONTEXT_OPTIONS", "Earlier context options to chain (not supported: one set of options per model).")
            .output("CONTEXT_OPTIONS", "CONTEXT_OPTS")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        if inputs.get("prev_context").is_some() {
            return Err(NodeFailure::input(
                "prev_context",
                "chained context options (a schedule that changes during sampling) are not supported; \
                 give the sampler one set of options",
            ));
        }
        if inputs.float_or("start_percent", 0.0)? > 0.0 {
            return Err(NodeFailure::input(
                "start_percent",
                "context windows that start partway through sampling are not supported; use 0",
            ));
        }
        let (schedule, default_fuse, closed_loop) = match self.0 {
            ContextKind::StandardStatic => (ContextSchedule::Static, "pyramid", false),
            ContextKind::StandardUniform => (ContextSchedule::StandardUniform, "pyramid", false),
            ContextKind::LoopedUniform | ContextKind::LegacyUniform => (
                ContextSchedule::Uniform,
                "flat",
                inputs.bool("closed_loop")?,
            ),
        };
        let fuse: ContextFuse = match inputs.get("fuse_method") {
            Some(_) => inputs.string("fuse_method")?,
            None => default_fuse,
        }
        .parse()
        .for_input("fuse_method")?;
        let options = ContextOptions {
            length: inputs.usize("context_length")?,
            overlap: inputs.usize("context_overlap")?,
            stride: match self.0 {
                ContextKind::StandardStatic => 1,
                _ => inputs.usize("context_stride")?,
            },
            closed_loop,
            schedule,
            fuse,
        };
        options.validate().for_input("context_overlap")?;
        Ok(Outputs::one(ContextObject { options }.into_value()))
    }
}

struct SampleSettingsNode;

impl Node for SampleSettingsNode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ADE_AnimateDiffSamplingSettings", "Sample Settings 🎭🅐🅓", CATEGORY)
            .description("How the initial noise is drawn: ComfyUI's single draw, A1111's seed per frame, one frame's noise for all (constant), none (empty), the first window's repeated, or FreeNoise.")
            .int("batch_offset", 0, 0, i64::MAX, "Draws skipped at the start.")
            .combo("noise_type", &NoiseType::NAMES, "The kind of initial noise.")
            .combo("seed_gen", &SeedGeneration::NAMES, "How the seed becomes noise ([gpu]: drawn on the CPU here).")
            .int("seed_offset", 0, i64::MIN, i64::MAX, "Added to the sampler's seed.")
            .optional()
            .object("iteration_opts", "ITERATION_OPTS", "FreeInit passes.")
            // A socket only, as AnimateDiff-Evolved's `forceInput` INT.
            .object("seed_override", "INT", "A seed used instead of the sampler's.")
            .boolean("adapt_denoise_steps", false, "Not supported beyond its default (false).")
            .output("SAMPLE_SETTINGS", "settings")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        if inputs.bool_or("adapt_denoise_steps", false)? {
            return Err(NodeFailure::input(
                "adapt_denoise_steps",
                "adapting the step count to denoise is not supported; set it to false",
            ));
        }
        let seed_override = match inputs.get("seed_override") {
            Some(_) => Some(inputs.int("seed_override")? as u64),
            None => None,
        };
        let noise = NoiseSettings {
            noise_type: inputs
                .string("noise_type")?
                .parse()
                .for_input("noise_type")?,
            seed_generation: inputs.string("seed_gen")?.parse().for_input("seed_gen")?,
            seed_offset: inputs.int("seed_offset")?,
            batch_offset: inputs.usize("batch_offset")?,
            seed_override,
        };
        let iterations = inputs.optional_object::<IterationOptions>("iteration_opts")?;
        Ok(Outputs::one(
            SampleSettings { noise, iterations }.into_value(),
        ))
    }
}

struct IterationOptsFreeInit;

impl Node for IterationOptsFreeInit {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ADE_IterationOptsFreeInit", "FreeInit Iteration Options 🎭🅐🅓", &format!("{CATEGORY}/iteration opts"))
            .description("FreeInit for ComfyUI's samplers: after each pass the result is diffused back and its low frequencies kept, with fresh high-frequency noise.")
            .int("iterations", 2, 1, i64::MAX, "Sampling passes in all.")
            .combo("filter", &["gaussian", "butterworth", "ideal", "box"], "The low-pass filter.")
            .float("d_s", 0.25, (0.0, 1.0, 0.001), "Spatial stop frequency.")
            .float("d_t", 0.25, (0.0, 1.0, 0.001), "Temporal stop frequency.")
            .int("n_butterworth", 4, 1, 100, "Butterworth order.")
            .int("sigma_step", 999, 1, 999, "Timestep whose noise level the result is diffused to.")
            .boolean("apply_to_1st_iter", false, "Re-initialise before the first pass too.")
            .combo("init_type", &ComfyReinit::NAMES, "How the result is diffused back.")
            .optional()
            .int("iter_batch_offset", 0, 0, i64::MAX, "Batch offset of the fresh noise, per pass.")
            .int("iter_seed_offset", 1, i64::MIN, i64::MAX, "Seed offset of the fresh noise, per pass.")
            .output("ITERATION_OPTS", "ITERATION_OPTS")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let config = FreeInitConfig {
            iterations: inputs.usize("iterations")?,
            filter: inputs.string("filter")?.parse().for_input("filter")?,
            order: inputs.usize("n_butterworth")? as u32,
            spatial_stop_frequency: inputs.float("d_s")?,
            temporal_stop_frequency: inputs.float("d_t")?,
            fast_sampling: false,
        };
        let options = IterationOptions {
            config,
            reinit: inputs.string("init_type")?.parse().for_input("init_type")?,
            sigma_step: inputs.usize("sigma_step")?,
            apply_to_first: inputs.bool("apply_to_1st_iter")?,
            iter_batch_offset: inputs.usize_or("iter_batch_offset", 0)?,
            iter_seed_offset: match inputs.get("iter_seed_offset") {
                Some(_) => inputs.int("iter_seed_offset")?,
                None => 1,
            },
        };
        Ok(Outputs::one(options.into_value()))
    }
}

/// `ADE_PromptScheduling` (its length from the keyframes or `max_length`) and
/// `ADE_PromptSchedulingLatents` (its length from the latents, which it passes on).
struct PromptScheduling {
    with_latents: bool,
}

impl Node for PromptScheduling {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let (class, title) = if self.with_latents {
            (
                "ADE_PromptSchedulingLatents",
                "Prompt Scheduling [Latents] 🎭🅐🅓",
            )
        } else {
            ("ADE_PromptScheduling", "Prompt Scheduling 🎭🅐🅓")
        };
        let mut builder = DescriptorBuilder::new(class, title, &format!("{CATEGORY}/scheduling"))
            .description("Prompt travel: a prompt per keyframe (\"0\": \"a cat\", \"8\": \"a dog\"), blended into one text embedding per frame. Feed the CONDITIONING to KSampler.")
            .text("prompts", "", "The schedule: \"index\": \"prompt\" entries, or index = \"prompt\".")
            .object("clip", "CLIP", "The text encoder.");
        if self.with_latents {
            builder = builder.object(
                "latent",
                "LATENT",
                "The latents, whose frame count is the schedule's length.",
            );
        }
        builder = builder
            .optional()
            // Sockets only, as AnimateDiff-Evolved's `forceInput` strings.
            .object("prepend_text", "STRING", "Text put before every prompt.")
            .object("append_text", "STRING", "Text put after every prompt.")
            .boolean(
                "print_schedule",
                false,
                "Report each frame's prompt in the node's output.",
            );
        if !self.with_latents {
            builder = builder.int(
                "max_length",
                0,
                0,
                i64::MAX,
                "Frames of the schedule (0: up to the last keyframe).",
            );
        }
        builder = builder.combo(
            "tensor_interp",
            &Blend::NAMES,
            "How neighbouring prompts are blended.",
        );
        builder = builder.output("CONDITIONING", "CONDITIONING");
        if self.with_latents {
            builder = builder.output("LATENT", "LATENT");
        }
        builder.build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let clip: Clip = inputs.object("clip")?;
        let latent = if self.with_latents {
            Some(inputs.object::<Latent>("latent")?)
        } else {
            None
        };
        let text = inputs.string("prompts")?;
        let frames = match &latent {
            Some(latent) => {
                let (videos, _, frames, _, _) = latent.samples.dims5().for_input("latent")?;
                videos * frames
            }
            None => inputs.usize_or("max_length", 0)?,
        };
        let keyframes = parse_schedule(text, frames).for_input("prompts")?;
        let frames = if frames == 0 {
            keyframes.last().map_or(1, |k| k.frame + 1)
        } else {
            frames
        };
        let optional_text = |name: &str| -> Result<String, NodeFailure> {
            match inputs.get(name) {
                Some(_) => Ok(inputs.string(name)?.to_owned()),
                None => Ok(String::new()),
            }
        };
        let (prepend, append) = (
            optional_text("prepend_text")?,
            optional_text("append_text")?,
        );
        let keyframes: Vec<Keyframe> = keyframes
            .into_iter()
            .map(|k| Keyframe {
                prompt: with_affixes(&k.prompt, &prepend, &append),
                ..k
            })
            .collect();
        let blend: Blend = match inputs.get("tensor_interp") {
            Some(_) => inputs
                .string("tensor_interp")?
                .parse()
                .for_input("tensor_interp")?,
            None => Blend::Lerp,
        };
        let mut dropped = Vec::new();
        let embeddings = frame_embeddings(&keyframes, frames, blend, |prompt| {
            let (embedding, names) = encode_prompt(&clip, prompt, "prompts")
                .map_err(|e| candle_core::Error::Msg(e.message))?;
            dropped.extend(names);
            Ok(embedding)
        })
        .for_input("prompts")?;
        let mut ui = serde_json::Map::new();
        if inputs.bool_or("print_schedule", false)? {
            let schedule: Vec<String> = keyframes
                .iter()
                .map(|k| {
                    format!(
                        "{}{} = \"{}\"",
                        k.frame,
                        if k.hold { ":" } else { "" },
                        k.prompt
                    )
                })
                .collect();
            ui.insert("schedule".into(), serde_json::json!(schedule));
        }
        if !dropped.is_empty() {
            ui.insert("dropped_embeddings".into(), serde_json::json!(dropped));
        }
        let mut values = vec![Conditioning {
            embeddings,
            per_frame: true,
        }
        .into_value()];
        if let Some(latent) = latent {
            values.push(latent.into_value());
        }
        Ok(Outputs {
            values,
            ui: (!ui.is_empty()).then_some(serde_json::Value::Object(ui)),
        })
    }
}

struct AnimateDiffLoraLoader;

impl Node for AnimateDiffLoraLoader {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ADE_AnimateDiffLoRALoader", "Load AnimateDiff LoRA 🎭🅐🅓", CATEGORY)
            .description("A motion LoRA (v2_lora_ZoomIn.ckpt, ...) from <models>/animatediff_motion_lora/, merged into the motion model it is given to.")
            .string("name", "", "The motion LoRA file.")
            .float("strength", 1.0, (0.0, 10.0, 0.001), "Multiplier of the LoRA's change.")
            .optional()
            .object("prev_motion_lora", "MOTION_LORA", "Motion LoRAs merged before this one.")
            .string("lora_name", "", "Older workflows' name of `name`; used when given.")
            .output("MOTION_LORA", "MOTION_LORA")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        let input = if inputs.get("lora_name").is_some() {
            "lora_name"
        } else {
            "name"
        };
        super::super::models::check_model(inputs, ctx, input, MOTION_LORA_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let (input, name) = match inputs.get("lora_name") {
            Some(_) if !inputs.string("lora_name")?.is_empty() => {
                ("lora_name", inputs.string("lora_name")?)
            }
            _ => ("name", inputs.string("name")?),
        };
        let path = resolve_model(ctx, input, MOTION_LORA_FOLDERS, name)?;
        let mut list = inputs
            .optional_object::<MotionLoraList>("prev_motion_lora")?
            .unwrap_or_default();
        list.loras.push(MotionLora {
            path,
            strength: inputs.float("strength")?,
        });
        Ok(Outputs::one(list.into_value()))
    }
}
