//! The playground's directory: claimed at start with a `playground.pid` file,
//! removed at stop. A directory that another running playground holds is
//! refused; one left by a playground that crashed (its pid file names a
//! process that is gone) is cleaned, unless processes still use it, which
//! are named instead of killed; anything else that is not empty is refused,
//! so the playground never deletes files it did not make.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use distrocache_tests::procs::{self, ProcessId};

const PID_FILE: &str = "playground.pid";

/// A claimed directory.
#[derive(Debug)]
pub struct Workdir {
    path: PathBuf,
}

/// What claiming found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing, or an empty directory.
    Fresh,
    /// A crashed playground's files, now removed; its pid.
    Stale(u32),
}

impl Workdir {
    /// Claims `path` for this process (see the module docs).
    pub fn claim(path: &Path) -> Result<(Workdir, Found)> {
        let path = std::path::absolute(path)
            .with_context(|| format!("make {} absolute", path.display()))?;
        let found = match Self::previous_owner(&path)? {
            None => Found::Fresh,
            Some(pid) => {
                if let Some(process) = ProcessId::of(pid)
                    && is_playground(process.pid)
                {
                    bail!(
                        "another playground (pid {pid}) is running in {}: stop it \
                         (Ctrl-C in its terminal, or kill {pid}) or give this one another --dir",
                        path.display()
                    );
                }
                let left: Vec<String> = procs::processes_using(&path)
                    .iter()
                    .map(|p| p.pid.to_string())
                    .collect();
                if !left.is_empty() {
                    bail!(
                        "{} holds the files of a playground that did not stop cleanly (pid {pid}), \
                         and processes still use them: stop them (kill {}) and start again",
                        path.display(),
                        left.join(" ")
                    );
                }
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("remove the stale {}", path.display()))?;
                Found::Stale(pid)
            }
        };
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        std::fs::write(path.join(PID_FILE), format!("{}\n", std::process::id()))
            .with_context(|| format!("write {}", path.join(PID_FILE).display()))?;
        Ok((Workdir { path }, found))
    }

    /// The pid in a playground's pid file; `None` for a missing or empty
    /// directory; an error for a directory that is not a playground's.
    fn previous_owner(path: &Path) -> Result<Option<u32>> {
        let mut entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        if entries.next().is_none() {
            return Ok(None);
        }
        let pid_file = path.join(PID_FILE);
        let text = match std::fs::read_to_string(&pid_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} is not empty and is not a playground's directory (no {PID_FILE}): \
                 give the playground a new or empty one with --dir",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("read {}", pid_file.display())),
        };
        match text.trim().parse() {
            Ok(pid) => Ok(Some(pid)),
            Err(_) => bail!(
                "{} holds {text:?}, not a process id: remove {} if no playground uses it",
                pid_file.display(),
                path.display()
            ),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory and everything in it.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.path)
            .with_context(|| format!("remove {}", self.path.display()))
    }
}

/// Whether the process `pid` runs the playground (a pid can be reused by an
/// unrelated process after a crash).
fn is_playground(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline
            .split(|&b| b == 0)
            .next()
            .is_some_and(|program| program.ends_with(b"playground")),
        // Gone meanwhile: not a playground any more.
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_is_claimed_and_removed() {
        let base = tempfile::tempdir().expect("a temporary directory");
        let path = base.path().join("pg");
        let (dir, found) = Workdir::claim(&path).expect("claim");
        assert_eq!(found, Found::Fresh);
        let pid = std::fs::read_to_string(path.join(PID_FILE)).expect("pid file");
        assert_eq!(pid.trim(), std::process::id().to_string());
        dir.remove().expect("remove");
        assert!(!path.exists());
    }

    #[test]
    fn a_crashed_playgrounds_files_are_cleaned() {
        let base = tempfile::tempdir().expect("a temporary directory");
        let path = base.path().join("pg");
        std::fs::create_dir_all(path.join("control-plane/etcd")).expect("mkdir");
        std::fs::write(path.join("control-plane/etcd/db"), "x").expect("write");
        // A pid that is gone: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("run true");
        let dead = child.id();
        child.wait().expect("wait");
        std::fs::write(path.join(PID_FILE), format!("{dead}\n")).expect("write");
        let (dir, found) = Workdir::claim(&path).expect("claim");
        assert_eq!(found, Found::Stale(dead));
        assert!(!path.join("control-plane").exists());
        dir.remove().expect("remove");
    }

    #[test]
    fn a_foreign_directory_is_refused_and_left_alone() {
        let base = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(base.path().join("notes.txt"), "mine").expect("write");
        let e = Workdir::claim(base.path()).expect_err("not a playground's");
        assert!(
            format!("{e:#}").contains("not a playground's directory"),
            "{e:#}"
        );
        assert!(base.path().join("notes.txt").exists());
    }
}
