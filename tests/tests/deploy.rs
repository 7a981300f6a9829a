//! The deployment files under `deploy/` (Dockerfile, AKS sidecar and standalone manifests, ACI
//! container group, compose) against the real binary, without Docker or a cluster:
//! - every `SCORETAP_*` variable and scoretap flag they set is accepted by `--check-config` and
//!   documented in `scoretap run --help`;
//! - container ports, Service target ports, probes, metrics annotations and scrape targets match
//!   the listen/admin addresses of the same environment; the store is a file store on a volume;
//! - memory limits leave ≥ 2× the capture buffer; grace periods exceed the drain timeout;
//! - the sidecar's scoretap environment, run on this host with local addresses, proxies a request
//!   and passes /healthz and /readyz.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use scoretap_tests::deploy::*;
use scoretap_tests::process::run_cli;
use scoretap_tests::util::{free_port, TempDir};
use scoretap_tests::{Client, Proto, Scoretap, TestUpstream};
use serde_json::Value;

const CLI_LIMIT: Duration = Duration::from_secs(15);
/// Stand-in for values Kubernetes fills in (`valueFrom: fieldRef: metadata.name`).
const FROM_K8S: &str = "my-model-6d5f8b7c9-x2x4q";
const STORE_DIR: &str = "/var/lib/scoretap";

/// scoretap's configuration as written in one deployment file.
#[derive(Debug)]
struct Target {
    file: &'static str,
    env: BTreeMap<String, String>,
    /// Arguments given to the scoretap binary (command/args), if any.
    args: Vec<String>,
}

fn dockerfile() -> Vec<(String, String)> {
    dockerfile_final_stage(&read("deploy/Dockerfile"))
}

fn sidecar_docs() -> Vec<Value> {
    parse_yaml_file("deploy/aks/sidecar.yaml")
}
fn standalone_docs() -> Vec<Value> {
    parse_yaml_file("deploy/aks/standalone.yaml")
}
fn aci() -> Value {
    let mut d = parse_yaml_file("deploy/aci/container-group.yaml");
    assert_eq!(d.len(), 1);
    d.remove(0)
}
fn compose() -> Value {
    let mut d = parse_yaml_file("deploy/compose.yaml");
    assert_eq!(d.len(), 1);
    d.remove(0)
}

fn pod_spec(deployment: &Value) -> &Value {
    at(deployment, &["spec", "template", "spec"])
}
fn k8s_scoretap(docs: &[Value]) -> &Value {
    named(
        at(pod_spec(doc_of_kind(docs, "Deployment")), &["containers"]),
        "scoretap",
    )
}
fn aci_scoretap(group: &Value) -> &Value {
    at(
        named(at(group, &["properties", "containers"]), "scoretap"),
        &["properties"],
    )
}
fn k8s_args(c: &Value) -> Vec<String> {
    items(get(c, &["command"]))
        .into_iter()
        .chain(items(get(c, &["args"])))
        .map(|v| s(v).to_string())
        .collect()
}

fn targets() -> Vec<Target> {
    let df = dockerfile();
    let mut args = Vec::new();
    for (ins, a) in &df {
        if ins == "ENTRYPOINT" || ins == "CMD" {
            args.extend(exec_form(a));
        }
    }
    let mut out = vec![Target {
        file: "deploy/Dockerfile",
        env: dockerfile_env(&df).into_iter().collect(),
        args,
    }];
    for (file, docs) in [
        ("deploy/aks/sidecar.yaml", sidecar_docs()),
        ("deploy/aks/standalone.yaml", standalone_docs()),
    ] {
        let c = k8s_scoretap(&docs);
        out.push(Target {
            file,
            env: env_list(get(c, &["env"]), FROM_K8S),
            args: k8s_args(c),
        });
    }
    let group = aci();
    let c = aci_scoretap(&group);
    out.push(Target {
        file: "deploy/aci/container-group.yaml",
        env: env_list(get(c, &["environmentVariables"]), FROM_K8S),
        args: items(get(c, &["command"]))
            .into_iter()
            .map(|v| s(v).to_string())
            .collect(),
    });
    let comp = compose();
    let svc = at(&comp, &["services", "scoretap"]);
    let args = match get(svc, &["command"]) {
        Some(Value::Array(a)) => a.iter().map(|v| s(v).to_string()).collect(),
        Some(Value::String(c)) => c.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    };
    out.push(Target {
        file: "deploy/compose.yaml",
        env: compose_env(get(svc, &["environment"])),
        args,
    });
    out
}

/// Placeholders like `https://<your-service>.<region>.azurecontainer.io` made parseable, the
/// way a user fills them in.
fn fill_placeholders(v: &str) -> String {
    v.replace(['<', '>'], "")
}

/// `scoretap --check-config [args] ` with exactly `env` (placeholders filled); returns the
/// effective configuration. A target without an upstream (the Dockerfile) gets one as a flag.
fn check_config(t: &Target) -> Value {
    let env: Vec<(String, String)> = t
        .env
        .iter()
        .map(|(k, v)| (k.clone(), fill_placeholders(v)))
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut args: Vec<String> = vec!["--check-config".into()];
    args.extend(
        t.args
            .iter()
            .filter(|a| !a.ends_with("/scoretap") && *a != "run")
            .cloned(),
    );
    if !t.env.contains_key("SCORETAP_UPSTREAM") && !args.iter().any(|a| a.starts_with("--upstream"))
    {
        args.extend(["--upstream".into(), "http://127.0.0.1:5001".into()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_cli(&arg_refs, &env_refs, CLI_LIMIT);
    assert_eq!(
        o.code(),
        Some(0),
        "{}: `scoretap {}` with env {env:?} rejected it\nstderr: {}",
        t.file,
        args.join(" "),
        o.stderr
    );
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: --check-config output is not JSON ({e}): {}",
            t.file, o.stdout
        )
    })
}

fn cfg_str<'a>(cfg: &'a Value, key: &str) -> &'a str {
    cfg[key]
        .as_str()
        .unwrap_or_else(|| panic!("--check-config has no string {key}: {cfg}"))
}

fn listen_ports(cfg: &Value) -> (u16, u16) {
    (
        addr_port(cfg_str(cfg, "listen")),
        addr_port(cfg_str(cfg, "admin_listen")),
    )
}

fn env_of(file: &str) -> BTreeMap<String, String> {
    targets()
        .into_iter()
        .find(|t| t.file == file)
        .unwrap_or_else(|| panic!("no target {file}"))
        .env
}

fn cfg_of(file: &str) -> Value {
    let t = targets().into_iter().find(|t| t.file == file).unwrap();
    check_config(&t)
}

// ---- (a) every variable and flag is accepted --------------------------------------------------

#[test]
fn every_scoretap_env_and_flag_in_deploy_files_is_accepted_and_documented() {
    let help = run_cli(&["run", "--help"], &[], CLI_LIMIT);
    assert_eq!(help.code(), Some(0), "run --help: {}", help.stderr);
    let help = help.stdout;
    for t in targets() {
        assert!(
            t.env.contains_key("SCORETAP_LISTEN") && t.env.contains_key("SCORETAP_ADMIN_LISTEN"),
            "{}: set SCORETAP_LISTEN and SCORETAP_ADMIN_LISTEN explicitly (the defaults bind \
             127.0.0.1, unreachable from outside a container)",
            t.file
        );
        for name in t.env.keys() {
            assert!(
                name.starts_with("SCORETAP_"),
                "{}: unexpected variable {name} for scoretap",
                t.file
            );
            assert!(
                help_has_env(&help, name),
                "{}: {name} is not a variable listed by `scoretap run --help`",
                t.file
            );
        }
        for flag in flags_of(&t.args) {
            assert!(
                help_has_flag(&help, &flag),
                "{}: {flag} is not a flag of `scoretap run --help`",
                t.file
            );
        }
        let cfg = check_config(&t);
        // The environment is what took effect (a typo'd name would be silently ignored).
        assert_eq!(
            cfg_str(&cfg, "listen"),
            t.env["SCORETAP_LISTEN"],
            "{}",
            t.file
        );
        assert_eq!(
            cfg_str(&cfg, "admin_listen"),
            t.env["SCORETAP_ADMIN_LISTEN"],
            "{}",
            t.file
        );
        if let Some(svc) = t.env.get("SCORETAP_SERVICE") {
            assert_eq!(cfg_str(&cfg, "service"), svc, "{}", t.file);
        }
        if let Some(inst) = t.env.get("SCORETAP_INSTANCE") {
            assert_eq!(cfg_str(&cfg, "instance"), inst, "{}", t.file);
        }
        // Only the implemented stores; a file store under the volume.
        let store = t
            .env
            .get("SCORETAP_STORE")
            .map(String::as_str)
            .unwrap_or("");
        assert_eq!(
            store,
            format!("file://{STORE_DIR}"),
            "{}: store must be the file store on the volume {STORE_DIR} (az:// and s3:// are \
             not implemented yet)",
            t.file
        );
    }
}

// ---- (b) ports, probes, metrics, volumes ------------------------------------------------------

fn container_ports(c: &Value, key: &str) -> BTreeSet<u16> {
    items(get(c, &["ports"]))
        .into_iter()
        .map(|p| u(at(p, &[key])) as u16)
        .collect()
}

/// Resolve a probe/Service port (number or container port name) against a container.
fn resolve_port(c: &Value, port: &Value) -> u16 {
    let p = s(port);
    p.parse()
        .unwrap_or_else(|_| u(at(named(at(c, &["ports"]), p), &["containerPort"])) as u16)
}

fn check_probes(file: &str, c: &Value, admin: u16, resolve: impl Fn(&Value) -> u16) {
    for (probe, want) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let g = at(c, &[probe, "httpGet"]);
        assert_eq!(s(at(g, &["path"])), want, "{file}: {probe} path");
        assert_eq!(
            resolve(at(g, &["port"])),
            admin,
            "{file}: {probe} must hit the admin port"
        );
    }
}

fn check_k8s(file: &str, docs: &[Value]) {
    let cfg = cfg_of(file);
    let (listen, admin) = listen_ports(&cfg);
    let dep = doc_of_kind(docs, "Deployment");
    let c = k8s_scoretap(docs);
    let ports = container_ports(c, "containerPort");
    assert_eq!(
        ports,
        BTreeSet::from([listen, admin]),
        "{file}: scoretap containerPorts"
    );
    check_probes(file, c, admin, |p| resolve_port(c, p));

    let ann = at(dep, &["spec", "template", "metadata", "annotations"]);
    assert_eq!(s(at(ann, &["prometheus.io/scrape"])), "true", "{file}");
    assert_eq!(
        u(at(ann, &["prometheus.io/port"])),
        u64::from(admin),
        "{file}"
    );
    assert_eq!(s(at(ann, &["prometheus.io/path"])), "/metrics", "{file}");

    // The Service targets scoretap's listeners (never the model's port directly).
    let svc = doc_of_kind(docs, "Service");
    let targets: BTreeSet<u16> = items(get(svc, &["spec", "ports"]))
        .into_iter()
        .map(|p| resolve_port(c, at(p, &["targetPort"])))
        .collect();
    assert_eq!(
        targets,
        BTreeSet::from([listen, admin]),
        "{file}: Service targetPorts"
    );
    let http = named(at(svc, &["spec", "ports"]), "http");
    assert_eq!(u(at(http, &["port"])), 80, "{file}: Service http port");
    assert_eq!(resolve_port(c, at(http, &["targetPort"])), listen, "{file}");
    // The Service selects the Deployment's pods.
    let sel = at(svc, &["spec", "selector"]).as_object().unwrap();
    let labels = at(dep, &["spec", "template", "metadata", "labels"]);
    for (k, v) in sel {
        assert_eq!(get(labels, &[k]), Some(v), "{file}: Service selector {k}");
    }

    if let Some(sm) = docs
        .iter()
        .find(|d| get(d, &["kind"]).and_then(Value::as_str) == Some("ServiceMonitor"))
    {
        assert_eq!(s(at(sm, &["apiVersion"])), "monitoring.coreos.com/v1");
        let ep = at(sm, &["spec", "endpoints", "0"]);
        assert_eq!(
            s(at(ep, &["path"])),
            "/metrics",
            "{file}: ServiceMonitor path"
        );
        let port_name = s(at(ep, &["port"]));
        let sp = named(at(svc, &["spec", "ports"]), port_name);
        assert_eq!(
            resolve_port(c, at(sp, &["targetPort"])),
            admin,
            "{file}: ServiceMonitor port"
        );
        let sm_sel = at(sm, &["spec", "selector", "matchLabels"])
            .as_object()
            .unwrap();
        let svc_labels = at(svc, &["metadata", "labels"]);
        for (k, v) in sm_sel {
            assert_eq!(
                get(svc_labels, &[k]),
                Some(v),
                "{file}: ServiceMonitor selector {k}"
            );
        }
    }

    // The store directory is a mounted volume, the root filesystem read-only, the user not root.
    let spec = pod_spec(dep);
    let mount = items(get(c, &["volumeMounts"]))
        .into_iter()
        .find(|m| s(at(m, &["mountPath"])) == STORE_DIR)
        .unwrap_or_else(|| panic!("{file}: nothing mounted at {STORE_DIR}"));
    let vol = named(at(spec, &["volumes"]), s(at(mount, &["name"])));
    assert!(
        get(vol, &["emptyDir"]).is_some(),
        "{file}: store volume is an emptyDir"
    );
    assert_eq!(
        s(at(c, &["securityContext", "readOnlyRootFilesystem"])),
        "true",
        "{file}"
    );
    assert_eq!(
        s(at(c, &["securityContext", "runAsNonRoot"])),
        "true",
        "{file}"
    );
    assert_eq!(
        u(at(spec, &["securityContext", "runAsUser"])),
        10001,
        "{file}"
    );
}

#[test]
fn aks_ports_probes_and_metrics_match_the_listeners() {
    let docs = sidecar_docs();
    check_k8s("deploy/aks/sidecar.yaml", &docs);
    // The sidecar's upstream is the model container's port on localhost.
    let env = env_of("deploy/aks/sidecar.yaml");
    let model = named(
        at(pod_spec(doc_of_kind(&docs, "Deployment")), &["containers"]),
        "model",
    );
    let model_port = *container_ports(model, "containerPort")
        .iter()
        .next()
        .unwrap();
    assert_eq!(
        env["SCORETAP_UPSTREAM"],
        format!("http://127.0.0.1:{model_port}")
    );
    assert_eq!(
        s(at(model, &["image"])),
        "myregistry.azurecr.io/my-model:1",
        "example model image placeholder"
    );

    let docs = standalone_docs();
    check_k8s("deploy/aks/standalone.yaml", &docs);
    let env = env_of("deploy/aks/standalone.yaml");
    assert!(
        env["SCORETAP_UPSTREAM"].starts_with("https://"),
        "standalone fronts a remote https endpoint"
    );
    assert!(
        !env.contains_key("SCORETAP_UPSTREAM_CA"),
        "standalone verifies TLS with the system roots by default"
    );
}

#[test]
fn aci_ports_probes_and_volume_match_the_listeners() {
    let file = "deploy/aci/container-group.yaml";
    let (listen, admin) = listen_ports(&cfg_of(file));
    let group = aci();
    assert_eq!(s(at(&group, &["apiVersion"])), "2021-10-01");
    let c = aci_scoretap(&group);
    assert_eq!(
        container_ports(c, "port"),
        BTreeSet::from([listen, admin]),
        "{file}"
    );
    check_probes(file, c, admin, |p| u(p) as u16);
    // Published ports are scoretap's (the model's is only reachable through it).
    let public: BTreeSet<u16> = items(get(&group, &["properties", "ipAddress", "ports"]))
        .into_iter()
        .map(|p| u(at(p, &["port"])) as u16)
        .collect();
    assert!(public.contains(&listen), "{file}: proxy port published");
    assert!(
        public.is_subset(&BTreeSet::from([listen, admin])),
        "{file}: {public:?}"
    );
    let model = at(
        named(at(&group, &["properties", "containers"]), "model"),
        &["properties"],
    );
    let model_port = *container_ports(model, "port").iter().next().unwrap();
    assert_eq!(
        env_of(file)["SCORETAP_UPSTREAM"],
        format!("http://127.0.0.1:{model_port}")
    );
    let mount = items(get(c, &["volumeMounts"]))
        .into_iter()
        .find(|m| s(at(m, &["mountPath"])) == STORE_DIR)
        .unwrap_or_else(|| panic!("{file}: nothing mounted at {STORE_DIR}"));
    let vol = named(
        at(&group, &["properties", "volumes"]),
        s(at(mount, &["name"])),
    );
    assert!(get(vol, &["emptyDir"]).is_some(), "{file}: emptyDir volume");
}

#[test]
fn compose_ports_upstream_and_prometheus_target_match_the_listeners() {
    let file = "deploy/compose.yaml";
    let (listen, admin) = listen_ports(&cfg_of(file));
    let comp = compose();
    let svc = at(&comp, &["services", "scoretap"]);
    assert_eq!(s(at(svc, &["build", "context"])), "..");
    assert_eq!(s(at(svc, &["build", "dockerfile"])), "deploy/Dockerfile");
    let published: BTreeSet<u16> = items(get(svc, &["ports"]))
        .into_iter()
        .map(|p| s(p).rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        published,
        BTreeSet::from([listen, admin]),
        "{file}: container ports"
    );
    assert!(
        items(get(svc, &["volumes"]))
            .iter()
            .any(|v| s(v).ends_with(&format!(":{STORE_DIR}"))),
        "{file}: a volume at {STORE_DIR}"
    );
    // The upstream is the model service on the port its server listens on.
    let env = env_of(file);
    let model = at(&comp, &["services", "model"]);
    let cmd: Vec<&str> = items(get(model, &["command"])).into_iter().map(s).collect();
    let cmd = cmd.join(" ");
    let port = cmd
        .split_once("--port ")
        .map(|(_, p)| p.split_whitespace().next().unwrap())
        .expect("model command has --port");
    assert_eq!(env["SCORETAP_UPSTREAM"], format!("http://model:{port}"));
    assert!(
        cmd.contains("azmlinfsrv --entry_script /app/score.py"),
        "{cmd}"
    );
    let mounted = items(get(model, &["volumes"]))
        .into_iter()
        .map(s)
        .find(|v| v.ends_with(":/app/score.py:ro"))
        .expect("score.py mounted");
    let host = mounted.split(':').next().unwrap();
    assert!(path("deploy").join(host).is_file(), "{file}: {host} exists");
    // Prometheus scrapes scoretap by service name on the admin port, with a config that exists.
    let prom = at(&comp, &["services", "prometheus"]);
    let cfg_mount = items(get(prom, &["volumes"]))
        .into_iter()
        .map(s)
        .find(|v| v.contains(":/etc/prometheus/prometheus.yml"))
        .expect("prometheus.yml mounted");
    let host = cfg_mount.split(':').next().unwrap();
    let prom_cfg = parse_yaml(&std::fs::read_to_string(path("deploy").join(host)).unwrap())
        .unwrap()
        .remove(0);
    let job = named_job(&prom_cfg, "scoretap");
    assert_eq!(s(at(job, &["metrics_path"])), "/metrics");
    let targets: Vec<&str> = items(get(job, &["static_configs", "0", "targets"]))
        .into_iter()
        .map(s)
        .collect();
    assert_eq!(
        targets,
        vec![format!("scoretap:{admin}")],
        "{host}: scrape target"
    );
    // Its rule file is mounted beside it.
    for rule in items(get(&prom_cfg, &["rule_files"])) {
        assert!(
            items(get(prom, &["volumes"]))
                .iter()
                .any(|v| s(v).ends_with(&format!("/etc/prometheus/{}:ro", s(rule)))),
            "{file}: rule file {} mounted",
            s(rule)
        );
    }
    assert!(
        get(&comp, &["services", "azurite"]).is_some(),
        "{file}: azurite"
    );
}

fn named_job<'a>(prom: &'a Value, name: &str) -> &'a Value {
    items(get(prom, &["scrape_configs"]))
        .into_iter()
        .find(|j| s(at(j, &["job_name"])) == name)
        .unwrap_or_else(|| panic!("no scrape job {name}"))
}

#[test]
fn dockerfile_is_multistage_non_root_and_matches_the_listeners() {
    let src = read("deploy/Dockerfile");
    assert!(src.contains("FROM rust:1-bookworm AS builder"));
    assert!(src.contains("cargo build --release -p scoretap --locked"));
    let df = dockerfile();
    let one = |ins: &str| -> String {
        let v: Vec<&String> = df
            .iter()
            .filter(|(i, _)| i == ins)
            .map(|(_, a)| a)
            .collect();
        assert_eq!(v.len(), 1, "one {ins} in the runtime stage: {v:?}");
        v[0].clone()
    };
    let from = one("FROM");
    assert!(
        from.starts_with("debian:bookworm-slim") || from.starts_with("gcr.io/distroless/cc"),
        "runtime base {from}"
    );
    assert!(one("USER").starts_with("10001"), "non-root uid 10001");
    assert_eq!(
        exec_form(&one("ENTRYPOINT")),
        vec!["/usr/local/bin/scoretap"]
    );
    assert_eq!(exec_form(&one("VOLUME")), vec![STORE_DIR]);
    let (listen, admin) = listen_ports(&cfg_of("deploy/Dockerfile"));
    let exposed: BTreeSet<u16> = one("EXPOSE")
        .split_whitespace()
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(exposed, BTreeSet::from([listen, admin]), "EXPOSE");
    assert!(df
        .iter()
        .any(|(i, a)| i == "COPY" && a.contains("/usr/local/bin/scoretap")));

    let ignore = read(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for needed in ["target/", ".git/", "scoretap-data/"] {
        assert!(lines.contains(&needed), ".dockerignore lacks {needed}");
    }
    // The build needs every workspace member's manifest: none of them may be ignored.
    for member in ["core", "proxy", "tests", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !lines.iter().any(|l| l.trim_end_matches('/') == member),
            ".dockerignore must not exclude {member}"
        );
    }
}

// ---- (c) memory and shutdown ------------------------------------------------------------------

fn capture_buffer(cfg: &Value) -> u64 {
    cfg["capture_buffer_bytes"]
        .as_u64()
        .expect("capture_buffer_bytes")
}
fn drain(cfg: &Value) -> Duration {
    duration(cfg_str(cfg, "drain_timeout"))
}

#[test]
fn memory_limits_and_grace_periods_fit_the_configuration() {
    for (file, docs) in [
        ("deploy/aks/sidecar.yaml", sidecar_docs()),
        ("deploy/aks/standalone.yaml", standalone_docs()),
    ] {
        let cfg = cfg_of(file);
        let c = k8s_scoretap(&docs);
        let limit = memory_bytes(s(at(c, &["resources", "limits", "memory"])));
        let request = memory_bytes(s(at(c, &["resources", "requests", "memory"])));
        assert!(
            limit >= 2 * capture_buffer(&cfg),
            "{file}: memory limit {limit} < 2 × capture buffer {}",
            capture_buffer(&cfg)
        );
        assert!(request <= limit, "{file}: request above limit");
        let spec = pod_spec(doc_of_kind(&docs, "Deployment"));
        let grace = Duration::from_secs(u(at(spec, &["terminationGracePeriodSeconds"])));
        let pre_stop = get(c, &["lifecycle", "preStop", "sleep", "seconds"])
            .map(|v| Duration::from_secs(u(v)))
            .unwrap_or_default();
        assert!(
            grace > drain(&cfg) + pre_stop,
            "{file}: terminationGracePeriodSeconds {grace:?} must exceed preStop {pre_stop:?} + \
             drain timeout {:?}",
            drain(&cfg)
        );
    }

    let file = "deploy/aci/container-group.yaml";
    let cfg = cfg_of(file);
    let group = aci();
    let res = at(aci_scoretap(&group), &["resources"]);
    let gb =
        get(res, &["limits", "memoryInGB"]).unwrap_or_else(|| at(res, &["requests", "memoryInGB"]));
    let bytes = (s(gb).parse::<f64>().unwrap() * 1e9) as u64;
    assert!(
        bytes >= 2 * capture_buffer(&cfg),
        "{file}: memoryInGB {gb} too small"
    );

    let file = "deploy/compose.yaml";
    let cfg = cfg_of(file);
    let svc = at(&compose(), &["services", "scoretap"]).clone();
    let limit = memory_bytes(s(at(&svc, &["deploy", "resources", "limits", "memory"])));
    assert!(
        limit >= 2 * capture_buffer(&cfg),
        "{file}: memory limit {limit}"
    );
    let grace = duration(s(at(&svc, &["stop_grace_period"])));
    assert!(
        grace > drain(&cfg),
        "{file}: stop_grace_period {grace:?} ≤ drain timeout"
    );
}

// ---- (d) the sidecar's environment, run here ---------------------------------------------------

#[tokio::test]
async fn sidecar_environment_serves_and_passes_probes_on_the_host() {
    let up = TestUpstream::start().await;
    let store = TempDir::new("deploy-store");
    let local = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let (listen, admin) = (local(free_port()), local(free_port()));
    let mut env = env_of("deploy/aks/sidecar.yaml");
    // Only what cannot work outside the pod is rewritten.
    env.insert("SCORETAP_LISTEN".into(), listen.to_string());
    env.insert("SCORETAP_ADMIN_LISTEN".into(), admin.to_string());
    env.insert(
        "SCORETAP_STORE".into(),
        format!("file://{}", store.path().display()),
    );
    env.insert("SCORETAP_UPSTREAM".into(), up.url());
    let mut b = Scoretap::builder().no_listen_flag().no_admin_flag();
    for (k, v) in &env {
        b = b.env(k, v);
    }
    let mut proxy = b.start_with_addrs(listen, admin).await;

    let mut c = Client::connect(proxy.addr, Proto::H1).await;
    let r = c.post("/score", r#"{"data": [[1,2,3]]}"#).await;
    assert_eq!(r.status, 200, "proxied /score: {}", r.text());
    assert_eq!(up.request_count(), 1);
    assert_eq!(proxy.admin_get("/healthz").await.map(|x| x.0), Some(200));
    assert_eq!(proxy.readyz().await, Some(200));
    let (st, body) = proxy.admin_get("/metrics").await.unwrap();
    assert_eq!(st, 200);
    assert!(String::from_utf8_lossy(&body).contains("scoretap_requests_total"));

    // SIGTERM drains and exits well within the manifest's drain timeout.
    drop(c);
    proxy.sigterm();
    let st = proxy
        .wait_exit(duration(&env["SCORETAP_DRAIN_TIMEOUT"]))
        .await;
    assert!(st.success(), "exit after SIGTERM: {st}");
    // The exchange reached the file store.
    let mut found = Vec::new();
    let mut stack = vec![store.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    assert!(
        found.iter().any(|t| t.contains("/score")),
        "a trace record for /score under the store ({} files)",
        found.len()
    );
}
