//! Bytes in == bytes out across client protocol × upstream protocol × plain/TLS, for bodies of
//! 0 B, 1 B, 64 KiB and 1 MiB in both directions, plus 100 MB streamed cases and real external
//! clients (curl, httpx).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use scoretap_tests::client::{channel_body, empty};
use scoretap_tests::harness::{client_to, curl, httpx, listener_tls_args, proxy_for};
use scoretap_tests::upstream::BodyOutcome;
use scoretap_tests::util::{pattern, pattern_sha256, sha256_hex, Sha256, TempDir};
use scoretap_tests::*;

const SIZES: [usize; 4] = [0, 1, 64 * 1024, 1 << 20];

async fn combo(client: Proto, upstream: UpstreamProto, client_tls: bool, upstream_tls: bool) {
    let pki = Pki::new();
    let up = if upstream_tls {
        TestUpstream::start_tls(upstream, pki.clone()).await
    } else {
        TestUpstream::start_proto(upstream).await
    };
    let extra: Vec<String> = if client_tls {
        listener_tls_args(&pki)
    } else {
        vec![]
    };
    let extra_ref: Vec<&str> = extra.iter().map(String::as_str).collect();
    let proxy = proxy_for(&up, &extra_ref).await;
    let mut c = client_to(&proxy, client, client_tls.then_some(&pki)).await;
    if client_tls {
        let want: &[u8] = if client == Proto::H2 {
            b"h2"
        } else {
            b"http/1.1"
        };
        assert_eq!(c.alpn.as_deref(), Some(want), "ALPN on the proxy listener");
    }
    let up_version = match upstream {
        UpstreamProto::H2 => http::Version::HTTP_2,
        _ => http::Version::HTTP_11,
    };
    let label =
        format!("client {client:?} tls={client_tls} → upstream {upstream:?} tls={upstream_tls}");

    for size in SIZES {
        // Upload + download through /echo (fixed length).
        let body = pattern(size as u64 * 3, size);
        let tag = format!("/echo?case=fixed-{size}");
        let req = c
            .req("POST", &tag)
            .header("content-type", "application/x-test")
            .header("x-test-case", format!("fixed-{size}"))
            .body(scoretap_tests::client::full(body.clone()))
            .unwrap();
        let r = c.fetch(req, Duration::from_secs(20)).await;
        assert_eq!(
            r.status,
            200,
            "{label}: echo {size}: status; body {:?}",
            r.text()
        );
        assert_eq!(r.version, client.version(), "{label}: response version");
        assert_eq!(r.body.len(), size, "{label}: echo {size}: body length");
        assert!(
            r.body[..] == body[..],
            "{label}: echo {size}: body bytes differ"
        );
        assert_eq!(
            r.header("content-length"),
            Some(size.to_string()),
            "{label}: echo {size}: content-length must be preserved"
        );
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/x-test")
        );
        assert!(
            r.header("x-request-id").is_some(),
            "{label}: x-request-id on the response"
        );
        let rec = up.wait_path(&tag).await;
        assert_eq!(rec.version, up_version, "{label}: upstream protocol");
        assert_eq!(rec.header("x-test-case"), Some(format!("fixed-{size}")));
        assert!(
            rec.header("x-request-id").is_some(),
            "{label}: x-request-id forwarded upstream"
        );
        let st = rec.state();
        assert_eq!(
            st.body_bytes, size as u64,
            "{label}: upstream got all request bytes"
        );
        assert_eq!(st.body_outcome, BodyOutcome::Complete, "{label}");
        if size > 0 {
            assert_eq!(
                rec.header("content-length"),
                Some(size.to_string()),
                "{label}: request content-length must be preserved upstream"
            );
        }

        // Download a generated body (fixed length and streamed without length).
        for chunked in [false, true] {
            let path = format!("/bytes?size={size}&chunked={}", u8::from(chunked));
            let r = c
                .fetch(
                    c.req("GET", &path).body(empty()).unwrap(),
                    Duration::from_secs(20),
                )
                .await;
            assert_eq!(r.status, 200, "{label}: {path}");
            assert_eq!(r.body.len(), size, "{label}: {path}: length");
            assert_eq!(
                sha256_hex(&r.body),
                pattern_sha256(size as u64),
                "{label}: {path}: sha256"
            );
            if !chunked {
                assert_eq!(
                    r.header("content-length"),
                    Some(size.to_string()),
                    "{label}: {path}: content-length must be preserved"
                );
            }
            assert_eq!(
                r.header("x-upstream-version").as_deref(),
                Some(if up_version == http::Version::HTTP_2 {
                    "HTTP/2.0"
                } else {
                    "HTTP/1.1"
                })
            );
        }
    }

    // Streaming upload without a length, in pieces.
    let (tx, body) = channel_body();
    let tag = "/echo?case=streamed";
    let req = c.req("POST", tag).body(body).unwrap();
    let pieces: Vec<Vec<u8>> = (0..4).map(|i| pattern(i * 20_000, 20_000)).collect();
    let expected: Vec<u8> = pieces.concat();
    let sender = tokio::spawn(async move {
        for p in pieces {
            tx.data(p).await;
        }
    });
    let r = c.fetch(req, Duration::from_secs(20)).await;
    sender.await.unwrap();
    assert_eq!(r.status, 200, "{label}: streamed upload");
    assert!(
        r.body[..] == expected[..],
        "{label}: streamed upload echoed bytes differ"
    );
    let rec = up.wait_path(tag).await;
    assert_eq!(rec.state().body_bytes, 80_000);
}

macro_rules! combo_test {
    ($name:ident, $client:expr, $up:expr, $ctls:expr, $utls:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            combo($client, $up, $ctls, $utls).await;
        }
    };
}

combo_test!(
    matrix_h1_to_h1_plain,
    Proto::H1,
    UpstreamProto::H1,
    false,
    false
);
combo_test!(
    matrix_h1_to_h2_plain,
    Proto::H1,
    UpstreamProto::H2,
    false,
    false
);
combo_test!(
    matrix_h2_to_h1_plain,
    Proto::H2,
    UpstreamProto::H1,
    false,
    false
);
combo_test!(
    matrix_h2_to_h2_plain,
    Proto::H2,
    UpstreamProto::H2,
    false,
    false
);
combo_test!(
    matrix_h1_to_h1_tls,
    Proto::H1,
    UpstreamProto::H1,
    true,
    true
);
combo_test!(
    matrix_h1_to_h2_tls,
    Proto::H1,
    UpstreamProto::H2,
    true,
    true
);
combo_test!(
    matrix_h2_to_h1_tls,
    Proto::H2,
    UpstreamProto::H1,
    true,
    true
);
combo_test!(
    matrix_h2_to_h2_tls,
    Proto::H2,
    UpstreamProto::H2,
    true,
    true
);
combo_test!(
    matrix_h2_tls_to_h1_plain,
    Proto::H2,
    UpstreamProto::H1,
    true,
    false
);
combo_test!(
    matrix_h1_plain_to_h2_tls,
    Proto::H1,
    UpstreamProto::H2,
    false,
    true
);

const BIG: u64 = 100 * 1024 * 1024;

/// Stream a 100 MB download and hash it frame by frame.
async fn download_sha(c: &mut Client, path: &str) -> (u64, String) {
    let resp = c
        .send(c.req("GET", path).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut h = Sha256::new();
    let mut n = 0u64;
    within(Duration::from_secs(120), "100 MB download", async {
        while let Some(f) = body.frame().await {
            let f = f.expect("download frame");
            if let Some(d) = f.data_ref() {
                n += d.len() as u64;
                h.update(d);
            }
        }
    })
    .await;
    (n, h.finish())
}

/// Stream a 100 MB upload to /sink; returns the upstream's JSON verdict.
async fn upload_sink(c: &mut Client, path: &str) -> serde_json::Value {
    let (tx, body) = channel_body();
    let req = c
        .req("POST", path)
        .header("content-length", BIG.to_string())
        .body(body)
        .unwrap();
    let producer = tokio::spawn(async move {
        let mut off = 0u64;
        while off < BIG {
            let n = (BIG - off).min(1 << 20) as usize;
            if !tx.data(Bytes::from(pattern(off, n))).await {
                break;
            }
            off += n as u64;
        }
    });
    let resp = within(Duration::from_secs(120), "100 MB upload", async {
        let resp = c.send(req).await.expect("upload response");
        scoretap_tests::client::collect(resp)
            .await
            .expect("upload body")
    })
    .await;
    producer.await.unwrap();
    assert_eq!(resp.status, 200, "upload: {}", resp.text());
    resp.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_100mb_h1_download_and_upload() {
    let up = TestUpstream::start_proto(UpstreamProto::H1).await;
    let proxy = proxy_for(&up, &[]).await;
    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let want = pattern_sha256(BIG);
    let t = Instant::now();
    let (n, sha) = download_sha(&mut c, &format!("/bytes?size={BIG}")).await;
    eprintln!("100 MB h1 download via proxy: {:?}", t.elapsed());
    assert_eq!(n, BIG);
    assert_eq!(sha, want, "100 MB download sha256");
    let t = Instant::now();
    let j = upload_sink(&mut c, "/sink?big=1").await;
    eprintln!("100 MB h1 upload via proxy: {:?}", t.elapsed());
    assert_eq!(j["size"], BIG);
    assert_eq!(j["sha256"], want.as_str(), "100 MB upload sha256");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_100mb_h2_tls_download_and_upload() {
    let pki = Pki::new();
    let up = TestUpstream::start_tls(UpstreamProto::H2, pki.clone()).await;
    let extra = listener_tls_args(&pki);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let proxy = proxy_for(&up, &extra).await;
    let mut c = client_to(&proxy, Proto::H2, Some(&pki)).await;
    let want = pattern_sha256(BIG);
    let t = Instant::now();
    let (n, sha) = download_sha(&mut c, &format!("/bytes?size={BIG}&chunked=1")).await;
    eprintln!("100 MB h2/TLS download via proxy: {:?}", t.elapsed());
    assert_eq!(n, BIG);
    assert_eq!(sha, want);
    let t = Instant::now();
    let j = upload_sink(&mut c, "/sink?big=2").await;
    eprintln!("100 MB h2/TLS upload via proxy: {:?}", t.elapsed());
    assert_eq!(j["size"], BIG);
    assert_eq!(j["sha256"], want.as_str());
}

fn write_payload(dir: &TempDir, size: usize) -> (String, String) {
    let data = pattern(7, size);
    let path = dir.join("payload.bin");
    std::fs::write(&path, &data).unwrap();
    (path.display().to_string(), sha256_hex(&data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_clients_plain_and_tls() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let plain = proxy_for(&up, &[]).await;
    let tls_args = listener_tls_args(&pki);
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let tls = proxy_for(&up, &tls_args).await;
    let dir = TempDir::new("curl");
    let (payload, payload_sha) = write_payload(&dir, 300_000);
    let size = 1 << 20;
    let want = pattern_sha256(size);
    let ca = pki.ca_path().display().to_string();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--http1.1".into(),
                format!("{}/bytes?size={size}", plain.url()),
            ],
            "1.1",
        ),
        (
            vec![
                "--http1.0".into(),
                format!("{}/bytes?size={size}", plain.url()),
            ],
            "1.0",
        ),
        (
            vec![
                "--http2-prior-knowledge".into(),
                format!("{}/bytes?size={size}&chunked=1", plain.url()),
            ],
            "2",
        ),
        (
            vec![
                "--http2".into(),
                "--cacert".into(),
                ca.clone(),
                format!("{}/bytes?size={size}", tls.https_url()),
            ],
            "2",
        ),
        (
            vec![
                "--http1.1".into(),
                "--cacert".into(),
                ca.clone(),
                format!("{}/bytes?size={size}", tls.https_url()),
            ],
            "1.1",
        ),
    ];
    for (args, want_version) in cases {
        let out_file = dir.join("out.bin");
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out_s = out_file.display().to_string();
        a.extend(["-o", &out_s, "-w", "%{http_code} %{http_version}"]);
        let o = curl(&a).await;
        assert_eq!(o.code, Some(0), "curl {args:?}: {}", o.stderr);
        // curl reports HTTP/1.0 as "1" (7.x) or "1.0".
        let got_version = o.stdout_str().replace("200 1.0", "200 1");
        assert_eq!(
            got_version,
            format!("200 {}", want_version.replace("1.0", "1")),
            "curl {args:?}"
        );
        let got = std::fs::read(&out_file).unwrap();
        assert_eq!(sha256_hex(&got), want, "curl {args:?}: body sha256");
    }
    // Uploads.
    for (flag, base) in [
        ("--http1.1", plain.url()),
        ("--http2-prior-knowledge", plain.url()),
    ] {
        let data_arg = format!("@{payload}");
        let url = format!("{base}/sink?curl={flag}");
        let o = curl(&[
            flag,
            "--data-binary",
            &data_arg,
            "-H",
            "content-type: application/octet-stream",
            &url,
        ])
        .await;
        assert_eq!(o.code, Some(0), "curl upload {flag}: {}", o.stderr);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("sink json");
        assert_eq!(j["size"], 300_000, "curl upload {flag}");
        assert_eq!(j["sha256"], payload_sha.as_str(), "curl upload {flag}");
    }
    let data_arg = format!("@{payload}");
    let url = format!("{}/sink?curl=tls", tls.https_url());
    let o = curl(&["--http2", "--cacert", &ca, "--data-binary", &data_arg, &url]).await;
    assert_eq!(o.code, Some(0), "curl TLS upload: {}", o.stderr);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("sink json");
    assert_eq!(j["sha256"], payload_sha.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_clients_plain_h1_h2c_and_tls() {
    let pki = Pki::new();
    let up = TestUpstream::start().await;
    let plain = proxy_for(&up, &[]).await;
    let tls_args = listener_tls_args(&pki);
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let tls = proxy_for(&up, &tls_args).await;
    let dir = TempDir::new("httpx");
    let (payload, payload_sha) = write_payload(&dir, 200_000);
    let ca = pki.ca_path().display().to_string();
    let size = 500_000u64;
    let want = pattern_sha256(size);

    let plain_url = format!("{}/bytes?size={size}", plain.url());
    let tls_url = format!("{}/bytes?size={size}", tls.https_url());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--url", &plain_url], "HTTP/1.1"),
        (vec!["--url", &plain_url, "--http2"], "HTTP/2"),
        (
            vec!["--url", &tls_url, "--http2", "--cacert", &ca],
            "HTTP/2",
        ),
        (vec!["--url", &tls_url, "--cacert", &ca], "HTTP/1.1"),
    ];
    for (args, version) in cases {
        let j = httpx(&args).await;
        assert_eq!(j["status"], 200, "httpx {args:?}: {j}");
        assert_eq!(j["http_version"], version, "httpx {args:?}");
        assert_eq!(j["body_size"], size, "httpx {args:?}");
        assert_eq!(j["body_sha256"], want.as_str(), "httpx {args:?}");
        assert!(
            j["headers"]["x-request-id"].is_string(),
            "httpx {args:?}: x-request-id"
        );
    }
    for h2 in [false, true] {
        let url = format!("{}/echo?httpx={h2}", plain.url());
        let mut args = vec!["--url", &url, "--method", "POST", "--data-file", &payload];
        if h2 {
            args.push("--http2");
        }
        let j = httpx(&args).await;
        assert_eq!(j["status"], 200, "httpx echo h2={h2}: {j}");
        assert_eq!(j["body_sha256"], payload_sha.as_str(), "httpx echo h2={h2}");
    }
    let _ = Arc::clone(&pki);
}
