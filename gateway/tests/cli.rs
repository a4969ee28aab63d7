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

#[test]
fn an_unset_webhook_secret_variable_stops_the_gateway_with_mhv_001() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[webhooks.sources.github]\nscheme = \"github\"\nsecrets = [{ id = \"s1\", env = \"MAHAVISHNU_TEST_UNSET_SECRET\" }]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mhv-gateway"))
        .arg("--config")
        .arg(&config)
        .env_remove("MAHAVISHNU_TEST_UNSET_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MHV-001") && err.contains("MAHAVISHNU_TEST_UNSET_SECRET"),
        "{err}"
    );
}
