//! The output directory of a training run: one writer at a time, and no leftovers of a run that
//! was killed.
//!
//! A run holds an exclusive advisory lock (`flock` on Unix, through `std::fs::File::try_lock`)
//! on `OUT/.kaizen.lock` for as long as it lives; a second run on the same directory is refused.
//! The lock belongs to the open file, so it ends with the process however the process ends: a
//! crash leaves no stale lock, only the empty file, which the next run locks again.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The lock file inside an output directory.
pub const LOCK_FILE: &str = ".kaizen.lock";

/// Held for the life of a run; dropping it releases the directory.
#[derive(Debug)]
pub struct OutDirLock {
    _file: File,
    dir: PathBuf,
}

impl OutDirLock {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Creates `out` if needed, locks it for this run, and removes what a killed run left behind
/// (temporary files and checkpoint directories, see [`is_leftover`]).
pub fn lock(out: &Path) -> Result<OutDirLock> {
    if out.exists() && !out.is_dir() {
        return Err(Error::Input(format!(
            "--out {}: this is a file, not a directory; give a directory for the run (it is \
             created if missing) or move the file away",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| {
        Error::Input(format!(
            "--out {}: cannot create the directory ({e}); check that every part of the path is \
             a directory you can write to",
            out.display()
        ))
    })?;
    let path = out.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(Error::Input(format!(
                "--out {}: another kaizen run is writing to this directory (it holds {LOCK_FILE}); \
                 wait for it to finish, or give another --out",
                out.display()
            )))
        }
        Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    remove_leftovers(out)?;
    Ok(OutDirLock {
        _file: file,
        dir: out.to_path_buf(),
    })
}

/// A file or directory that only a write in progress has: `NAME.tmp` (an atomic write,
/// `.checkpoint-N.tmp`) or `.NAME.PID.tmp.png` (a chart being drawn).
pub fn is_leftover(name: &str) -> bool {
    name.ends_with(".tmp") || (name.starts_with('.') && name.ends_with(".tmp.png"))
}

/// Removes leftovers in `out` and inside its `checkpoint-N` directories.
fn remove_leftovers(out: &Path) -> Result<()> {
    for entry in read_dir(out)? {
        let (path, name) = entry;
        if is_leftover(&name) {
            remove(&path)?;
        } else if name.starts_with("checkpoint-") && path.is_dir() {
            for (inner, inner_name) in read_dir(&path)? {
                if is_leftover(&inner_name) {
                    remove(&inner)?;
                }
            }
        }
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries
        .map(|e| {
            let e = e.map_err(|err| Error::io(dir, err))?;
            Ok((e.path(), e.file_name().to_string_lossy().into_owned()))
        })
        .collect()
}

fn remove(path: &Path) -> Result<()> {
    let done = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    done.map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let first = lock(&out).unwrap();
        let err = lock(&out).unwrap_err().to_string();
        assert!(
            err.contains(&out.display().to_string()) && err.contains("another kaizen run"),
            "{err}"
        );
        drop(first);
        lock(&out).unwrap();
    }

    #[test]
    fn leftovers_of_a_killed_run_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        for dir in [".checkpoint-4.tmp", "checkpoint-2"] {
            std::fs::create_dir(out.join(dir)).unwrap();
        }
        for file in [
            ".checkpoint-4.tmp/adapter_model.safetensors",
            ".loss.png.1234.tmp.png",
            "metrics.jsonl.tmp",
            "metrics.jsonl",
            "checkpoint-2/adapter_model.safetensors",
            "checkpoint-2/trainer_state.json.tmp",
            "notes.txt",
        ] {
            std::fs::write(out.join(file), b"x").unwrap();
        }
        let _lock = lock(out).unwrap();
        let mut left: Vec<String> = walk(out);
        left.sort();
        assert_eq!(
            left,
            [
                ".kaizen.lock",
                "checkpoint-2",
                "checkpoint-2/adapter_model.safetensors",
                "metrics.jsonl",
                "notes.txt"
            ]
        );
    }

    #[test]
    fn a_file_given_as_the_directory_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("run.txt");
        std::fs::write(&file, b"x").unwrap();
        for out in [file.clone(), file.join("run")] {
            let err = lock(&out).unwrap_err().to_string();
            assert!(
                err.contains(&out.display().to_string()) && !err.contains('\n'),
                "{err}"
            );
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for (path, name) in read_dir(dir).unwrap() {
            out.push(name.clone());
            if path.is_dir() {
                out.extend(walk(&path).into_iter().map(|n| format!("{name}/{n}")));
            }
        }
        out
    }
}
