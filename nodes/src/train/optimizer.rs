//! AdamW with global-norm gradient clipping, as `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_` compute them, over candle `Var`s.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use crate::models::weights::NamedWeights;

/// AdamW's settings; the defaults are PyTorch's, with no clipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the parameters by 1 − lr·weight_decay.
    pub weight_decay: f64,
    /// The largest global 2-norm of all gradients together; larger gradients are scaled down.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: None,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(format!("{name} {beta} is outside [0, 1)"));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return Err(format!("eps {} must be positive", self.eps));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return Err(format!(
                "weight decay {} must not be negative",
                self.weight_decay
            ));
        }
        if let Some(norm) = self.max_grad_norm {
            if norm.is_nan() || norm <= 0.0 {
                return Err(format!("max_grad_norm {norm} must be positive"));
            }
        }
        Ok(())
    }
}

/// One trained parameter and its moment estimates.
struct Parameter {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// What one optimiser step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The global 2-norm of the gradients, before clipping.
    pub grad_norm: f64,
    /// Parameters that got no gradient this step (PyTorch leaves those untouched too).
    pub without_gradient: usize,
}

/// AdamW over named `Var`s; moments and update in the parameters' dtype.
pub struct AdamW {
    config: AdamWConfig,
    parameters: Vec<Parameter>,
    /// Steps taken so far (PyTorch's `state["step"]`).
    steps_taken: u64,
}

impl AdamW {
    /// An optimiser for `parameters` (name, variable), with zero moments.
    pub fn new(parameters: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let parameters = parameters
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Parameter {
                    name,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            parameters,
            steps_taken: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// The parameters' current values by name.
    pub fn parameters(&self) -> NamedWeights {
        self.parameters
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect()
    }

    /// The variables, by name, in the order given.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.parameters.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// One update from `grads` at learning rate `lr`: clip the gradients' global norm, decay,
    /// then Adam's step with bias correction, in `torch.optim.AdamW`'s order of operations.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let gradients: Vec<Option<Tensor>> = self
            .parameters
            .iter()
            .map(|p| grads.get(p.var.as_tensor()).map(Tensor::detach))
            .collect();
        let mut squares = 0f64;
        for g in gradients.iter().flatten() {
            squares += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let grad_norm = squares.sqrt();
        // `clip_grad_norm_`: the factor is clamped to 1 and applied to every gradient.
        let clip = self
            .config
            .max_grad_norm
            .map(|max| (max / (grad_norm + 1e-6)).min(1.0));
        self.steps_taken += 1;
        let t = self.steps_taken as i32;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        let mut without_gradient = 0;
        for (parameter, gradient) in self.parameters.iter_mut().zip(gradients) {
            let Some(mut grad) = gradient else {
                without_gradient += 1;
                continue;
            };
            if let Some(factor) = clip {
                grad = grad.affine(factor, 0.0)?;
            }
            let theta = parameter.var.as_tensor().detach();
            let theta = theta.affine(1.0 - lr * weight_decay, 0.0)?;
            // exp_avg.lerp_(grad, 1 − β1) = exp_avg + (1 − β1)·(grad − exp_avg)
            let exp_avg =
                (&parameter.exp_avg + (&grad - &parameter.exp_avg)?.affine(1.0 - beta1, 0.0)?)?;
            let exp_avg_sq = (parameter.exp_avg_sq.affine(beta2, 0.0)?
                + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denominator = (exp_avg_sq
                .sqrt()?
                .affine(1.0 / bias_correction2_sqrt, 0.0)?
                + eps)?;
            let update = (&exp_avg / denominator)?.affine(step_size, 0.0)?;
            let next = (theta - update)?;
            parameter.var.set(&next)?;
            parameter.exp_avg = exp_avg;
            parameter.exp_avg_sq = exp_avg_sq;
        }
        Ok(StepStats {
            grad_norm,
            without_gradient,
        })
    }

    /// The moment estimates by parameter name: (first, second).
    pub fn moments(&self) -> (NamedWeights, NamedWeights) {
        let first = self
            .parameters
            .iter()
            .map(|p| (p.name.clone(), p.exp_avg.clone()))
            .collect();
        let second = self
            .parameters
            .iter()
            .map(|p| (p.name.clone(), p.exp_avg_sq.clone()))
            .collect();
        (first, second)
    }

    /// Puts back a saved state: parameter values, moments and the step count. Every parameter
    /// must be present with its shape.
    pub fn restore(
        &mut self,
        values: &NamedWeights,
        (first, second): (&NamedWeights, &NamedWeights),
        steps_taken: u64,
    ) -> Result<()> {
        for parameter in &mut self.parameters {
            let name = &parameter.name;
            let find = |table: &NamedWeights, what: &str| -> Result<Tensor> {
                let tensor = table.get(name).ok_or_else(|| {
                    candle_core::Error::Msg(format!("the saved state has no {what} for `{name}`"))
                })?;
                if tensor.dims() != parameter.var.dims() {
                    candle_core::bail!(
                        "the saved {what} of `{name}` has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        parameter.var.dims()
                    )
                }
                tensor.to_device(parameter.var.device())
            };
            parameter
                .var
                .set(&find(values, "value")?.to_dtype(parameter.var.dtype())?)?;
            let dtype = parameter.var.dtype();
            parameter.exp_avg = find(first, "first moment")?.to_dtype(dtype)?;
            parameter.exp_avg_sq = find(second, "second moment")?.to_dtype(dtype)?;
        }
        self.steps_taken = steps_taken;
        Ok(())
    }
}

/// How the learning rate moves over the steps, as diffusers' `get_scheduler` names them: a
/// linear warm-up from 0, then constant or a half cosine down to 0 at the last step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    Constant { warmup_steps: u64 },
    Cosine { warmup_steps: u64, total_steps: u64 },
}

impl LrSchedule {
    pub const NAMES: [&'static str; 2] = ["constant", "cosine"];

    /// The schedule called `name` with `warmup_steps` of `total_steps`.
    pub fn named(
        name: &str,
        warmup_steps: u64,
        total_steps: u64,
    ) -> std::result::Result<Self, String> {
        match name {
            "constant" => Ok(Self::Constant { warmup_steps }),
            "cosine" => Ok(Self::Cosine {
                warmup_steps,
                total_steps,
            }),
            other => Err(format!(
                "unknown learning-rate schedule `{other}` (one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }

    /// The factor on the base learning rate at optimiser step `step` (0 for the first), as
    /// diffusers' `LambdaLR` lambdas compute it.
    pub fn factor(&self, step: u64) -> f64 {
        let warm_up = |warmup_steps: u64| (step as f64) / (warmup_steps.max(1) as f64);
        match *self {
            Self::Constant { warmup_steps } if step < warmup_steps => warm_up(warmup_steps),
            Self::Constant { .. } => 1.0,
            Self::Cosine { warmup_steps, .. } if step < warmup_steps => warm_up(warmup_steps),
            Self::Cosine {
                warmup_steps,
                total_steps,
            } => {
                let progress = (step - warmup_steps) as f64
                    / (total_steps.saturating_sub(warmup_steps).max(1) as f64);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(var: &Var) -> Vec<f64> {
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// `tests/fixtures/adamw`: torch's AdamW and `clip_grad_norm_` on the same gradients.
    #[test]
    fn adamw_with_clipping_matches_torch() -> Result<()> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/adamw/adamw.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let shapes: Vec<Vec<usize>> = serde_json::from_value(fixture["shapes"].clone()).unwrap();
        let vars: Vec<Var> = shapes
            .iter()
            .zip(fixture["start"].as_array().unwrap())
            .map(|(shape, start)| {
                Var::from_tensor(&Tensor::from_vec(
                    floats(start),
                    shape.as_slice(),
                    &Device::Cpu,
                )?)
            })
            .collect::<Result<_>>()?;
        let config = AdamWConfig {
            max_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        };
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone()));
        let mut optimizer = AdamW::new(named.collect(), config)?;
        let lr = fixture["lr"].as_f64().unwrap();
        for (step, expected) in fixture["steps"].as_array().unwrap().iter().enumerate() {
            // A loss whose gradient is the fixture's: Σ p·g.
            let mut loss = Tensor::new(0f64, &Device::Cpu)?;
            for ((var, shape), grad) in vars
                .iter()
                .zip(&shapes)
                .zip(expected["grads"].as_array().unwrap())
            {
                let grad = Tensor::from_vec(floats(grad), shape.as_slice(), &Device::Cpu)?;
                loss = (loss + (var.as_tensor() * grad)?.sum_all()?)?;
            }
            let stats = optimizer.step(&loss.backward()?, lr)?;
            assert_eq!(stats.without_gradient, 0);
            for (var, after) in vars.iter().zip(expected["after"].as_array().unwrap()) {
                for (got, want) in values(var).iter().zip(floats(after)) {
                    assert!(
                        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "step {step}: {got} vs {want}"
                    );
                }
            }
        }
        assert_eq!(optimizer.steps_taken(), 5);
        Ok(())
    }

    #[test]
    fn schedules_follow_diffusers_lambdas() {
        let constant = LrSchedule::named("constant", 4, 100).unwrap();
        assert_eq!(constant.factor(0), 0.0);
        assert_eq!(constant.factor(2), 0.5);
        assert_eq!(constant.factor(4), 1.0);
        assert_eq!(constant.factor(99), 1.0);
        let cosine = LrSchedule::named("cosine", 10, 110).unwrap();
        assert_eq!(cosine.factor(5), 0.5);
        assert_eq!(cosine.factor(10), 1.0);
        assert!((cosine.factor(60) - 0.5).abs() < 1e-12);
        assert!(cosine.factor(110).abs() < 1e-12);
        assert_eq!(LrSchedule::named("constant", 0, 10).unwrap().factor(0), 1.0);
        assert!(LrSchedule::named("linear", 0, 10).is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            AdamWConfig {
                beta1: 1.0,
                ..AdamWConfig::default()
            },
            AdamWConfig {
                eps: 0.0,
                ..AdamWConfig::default()
            },
            AdamWConfig {
                weight_decay: -1.0,
                ..AdamWConfig::default()
            },
            AdamWConfig {
                max_grad_norm: Some(0.0),
                ..AdamWConfig::default()
            },
        ] {
            assert!(AdamW::new(Vec::new(), config).is_err(), "{config:?}");
        }
    }
}
