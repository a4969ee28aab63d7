//! One git worktree per attempt: created detached at a ref of a configured repository, removed
//! afterwards (after failures too), and found again by name so a worker taking over a task can
//! remove the worktree a dead one left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Why git refused.
#[derive(Debug, thiserror::Error)]
#[error("git {action} failed: {detail}")]
pub struct WorktreeError {
    /// What we asked git to do.
    pub action: &'static str,
    /// git's own words (stderr, trimmed), or the spawn error.
    pub detail: String,
}

/// The worktree directory of an attempt: `{root}/{name}`. `name` must be a plain file name
/// (callers derive it from the task id and attempt number).
pub fn path_for(root: &Path, name: &str) -> Option<PathBuf> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    ok.then(|| root.join(name))
}

/// Longest a git bookkeeping command may take (a repository on a stuck mount must not hold the
/// repository's worktree lock for ever).
const GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

async fn git(repo: &Path, args: &[&str], action: &'static str) -> Result<String, WorktreeError> {
    let out = tokio::time::timeout(
        GIT_TIMEOUT,
        tokio::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| WorktreeError {
        action,
        detail: format!("git did not finish within {} s", GIT_TIMEOUT.as_secs()),
    })?
    .map_err(|e| WorktreeError {
        action,
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(WorktreeError {
            action,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Creates a detached worktree of `repo` at `git_ref` in `path`. A stale worktree at the same
/// path (left by a crashed attempt) is removed first.
pub async fn create(repo: &Path, path: &Path, git_ref: &str) -> Result<(), WorktreeError> {
    if git_ref.starts_with('-') {
        return Err(WorktreeError {
            action: "worktree add",
            detail: format!("refusing ref {git_ref:?}"),
        });
    }
    if path.exists() || is_registered(repo, path).await? {
        remove(repo, path).await?;
    }
    let p = path.to_string_lossy();
    git(
        repo,
        &["worktree", "add", "--detach", "--force", "--", &p, git_ref],
        "worktree add",
    )
    .await?;
    Ok(())
}

/// Removes the worktree at `path` (forcing: an attempt may leave changes behind) and prunes
/// git's bookkeeping. Removing one that does not exist is not an error.
pub async fn remove(repo: &Path, path: &Path) -> Result<(), WorktreeError> {
    let p = path.to_string_lossy();
    if is_registered(repo, path).await? {
        git(
            repo,
            &["worktree", "remove", "--force", "--force", "--", &p],
            "worktree remove",
        )
        .await?;
    }
    if path.exists() {
        tokio::fs::remove_dir_all(path)
            .await
            .map_err(|e| WorktreeError {
                action: "worktree remove",
                detail: e.to_string(),
            })?;
    }
    git(repo, &["worktree", "prune"], "worktree prune").await?;
    Ok(())
}

/// True when git lists `path` among `repo`'s worktrees.
pub async fn is_registered(repo: &Path, path: &Path) -> Result<bool, WorktreeError> {
    let list = git(repo, &["worktree", "list", "--porcelain"], "worktree list").await?;
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(list
        .lines()
        .filter_map(|l| l.strip_prefix("worktree "))
        .any(|w| Path::new(w) == path || Path::new(w) == want))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn repo_with_commit(dir: &Path) -> PathBuf {
        let repo = dir.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        for args in [
            vec!["init", "-q", "-b", "main"],
            vec!["config", "user.email", "t@example.invalid"],
            vec!["config", "user.name", "t"],
        ] {
            git(&repo, &args, "setup").await.unwrap();
        }
        std::fs::write(repo.join("README"), "hello\n").unwrap();
        git(&repo, &["add", "README"], "setup").await.unwrap();
        git(&repo, &["commit", "-q", "-m", "first"], "setup")
            .await
            .unwrap();
        repo
    }

    #[tokio::test]
    async fn a_worktree_is_created_at_the_ref_and_removed_with_its_changes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_commit(dir.path()).await;
        let root = dir.path().join("worktrees");
        let wt = path_for(&root, "task-1-attempt-1").unwrap();
        create(&repo, &wt, "main").await.unwrap();
        assert_eq!(
            std::fs::read_to_string(wt.join("README")).unwrap(),
            "hello\n"
        );
        assert!(is_registered(&repo, &wt).await.unwrap());
        std::fs::write(wt.join("scratch"), "left behind").unwrap();
        remove(&repo, &wt).await.unwrap();
        assert!(!wt.exists());
        assert!(!is_registered(&repo, &wt).await.unwrap());
        // Removing again is fine.
        remove(&repo, &wt).await.unwrap();
    }

    #[tokio::test]
    async fn a_stale_worktree_is_replaced_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_commit(dir.path()).await;
        let wt = path_for(&dir.path().join("wt"), "t-2").unwrap();
        create(&repo, &wt, "main").await.unwrap();
        std::fs::write(wt.join("stale"), "from a dead worker").unwrap();
        create(&repo, &wt, "main").await.unwrap();
        assert!(
            !wt.join("stale").exists(),
            "the stale worktree was replaced"
        );
        let e = create(&repo, &dir.path().join("wt/x"), "no-such-ref")
            .await
            .unwrap_err();
        assert!(e.detail.contains("no-such-ref") || !e.detail.is_empty());
        assert!(create(&repo, &dir.path().join("wt/y"), "--orphan")
            .await
            .is_err());
        assert!(path_for(Path::new("/w"), "../escape").is_none());
        assert!(path_for(Path::new("/w"), "a/b").is_none());
        assert!(path_for(Path::new("/w"), ".hidden").is_none());
    }
}
