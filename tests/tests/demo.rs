//! `scoretap demo`: embedded scoring endpoint + proxy, a few requests, a summary, exit 0.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use scoretap_tests::process::run_cli;

#[test]
fn demo_runs_and_reports_requests() {
    let o = run_cli(&["demo"], &[], Duration::from_secs(90));
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
