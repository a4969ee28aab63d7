//! Starting real infrastructure locally: a nats-server with JetStream on a chosen or random port
//! with its own store, and PostgreSQL databases or a throwaway cluster. Used by `mhv up`, by
//! `mhv bench` and by the integration tests; never by production processes.

pub mod nats;
pub mod postgres;

use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True when something accepts TCP connections at `addr`.
pub fn answers(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// Waits until `addr` accepts connections or `timeout` passes.
pub fn wait_for_port(addr: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if answers(addr) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// The repository root when running from a checkout (compile-time path), for finding tools the
/// project installed under `.tools/`.
pub fn checkout_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        send_signal(pid, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends a signal to a process.
pub fn send_signal(pid: i32, signal: i32) {
    // The one place we call into libc: std has no portable way to send SIGTERM/SIGSTOP.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}
