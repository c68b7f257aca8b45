//! One `zfs get -r` of the root dataset, parsed, and the questions the driver asks of it.

use std::collections::BTreeMap;

use coppice_lifecycle::backend::{LayerId, LayerInfo, LayerKind, SandboxId};

/// The properties read for every dataset and snapshot, in `zfs get` order.
pub(super) const PROPERTIES: &str =
    "type,origin,coppice:state,mountpoint,used,usedbydataset,referenced";

/// The value of `coppice:state` on a complete template, sandbox or snapshot layer.
pub(super) const READY: &str = "ready";
/// The value of `coppice:state` on a removed sandbox kept for its snapshot layers.
pub(super) const RETIRED: &str = "retired";
/// The snapshot of a template dataset that sandboxes are cloned from.
pub(super) const SEALED: &str = "sealed";

/// One dataset or snapshot under the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) name: String,
    pub(super) snapshot: bool,
    pub(super) origin: Option<String>,
    pub(super) state: Option<String>,
    pub(super) mountpoint: Option<String>,
    pub(super) used: u64,
    pub(super) used_by_dataset: u64,
    pub(super) referenced: u64,
}

impl Entry {
    fn is(&self, state: &str) -> bool {
        self.state.as_deref() == Some(state)
    }
}

/// What a layer is in zfs terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layer {
    pub(super) id: LayerId,
    pub(super) kind: LayerKind,
    /// The snapshot sandboxes are cloned from.
    pub(super) snapshot: String,
    /// The dataset holding that snapshot.
    pub(super) dataset: String,
    pub(super) parent: Option<LayerId>,
    pub(super) disk_bytes: u64,
}

impl Layer {
    pub(super) fn info(&self) -> LayerInfo {
        LayerInfo {
            id: self.id.clone(),
            parent: self.parent.clone(),
            kind: self.kind,
            disk_bytes: self.disk_bytes,
        }
    }
}

/// Every dataset and snapshot under the root dataset.
#[derive(Debug, Clone, Default)]
pub(super) struct Inventory {
    root: String,
    entries: BTreeMap<String, Entry>,
}

fn none_if_dash(v: &str) -> Option<String> {
    (v != "-" && !v.is_empty()).then(|| v.to_owned())
}

impl Inventory {
    /// Parses `zfs get -H -p -r -o name,property,value,source <PROPERTIES> <root>`.
    pub(super) fn parse(root: &str, text: &str) -> Self {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for line in text.lines() {
            let mut cols = line.splitn(4, '\t');
            let (Some(name), Some(prop), Some(value), source) =
                (cols.next(), cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            let e = entries.entry(name.to_owned()).or_insert_with(|| Entry {
                name: name.to_owned(),
                ..Entry::default()
            });
            match prop {
                "type" => e.snapshot = value == "snapshot",
                "origin" => e.origin = none_if_dash(value),
                // Snapshots and child datasets inherit user properties: only a mark set on
                // the object itself counts.
                "coppice:state" if source == Some("local") => e.state = none_if_dash(value),
                "mountpoint" => e.mountpoint = none_if_dash(value),
                "used" => e.used = value.parse().unwrap_or(0),
                "usedbydataset" => e.used_by_dataset = value.parse().unwrap_or(0),
                "referenced" => e.referenced = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        Self {
            root: root.to_owned(),
            entries,
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub(super) fn templates_dir(&self) -> String {
        format!("{}/templates", self.root)
    }

    pub(super) fn sandboxes_dir(&self) -> String {
        format!("{}/sandboxes", self.root)
    }

    pub(super) fn retired_dir(&self) -> String {
        format!("{}/retired", self.root)
    }

    /// The direct child name of `entry` under `dir` (`dir/<child>`), if that is what it is.
    fn child<'a>(dir: &str, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(dir)?
            .strip_prefix('/')
            .filter(|c| !c.contains('/') && !c.contains('@'))
    }

    /// Template datasets `templates/<name>`, complete or not.
    pub(super) fn template_datasets(&self) -> impl Iterator<Item = (&str, &Entry)> {
        let dir = self.templates_dir();
        self.entries
            .values()
            .filter_map(move |e| Some((Self::child(&dir, &e.name)?, e)))
    }

    /// Datasets that hold (or held) sandboxes: `sandboxes/<id>` and `retired/<x>`.
    pub(super) fn sandbox_datasets(&self) -> impl Iterator<Item = &Entry> {
        let (live, retired) = (self.sandboxes_dir(), self.retired_dir());
        self.entries.values().filter(move |e| {
            Self::child(&live, &e.name).is_some() || Self::child(&retired, &e.name).is_some()
        })
    }

    /// Snapshots of sandbox datasets, complete or not.
    pub(super) fn sandbox_snapshots(&self) -> impl Iterator<Item = (&Entry, &str)> {
        self.entries.values().filter_map(|e| {
            let (dataset, snap) = e.name.split_once('@')?;
            let holder = self.entries.get(dataset)?;
            let under = Self::child(&self.sandboxes_dir(), &holder.name).is_some()
                || Self::child(&self.retired_dir(), &holder.name).is_some();
            under.then_some((e, snap))
        })
    }

    pub(super) fn sandbox_dataset_name(&self, id: &SandboxId) -> String {
        format!("{}/{id}", self.sandboxes_dir())
    }

    /// A live sandbox's dataset, if complete.
    pub(super) fn sandbox(&self, id: &SandboxId) -> Option<&Entry> {
        self.get(&self.sandbox_dataset_name(id))
            .filter(|e| e.is(READY))
    }

    /// Live sandboxes, sorted.
    pub(super) fn sandboxes(&self) -> Vec<SandboxId> {
        let dir = self.sandboxes_dir();
        self.entries
            .values()
            .filter(|e| e.is(READY))
            .filter_map(|e| SandboxId::new(Self::child(&dir, &e.name)?).ok())
            .collect()
    }

    /// Whether `entry` is a retired sandbox dataset.
    pub(super) fn is_retired(&self, entry: &Entry) -> bool {
        entry.is(RETIRED) || Self::child(&self.retired_dir(), &entry.name).is_some()
    }

    /// The layer `id`, if complete.
    pub(super) fn layer(&self, id: &LayerId) -> Option<Layer> {
        self.layers().into_iter().find(|l| &l.id == id)
    }

    /// Whether any dataset or snapshot, complete or not, already uses the name `id`.
    pub(super) fn name_taken(&self, id: &LayerId) -> bool {
        self.template_datasets().any(|(n, _)| n == id.as_str())
            || self.sandbox_snapshots().any(|(_, s)| s == id.as_str())
    }

    /// Every complete layer, sorted by id.
    pub(super) fn layers(&self) -> Vec<Layer> {
        let mut out = Vec::new();
        for (name, e) in self.template_datasets() {
            let snapshot = format!("{}@{SEALED}", e.name);
            let (Ok(id), true) = (LayerId::new(name), e.is(READY)) else {
                continue;
            };
            if self.entries.contains_key(&snapshot) {
                out.push(Layer {
                    id,
                    kind: LayerKind::Template,
                    snapshot,
                    dataset: e.name.clone(),
                    parent: None,
                    disk_bytes: e.used,
                });
            }
        }
        for (e, snap) in self.sandbox_snapshots() {
            let (Ok(id), true) = (LayerId::new(snap), e.is(READY)) else {
                continue;
            };
            let dataset = e.name.split_once('@').map_or("", |(d, _)| d).to_owned();
            let parent = self
                .entries
                .get(&dataset)
                .and_then(|d| d.origin.as_deref())
                .and_then(|o| self.layer_of_snapshot(o));
            out.push(Layer {
                id,
                kind: LayerKind::Snapshot,
                snapshot: e.name.clone(),
                dataset,
                parent,
                disk_bytes: e.used,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The layer a zfs snapshot name stands for.
    fn layer_of_snapshot(&self, snapshot: &str) -> Option<LayerId> {
        let (dataset, snap) = snapshot.split_once('@')?;
        if snap == SEALED {
            if let Some(t) = Self::child(&self.templates_dir(), dataset) {
                return LayerId::new(t).ok();
            }
        }
        LayerId::new(snap).ok()
    }

    /// Complete layers held by `dataset`.
    pub(super) fn layers_on(&self, dataset: &str) -> Vec<Layer> {
        self.layers()
            .into_iter()
            .filter(|l| l.kind == LayerKind::Snapshot && l.dataset == dataset)
            .collect()
    }

    /// Datasets cloned from `snapshot`.
    pub(super) fn clones_of(&self, snapshot: &str) -> Vec<&Entry> {
        self.entries
            .values()
            .filter(|e| e.origin.as_deref() == Some(snapshot))
            .collect()
    }

    /// Datasets cloned from any snapshot of `dataset`.
    pub(super) fn clones_of_any_snapshot(&self, dataset: &str) -> Vec<&Entry> {
        let prefix = format!("{dataset}@");
        self.entries
            .values()
            .filter(|e| e.origin.as_deref().is_some_and(|o| o.starts_with(&prefix)))
            .collect()
    }

    /// Everything that depends on `layer`, live sandboxes first (`sandbox x`), then layers
    /// (`layer y`), each sorted.
    pub(super) fn dependents(&self, layer: &Layer) -> Vec<String> {
        let mut sandboxes = Vec::new();
        let mut layers = Vec::new();
        let mut pending = vec![layer.snapshot.clone()];
        while let Some(snapshot) = pending.pop() {
            for clone in self.clones_of(&snapshot) {
                if let Some(id) = Self::child(&self.sandboxes_dir(), &clone.name) {
                    if clone.is(READY) {
                        sandboxes.push(format!("sandbox {id}"));
                    }
                }
                let held = self.layers_on(&clone.name);
                if held.is_empty() && !clone.is(READY) {
                    // A clone that is neither a sandbox nor holds layers (left by hand, or
                    // half-made): zfs refuses the destroy, so name it.
                    layers.push(format!("dataset {}", clone.name));
                }
                for l in held {
                    layers.push(format!("layer {}", l.id));
                    pending.push(l.snapshot);
                }
            }
        }
        sandboxes.sort();
        layers.sort();
        sandboxes.extend(layers);
        sandboxes
    }
}
