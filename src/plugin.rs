//! Finding and loading node plugins.
//!
//! A plugin is a dynamic library exporting `vdm_ffi::PluginModRef`. Loading checks, in order:
//! that it is an abi_stable library at all, abi_stable's version and type-layout checks, and
//! our interface-version handshake. A plugin that fails any of them is refused with a short
//! message and the host goes on with the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use vdm_ffi::{NodeDescriptor, PluginModRef, INTERFACE_VERSION};

/// Environment variable with extra plugin folders, separated like `PATH`.
pub const PLUGIN_PATH_VAR: &str = "VDM_PLUGIN_PATH";

/// A plugin that passed the handshake.
#[derive(Clone)]
pub struct Plugin {
    pub name: String,
    pub path: PathBuf,
    pub features: Vec<String>,
    pub module: PluginModRef,
    pub nodes: Vec<NodeDescriptor>,
}

/// Why a plugin was not loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: not a vdm plugin: {reason}")]
    NotAPlugin { path: PathBuf, reason: String },
    #[error("{path}: plugin `{name}` speaks vdm interface version {found}; this host supports version {supported}")]
    InterfaceVersion {
        path: PathBuf,
        name: String,
        found: u32,
        supported: u32,
    },
    #[error("{path}: built against an incompatible vdm-ffi: {reason}")]
    Incompatible { path: PathBuf, reason: String },
}

/// The plugins loaded, with every node they provide, and the plugins refused.
#[derive(Default, Clone)]
pub struct PluginSet {
    pub plugins: Vec<Plugin>,
    pub refused: Vec<PluginError>,
    /// The folders searched for plugins, in order.
    pub searched: Vec<PathBuf>,
    /// class_type → (plugin index, descriptor index). The first plugin to claim a class wins.
    index: BTreeMap<String, (usize, usize)>,
}

impl PluginSet {
    /// Loads every plugin library found in `dirs` (files named like shared libraries) and in the
    /// explicit `files`; the same file is loaded once.
    pub fn load(dirs: &[PathBuf], files: &[PathBuf]) -> Self {
        let mut set = PluginSet {
            searched: dirs.to_vec(),
            ..PluginSet::default()
        };
        let mut seen = std::collections::HashSet::new();
        let candidates = dirs
            .iter()
            .flat_map(|d| libraries_in(d))
            .chain(files.iter().cloned());
        for path in candidates {
            let key = path.canonicalize().unwrap_or_else(|_| path.clone());
            if seen.insert(key) {
                match load_plugin(&path) {
                    Ok(plugin) => set.add(plugin),
                    Err(e) => set.refused.push(e),
                }
            }
        }
        set
    }

    pub fn add(&mut self, plugin: Plugin) {
        let at = self.plugins.len();
        for (i, node) in plugin.nodes.iter().enumerate() {
            self.index
                .entry(node.class_type.to_string())
                .or_insert((at, i));
        }
        self.plugins.push(plugin);
    }

    /// The descriptor and owning plugin of a node class.
    pub fn node(&self, class_type: &str) -> Option<(&Plugin, &NodeDescriptor)> {
        let &(p, n) = self.index.get(class_type)?;
        let plugin = &self.plugins[p];
        Some((plugin, &plugin.nodes[n]))
    }

    /// When no plugin loaded: where the host looked and how to point it at one.
    pub fn none_found(&self) -> Option<String> {
        if !self.plugins.is_empty() {
            return None;
        }
        let searched = if self.searched.is_empty() {
            "no folder".to_owned()
        } else {
            self.searched
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let refused = match self.refused.len() {
            0 => String::new(),
            n => format!(" ({n} refused, see the warnings above)"),
        };
        Some(format!(
            "no vdm plugin loaded{refused}; looked in {searched}. The nodes live in the plugin \
             library (libvdm_nodes.so, vdm_nodes.dll or libvdm_nodes.dylib) that `cargo build \
             --release` puts next to the vdm binary: copy it beside the binary, into a `plugins` \
             folder there, or point --plugins DIR or {PLUGIN_PATH_VAR} at its folder"
        ))
    }

    /// Every node, sorted by class_type.
    pub fn descriptors(&self) -> impl Iterator<Item = &NodeDescriptor> {
        self.index.values().map(|&(p, n)| &self.plugins[p].nodes[n])
    }
}

/// The default plugin folders: `--plugins` folders first, then `VDM_PLUGIN_PATH`, then the
/// folder of the running binary (and its `deps/`, where cargo puts test-built libraries).
pub fn default_dirs(explicit: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = explicit.to_vec();
    if let Some(paths) = std::env::var_os(PLUGIN_PATH_VAR) {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("plugins"));
        dirs.push(exe_dir);
    }
    dirs
}

/// Shared libraries in `dir` whose name says they are vdm plugins (`*vdm*` with the platform's
/// library suffix), so unrelated libraries next to the binary are not opened.
fn libraries_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.contains("vdm") && name.ends_with(std::env::consts::DLL_SUFFIX) && p.is_file()
        })
        .collect();
    found.sort();
    found
}

/// Loads one plugin library and performs the handshake.
pub fn load_plugin(path: &Path) -> Result<Plugin, PluginError> {
    let header = lib_header_from_path(path).map_err(|e| classify(path, e))?;
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| classify(path, e))?;
    let name = module.plugin_name()().into_string();
    let found = module.interface_version()();
    if found != INTERFACE_VERSION {
        return Err(PluginError::InterfaceVersion {
            path: path.to_owned(),
            name,
            found,
            supported: INTERFACE_VERSION,
        });
    }
    let features = module.features()()
        .into_iter()
        .map(|f| f.into_string())
        .collect();
    let nodes = module.nodes()().into_vec();
    Ok(Plugin {
        name,
        path: path.to_owned(),
        features,
        module,
        nodes,
    })
}

/// abi_stable's errors, summarised: a layout mismatch lists every differing field over
/// hundreds of lines, which helps nobody choosing whether to update a plugin.
fn classify(path: &Path, error: LibraryError) -> PluginError {
    let path = path.to_owned();
    match error {
        LibraryError::OpenError { .. } | LibraryError::GetSymbolError { .. } => {
            PluginError::NotAPlugin { path, reason: first_line(&error.to_string()) }
        }
        LibraryError::IncompatibleVersionNumber { library_name, expected_version, actual_version } => {
            PluginError::Incompatible {
                path,
                reason: format!("{library_name} {actual_version}, this host needs {expected_version}"),
            }
        }
        LibraryError::AbiInstability(_) => PluginError::Incompatible {
            path,
            reason: "the layout of the plugin interface differs from this host's (rebuild the plugin against this vdm-ffi)".to_owned(),
        },
        other => PluginError::NotAPlugin { path, reason: first_line(&other.to_string()) },
    }
}

fn first_line(text: &str) -> String {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    line.chars().take(300).collect()
}
