//! Declarative node descriptors: a builder that reads like ComfyUI's `INPUT_TYPES`.

use abi_stable::std_types::{RString, RVec};
use vdm_ffi::{InputKind, InputSpec, NodeDescriptor, OutputSpec};

/// Builds a [`NodeDescriptor`]; inputs are required until [`DescriptorBuilder::optional`].
pub struct DescriptorBuilder {
    descriptor: NodeDescriptor,
    optional: bool,
}

impl DescriptorBuilder {
    pub fn new(class_type: &str, display_name: &str, category: &str) -> Self {
        Self {
            descriptor: NodeDescriptor {
                class_type: class_type.into(),
                display_name: display_name.into(),
                category: category.into(),
                description: RString::new(),
                required: RVec::new(),
                optional: RVec::new(),
                outputs: RVec::new(),
                output_node: false,
            },
            optional: false,
        }
    }

    pub fn description(mut self, text: &str) -> Self {
        self.descriptor.description = text.into();
        self
    }

    /// Inputs added after this call are optional.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    pub fn output_node(mut self) -> Self {
        self.descriptor.output_node = true;
        self
    }

    fn input(mut self, name: &str, kind: InputKind, tooltip: &str) -> Self {
        let spec = InputSpec {
            name: name.into(),
            kind,
            tooltip: tooltip.into(),
        };
        if self.optional {
            self.descriptor.optional.push(spec);
        } else {
            self.descriptor.required.push(spec);
        }
        self
    }

    pub fn int(self, name: &str, default: i64, min: i64, max: i64, tooltip: &str) -> Self {
        self.input(
            name,
            InputKind::Int {
                default,
                min,
                max,
                step: 1,
            },
            tooltip,
        )
    }

    /// A seed: an INT from 0 to 2⁶⁴ − 1, as ComfyUI's seeds (read it with [`super::Inputs::seed`]).
    pub fn seed(self, name: &str, tooltip: &str) -> Self {
        self.input(name, InputKind::unsigned_int(0), tooltip)
    }

    /// An INT edited in steps of `step` (image sizes move in multiples of 8).
    pub fn int_step(
        self,
        name: &str,
        default: i64,
        (min, max, step): (i64, i64, i64),
        tooltip: &str,
    ) -> Self {
        self.input(
            name,
            InputKind::Int {
                default,
                min,
                max,
                step,
            },
            tooltip,
        )
    }

    pub fn float(
        self,
        name: &str,
        default: f64,
        (min, max, step): (f64, f64, f64),
        tooltip: &str,
    ) -> Self {
        self.input(
            name,
            InputKind::Float {
                default,
                min,
                max,
                step,
            },
            tooltip,
        )
    }

    pub fn boolean(self, name: &str, default: bool, tooltip: &str) -> Self {
        self.input(name, InputKind::Boolean { default }, tooltip)
    }

    pub fn string(self, name: &str, default: &str, tooltip: &str) -> Self {
        self.input(
            name,
            InputKind::String {
                default: default.into(),
                multiline: false,
            },
            tooltip,
        )
    }

    pub fn text(self, name: &str, default: &str, tooltip: &str) -> Self {
        self.input(
            name,
            InputKind::String {
                default: default.into(),
                multiline: true,
            },
            tooltip,
        )
    }

    /// A choice among `options`; the first is the default.
    pub fn combo(self, name: &str, options: &[&str], tooltip: &str) -> Self {
        let default = options.first().copied().unwrap_or_default().into();
        let options = options.iter().map(|o| RString::from(*o)).collect();
        self.input(name, InputKind::Combo { options, default }, tooltip)
    }

    /// A choice among `options` whose default is `default` rather than the first.
    pub fn combo_with_default(
        self,
        name: &str,
        options: &[&str],
        default: &str,
        tooltip: &str,
    ) -> Self {
        let options = options.iter().map(|o| RString::from(*o)).collect();
        let default = default.into();
        self.input(name, InputKind::Combo { options, default }, tooltip)
    }

    /// A value produced by another node, of socket type `type_name`.
    pub fn object(self, name: &str, type_name: &str, tooltip: &str) -> Self {
        self.input(
            name,
            InputKind::Object {
                type_name: type_name.into(),
            },
            tooltip,
        )
    }

    pub fn output(mut self, type_name: &str, name: &str) -> Self {
        self.descriptor.outputs.push(OutputSpec {
            type_name: type_name.into(),
            name: name.into(),
        });
        self
    }

    pub fn build(self) -> NodeDescriptor {
        self.descriptor
    }
}
