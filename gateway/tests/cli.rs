//! The `mhv-gateway` binary: its CLI parses, and a bad configuration stops it with MHV-001.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

#[test]
fn help_and_bad_config() {
    let bin = env!("CARGO_BIN_EXE_mhv-gateway");
    assert!(Command::new(bin)
        .arg("--help")
        .output()
        .unwrap()
        .status
        .success());
    let out = Command::new(bin)
        .env("MHV_GATEWAY__LISTEN", "not an address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MHV-001") && err.contains("gateway.listen"),
        "{err}"
    );
}
