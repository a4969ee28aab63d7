//! PostgreSQL for local use: a fresh, migrated database per test, and a throwaway cluster for
//! `mhv up` when nothing answers at the configured address.

use super::{send_signal, terminate};
use anyhow::{bail, Context as _};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The server URL tests use: `$MHV_TEST_DATABASE_URL`, default the local trust-auth server.
pub fn admin_url() -> String {
    std::env::var("MHV_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh database with every migration applied, dropped on drop.
#[derive(Debug)]
pub struct TestDatabase {
    /// Its name.
    pub name: String,
    /// URL of the database.
    pub url: String,
    admin: String,
}

impl TestDatabase {
    /// Creates and migrates `mhv_test_<random>` on the server at [`admin_url`].
    pub async fn create() -> anyhow::Result<Self> {
        let admin = admin_url();
        let name = format!("mhv_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.with_context(|| {
            // The URL may hold a password: name only the host.
            format!(
                "connecting to PostgreSQL at {} (set MHV_TEST_DATABASE_URL)",
                crate::cli::up::host_port(&admin, 5432).unwrap_or_default()
            )
        })?;
        conn.execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
            .await?;
        conn.close().await?;
        let url = replace_db(&admin, &name);
        let pool = PgPool::connect(&url).await?;
        crate::db::MIGRATOR.run(&pool).await?;
        pool.close().await;
        Ok(Self { name, url, admin })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop runs inside or outside a runtime; a short-lived thread with its own runtime works in both.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut c) = PgConnection::connect(&admin).await {
                        let _ = c
                            .execute(
                                format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)
                                    .as_str(),
                            )
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Replaces the database name in a `postgres://` URL.
pub fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A throwaway PostgreSQL cluster (initdb + postgres) listening on 127.0.0.1. Stopped on drop.
#[derive(Debug)]
pub struct LocalCluster {
    child: Option<Child>,
    /// Port it listens on.
    pub port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
}

impl LocalCluster {
    /// Initialises `data_dir` if empty and starts the server with trust auth for `postgres`.
    /// As root, runs the server as the `postgres` system user (PostgreSQL refuses root).
    pub fn start(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let initdb = find_pg_bin("initdb")?;
        let postgres = find_pg_bin("postgres")?;
        let as_root = running_as_root();
        let wrap = |bin: &Path| -> Command {
            if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin);
                c
            } else {
                Command::new(bin)
            }
        };
        std::fs::create_dir_all(data_dir)?;
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(data_dir)
                .status()?;
            if !status.success() {
                bail!(
                    "running as root needs a `postgres` system user to own {}",
                    data_dir.display()
                );
            }
        }
        if !data_dir.join("PG_VERSION").exists() {
            let out = wrap(&initdb)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
                .arg(data_dir)
                .output()
                .context("running initdb")?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let child = wrap(&postgres)
            .arg("-D")
            .arg(data_dir)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting postgres")?;
        let mut c = Self {
            child: Some(child),
            port,
            data_dir: data_dir.to_owned(),
        };
        if !super::wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(30)) {
            c.stop();
            bail!("postgres did not start on port {port}");
        }
        Ok(c)
    }

    /// Fast shutdown.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT is PostgreSQL's "fast" shutdown; runuser forwards it.
            if let Ok(pid) = i32::try_from(c.id()) {
                send_signal(pid, libc::SIGINT);
            }
            terminate(&mut c, Duration::from_secs(10));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn find_pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("no `{name}` on PATH or under /usr/lib/postgresql/*/bin"))
}

#[cfg(test)]
mod tests {
    use super::replace_db;

    #[test]
    fn replaces_database_name() {
        assert_eq!(
            replace_db("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            replace_db("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(replace_db("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
