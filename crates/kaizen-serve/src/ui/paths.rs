//! Confinement: every path a request names is canonicalized (symbolic links and `..` resolved)
//! and must lie under `--runs` or one of the model/data roots; anything else is a 403.

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use kaizen::{Error, Result};

use super::ApiResult;
use crate::api::ApiError;

/// The directories the page may reach, canonical.
pub struct Roots {
    pub runs: PathBuf,
    pub models: Vec<PathBuf>,
    pub data: Vec<PathBuf>,
}

/// What kind of file a request names, and so which roots hold it.
#[derive(Clone, Copy)]
pub enum Kind {
    Model,
    Data,
}

impl Roots {
    pub fn new(runs: &Path, models: &[PathBuf], data: &[PathBuf]) -> Result<Roots> {
        std::fs::create_dir_all(runs.join(super::jobs::UI_DIR)).map_err(|e| {
            Error::Input(format!(
                "--runs {}: cannot create the directory ({e})",
                runs.display()
            ))
        })?;
        let canon = |flag: &str, p: &Path| {
            p.canonicalize().map_err(|e| {
                Error::Input(format!(
                    "{flag} {}: {e}; give an existing directory",
                    p.display()
                ))
            })
        };
        let all = |flag: &str, ps: &[PathBuf]| -> Result<Vec<PathBuf>> {
            ps.iter().map(|p| canon(flag, p)).collect()
        };
        Ok(Roots {
            runs: canon("--runs", runs)?,
            models: all("--model-root", models)?,
            data: all("--data-root", data)?,
        })
    }

    /// The roots that may hold a file of this kind: its own, and the runs (a full fine-tune's
    /// model, a run's data copy).
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &PathBuf> {
        let own = match kind {
            Kind::Model => &self.models,
            Kind::Data => &self.data,
        };
        own.iter().chain(std::iter::once(&self.runs))
    }

    /// An existing file or directory the request names, if it lies under a root of its kind.
    pub fn file(&self, kind: Kind, field: &str, given: &str) -> ApiResult<PathBuf> {
        let p = Path::new(given).canonicalize().map_err(|e| {
            ApiError::param(field, format!("{field} {}: {e}", kaizen_data::quote(given)))
        })?;
        if self.of(kind).any(|r| p.starts_with(r)) {
            return Ok(p);
        }
        let roots: Vec<String> = self.of(kind).map(|r| r.display().to_string()).collect();
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{field} {}: outside the directories this page may use ({}); start kaizen ui with --model-root or --data-root to add one",
                kaizen_data::quote(given),
                roots.join(", ")
            ),
        )
        .code("outside_roots"))
    }

    /// The directory of the run `name` under `--runs` (it need not exist yet). A name is one or
    /// two parts (`cmp/lora`: a method of a comparison) of letters, digits and `._-`, not
    /// starting with a dot.
    pub fn run_dir(&self, name: &str) -> ApiResult<PathBuf> {
        let parts: Vec<&str> = name.split('/').collect();
        let ok = name.len() <= 128
            && parts.len() <= 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && !p.starts_with('.')
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            });
        if !ok {
            return Err(ApiError::param(
                "name",
                format!(
                    "run name {}: use letters, digits, '.', '_' and '-' (not starting with '.')",
                    kaizen_data::quote(name)
                ),
            ));
        }
        let dir = self.runs.join(name);
        // A symbolic link inside --runs must not lead out of it.
        match dir.canonicalize() {
            Ok(c) if !c.starts_with(&self.runs) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("run {}: leads outside --runs", kaizen_data::quote(name)),
            )),
            _ => Ok(dir),
        }
    }

    /// An existing run directory.
    pub fn existing_run(&self, name: &str) -> ApiResult<PathBuf> {
        let dir = self.run_dir(name)?;
        if dir.join("run.json").is_file() || dir.join("report.json").is_file() {
            return Ok(dir);
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no run {} under --runs", kaizen_data::quote(name)),
        ))
    }
}

/// Calls `f` on every entry under `root`, `depth` levels down, skipping hidden names.
pub fn walk(root: &Path, depth: usize, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    paths.sort();
    for p in paths {
        f(&p);
        if depth > 1 && p.is_dir() {
            walk(&p, depth - 1, f);
        }
    }
}
