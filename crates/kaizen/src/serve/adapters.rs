//! The adapters a server holds at once, by name, each in its own slot: its per-layer
//! [`LinearAdapter`]s (behind a [`Routed`] layer on each frozen linear layer any adapter
//! touches) and, for the prompt-learning methods, its virtual tokens or prefix, which the
//! engine puts on the model for the prefill of that adapter's sequences only (decoding then
//! rides along in the shared batch: the prefix and virtual tokens live in the row's KV cache).
//! Loading and unloading happen between decoding steps, without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::routed::{Routed, SharedRoute};
use crate::models::VirtualTokens;
use crate::nn::LinearAdapter;
use crate::{Error, Model, Result};

/// One loaded adapter.
pub struct Entry {
    pub name: String,
    pub slot: usize,
    pub dir: PathBuf,
    /// The method, e.g. "LORA", "LORA (DoRA)", "PREFIX_TUNING".
    pub label: String,
    layers: Vec<(String, Arc<dyn LinearAdapter>)>,
    pub(super) virtual_tokens: Option<VirtualTokens>,
    pub(super) prefix: Option<VirtualTokens>,
}

/// Every loaded adapter and the route their layers read.
pub struct Adapters {
    pub route: SharedRoute,
    entries: Vec<Entry>,
    next_slot: usize,
}

impl Adapters {
    pub fn new(route: SharedRoute) -> Self {
        Adapters {
            route,
            entries: vec![],
            next_slot: 0,
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub(super) fn by_slot_mut(&mut self, slot: usize) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.slot == slot)
    }

    /// Loads the PEFT adapter directory `dir` (any method kaizen loads) as `name`. On failure
    /// the model is left as it was.
    pub fn load(&mut self, model: &mut Model, name: &str, dir: &Path) -> Result<()> {
        if self.get(name).is_some() {
            return Err(Error::Input(format!(
                "an adapter named \"{name}\" is already loaded; unload it first"
            )));
        }
        let (config, _) = crate::checkpoint::adapter::read(dir)?;
        if config.get("peft_type").and_then(|v| v.as_str()) == Some("LN_TUNING") {
            return Err(Error::Input(format!(
                "{}: an LN-tuning adapter replaces the base model's norms, which every request \
                 shares; merge it (kaizen merge) and serve the merged model",
                dir.display()
            )));
        }
        self.detach(model);
        let loaded = crate::tuners::load_adapter(model, dir);
        let mut layers = vec![];
        for (path, lin) in model.linears_mut() {
            if let Some(a) = lin.adapter.take() {
                layers.push((path, Arc::from(a)));
            }
        }
        let (virtual_tokens, prefix) = (model.virtual_tokens.take(), model.prefix.take());
        let result = loaded.map(|info| {
            self.entries.push(Entry {
                name: name.to_string(),
                slot: self.next_slot,
                dir: dir.to_path_buf(),
                label: info.method.label(),
                layers,
                virtual_tokens,
                prefix,
            });
            self.next_slot += 1;
        });
        self.attach(model);
        result
    }

    /// Unloads the adapter `name`.
    pub fn unload(&mut self, model: &mut Model, name: &str) -> Result<()> {
        let i = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| Error::Input(format!("no adapter named \"{name}\" is loaded")))?;
        self.entries.remove(i);
        self.detach(model);
        self.attach(model);
        Ok(())
    }

    /// Takes every routed layer off the model (the entries keep their adapters).
    fn detach(&self, model: &mut Model) {
        for (_, lin) in model.linears_mut() {
            lin.adapter = None;
        }
    }

    /// Puts a routed layer on every linear layer some entry adapts.
    fn attach(&self, model: &mut Model) {
        for (path, lin) in model.linears_mut() {
            let adapters: Vec<_> = self
                .entries
                .iter()
                .flat_map(|e| {
                    e.layers
                        .iter()
                        .filter(|(p, _)| *p == path)
                        .map(|(_, a)| (e.slot, a.clone()))
                })
                .collect();
            if !adapters.is_empty() {
                lin.adapter = Some(Box::new(Routed {
                    adapters,
                    route: self.route.clone(),
                }));
            }
        }
    }
}
