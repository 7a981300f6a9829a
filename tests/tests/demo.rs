//! `scoretap demo`: embedded scoring endpoint + proxy, a few requests, a summary, exit 0.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use scoretap_tests::process::run_cli;

#[test]
fn demo_runs_and_reports_requests() {
    let store = scoretap_tests::util::TempDir::new("demo-store");
    let url = format!("file://{}", store.path().display());
    let o = run_cli(&["demo", "--store", &url], &[], Duration::from_secs(90));
    assert_eq!(
        o.code(),
        Some(0),
        "scoretap demo failed\nstdout: {}\nstderr: {}",
        o.stdout,
        o.stderr
    );
    let out = o.stdout.to_lowercase();
    assert!(
        !out.trim().is_empty(),
        "demo printed nothing on stdout; stderr: {}",
        o.stderr
    );
    assert!(
        out.contains("request"),
        "demo summary should mention the requests: {}",
        o.stdout
    );
    assert!(
        out.contains("200") && out.contains("/score"),
        "demo summary should show the scoring requests and their statuses: {}",
        o.stdout
    );
}

/// The demo writes to a store of its own (a new directory under the temporary directory, named in
/// its summary), never into `./scoretap-data` where a real run's records go, and its hints name a
/// command that works without scoretap on PATH.
#[test]
fn demo_records_go_to_a_store_of_its_own() {
    let o = run_cli(&["demo"], &[], Duration::from_secs(90));
    assert_eq!(o.code(), Some(0), "stderr: {}", o.stderr);
    let temp = std::env::temp_dir();
    let prefix = format!("file://{}", temp.join("scoretap-demo-").display());
    let url = o
        .stdout
        .split_whitespace()
        .find(|word| word.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no store under {prefix} named: {}", o.stdout))
        .to_owned();
    let directory = std::path::PathBuf::from(url.trim_start_matches("file://"));
    let traces = scoretap_tests::traces::walk(&directory.join("traces"));
    assert!(
        traces
            .iter()
            .any(|path| path.to_string_lossy().ends_with(".jsonl")),
        "no trace batch in {}",
        directory.display()
    );
    assert!(
        !o.stdout.contains("file://./scoretap-data"),
        "the demo wrote into run's default store: {}",
        o.stdout
    );
    assert!(
        o.stdout.contains(" traces --store "),
        "the hints say how to query the records: {}",
        o.stdout
    );
    std::fs::remove_dir_all(&directory).ok();
}
