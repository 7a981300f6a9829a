//! The deployment files under `deploy/` (Dockerfile, AKS sidecar and standalone manifests, ACI
//! container group, compose) against the real binary, without Docker or a cluster:
//! - every `SCORETAP_*` variable and scoretap flag they set is accepted by `--check-config` and
//!   documented in `scoretap run --help`; the `AZURE_*` ones are credentials scoretap reads;
//! - container ports, Service target ports, probes, metrics annotations and scrape targets match
//!   the listen/admin addresses of the same environment;
//! - storage: an `az://` store whose spool is on the pod's volume, its budget below the volume's
//!   size limit; credentials from workload identity (sidecar), a Secret (standalone) or a secure
//!   variable (ACI), never inline (except Azurite's public key in compose); the ServiceAccount,
//!   Secret, container and federated-credential names agree between the manifests and the
//!   commands in deploy/README.md;
//! - memory limits leave room for the capture ring and the uploads' part buffers; grace periods
//!   exceed preStop + drain + the collector's and the uploader's stop deadlines;
//! - run on this host (the container's entrypoint and environment, addresses and paths made
//!   local): the sidecar's environment serves, passes its probes and lands its records in a real
//!   Azurite; its workload-identity environment exchanges the projected token and uploads with the
//!   bearer token it got; the standalone environment verifies the endpoint's certificate and
//!   forwards Authorization unchanged; compose's environment, with the example scoring server,
//!   Azurite and Prometheus, uploads once the init step has created the container (and keeps
//!   the data in the spool until then).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use scoretap_core::sink::StoreLocation;
use scoretap_core::storage::remote::RemoteStore;
use scoretap_tests::client::full;
use scoretap_tests::deploy::*;
use scoretap_tests::process::run_cli;
use scoretap_tests::raw::RawRequest;
use scoretap_tests::stores::{Azurite, AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY};
use scoretap_tests::traces::{capture_state, parse_jsonl, TraceRecord};
use scoretap_tests::util::{free_port, which, TempDir};
use scoretap_tests::UpstreamProto;
use scoretap_tests::{Client, Collected, Pki, Proto, RawReply, RawUpstream, TestUpstream};
use serde_json::Value;

const CLI_LIMIT: Duration = Duration::from_secs(15);
/// Stand-in for values Kubernetes fills in (`valueFrom: fieldRef: metadata.name`).
const FROM_K8S: &str = "my-model-6d5f8b7c9-x2x4q";
/// The image's volume (Dockerfile `VOLUME`, `WORKDIR`): everything scoretap writes is under it.
const VOLUME_DIR: &str = "/var/lib/scoretap";
/// What one upload in flight may hold in memory: 2 parts of 8 MiB (core/src/storage/remote).
const UPLOAD_BUFFER_BYTES: u64 = 16 << 20;
/// The `AZURE_*` variables a manifest may give scoretap, all read by its Azure Blob client
/// (object_store's `MicrosoftAzureBuilder::from_env`): the account name and key are exercised by
/// the Azurite runs below, the authority host by the workload-identity run, the client id is how
/// ACI picks a user-assigned managed identity.
const AZURE_ENV: &[&str] = &[
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_AUTHORITY_HOST",
    "AZURE_CLIENT_ID",
];
/// Variables holding credentials: never a literal in a manifest.
const SECRET_ENV: &[&str] = &[
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "SCORETAP_ADMIN_TOKEN",
];

/// scoretap's configuration as written in one deployment file.
#[derive(Debug)]
struct Target {
    file: &'static str,
    /// Name → value; values Kubernetes/ACI fill in (fieldRef, secretKeyRef, secureValue) are
    /// stand-ins.
    env: BTreeMap<String, String>,
    /// Where each variable comes from (empty for the Dockerfile and compose: all literal).
    entries: Vec<EnvEntry>,
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

/// The value a container sees for an entry; fieldRef → [`FROM_K8S`], secrets → a stand-in
/// naming where they come from.
fn stand_in(e: &EnvEntry) -> String {
    match &e.source {
        EnvSource::Literal(v) => v.clone(),
        EnvSource::FieldRef(_) => FROM_K8S.to_string(),
        EnvSource::SecretKeyRef { name, key } => format!("from-secret-{name}-{key}"),
        EnvSource::SecureValue(_) => "from-secure-value".to_string(),
    }
}

fn entries_env(entries: &[EnvEntry]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in entries {
        assert!(
            out.insert(e.name.clone(), stand_in(e)).is_none(),
            "duplicate env {}",
            e.name
        );
    }
    out
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
        entries: Vec::new(),
        args,
    }];
    for (file, docs) in [
        ("deploy/aks/sidecar.yaml", sidecar_docs()),
        ("deploy/aks/standalone.yaml", standalone_docs()),
    ] {
        let c = k8s_scoretap(&docs);
        let entries = env_entries(get(c, &["env"]));
        out.push(Target {
            file,
            env: entries_env(&entries),
            entries,
            args: k8s_args(c),
        });
    }
    let group = aci();
    let c = aci_scoretap(&group);
    let entries = env_entries(get(c, &["environmentVariables"]));
    out.push(Target {
        file: "deploy/aci/container-group.yaml",
        env: entries_env(&entries),
        entries,
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
        entries: Vec::new(),
        args,
    });
    out
}

fn target(file: &str) -> Target {
    targets()
        .into_iter()
        .find(|t| t.file == file)
        .unwrap_or_else(|| panic!("no target {file}"))
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

fn cfg_u64(cfg: &Value, key: &str) -> u64 {
    cfg[key]
        .as_u64()
        .unwrap_or_else(|| panic!("--check-config has no integer {key}: {cfg}"))
}

fn listen_ports(cfg: &Value) -> (u16, u16) {
    (
        addr_port(cfg_str(cfg, "listen")),
        addr_port(cfg_str(cfg, "admin_listen")),
    )
}

fn env_of(file: &str) -> BTreeMap<String, String> {
    target(file).env
}

fn cfg_of(file: &str) -> Value {
    check_config(&target(file))
}

/// `az://CONTAINER/PREFIX` → (container, prefix without slashes).
fn az_store(url: &str) -> (String, String) {
    match StoreLocation::parse(url) {
        Ok(StoreLocation::Azure { container, prefix }) => {
            (container, prefix.trim_end_matches('/').to_string())
        }
        other => panic!("{url} is not an az:// store: {other:?}"),
    }
}

/// The manifests that write to a remote store (all but the Dockerfile's default).
const REMOTE_STORE_FILES: &[&str] = &[
    "deploy/aks/sidecar.yaml",
    "deploy/aks/standalone.yaml",
    "deploy/aci/container-group.yaml",
    "deploy/compose.yaml",
];

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
            if name.starts_with("AZURE_") {
                assert!(
                    AZURE_ENV.contains(&name.as_str()),
                    "{}: {name} is not one of the Azure variables scoretap is known to read \
                     ({AZURE_ENV:?})",
                    t.file
                );
                continue;
            }
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
        for (var, key) in [
            ("SCORETAP_SERVICE", "service"),
            ("SCORETAP_INSTANCE", "instance"),
            ("SCORETAP_SPOOL_DIR", "spool_dir"),
            ("SCORETAP_AZURE_ENDPOINT", "azure_endpoint"),
        ] {
            if let Some(v) = t.env.get(var) {
                assert_eq!(cfg_str(&cfg, key), v, "{}: {var}", t.file);
            }
        }
        let store = cfg_str(&cfg, "store");
        if t.file == "deploy/Dockerfile" {
            // The image's default: the file store on its volume.
            assert_eq!(
                t.env["SCORETAP_STORE"],
                format!("file://{VOLUME_DIR}"),
                "{}",
                t.file
            );
        } else {
            assert!(
                REMOTE_STORE_FILES.contains(&t.file),
                "{}: which store?",
                t.file
            );
            let (container, prefix) = az_store(&t.env["SCORETAP_STORE"]);
            assert_eq!(store, format!("az://{container}/{prefix}/"), "{}", t.file);
            assert!(!prefix.is_empty(), "{}: a prefix per service", t.file);
        }
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
        .find(|m| s(at(m, &["mountPath"])) == VOLUME_DIR)
        .unwrap_or_else(|| panic!("{file}: nothing mounted at {VOLUME_DIR}"));
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
        .find(|m| s(at(m, &["mountPath"])) == VOLUME_DIR)
        .unwrap_or_else(|| panic!("{file}: nothing mounted at {VOLUME_DIR}"));
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
            .any(|v| s(v).ends_with(&format!(":{VOLUME_DIR}"))),
        "{file}: a volume at {VOLUME_DIR}"
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
    assert_eq!(exec_form(&one("VOLUME")), vec![VOLUME_DIR]);
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
    cfg_u64(cfg, "capture_buffer_bytes")
}
fn drain(cfg: &Value) -> Duration {
    duration(cfg_str(cfg, "drain_timeout"))
}

/// What scoretap may hold in memory by configuration: twice the capture ring (the ring and the
/// bodies in flight around it) plus, with a remote store, the part buffers of every upload in
/// flight.
fn memory_floor(cfg: &Value) -> u64 {
    let uploads = if cfg_str(cfg, "store").starts_with("file://") {
        0
    } else {
        cfg_u64(cfg, "upload_concurrency") * UPLOAD_BUFFER_BYTES
    };
    2 * capture_buffer(cfg) + uploads
}

/// After the drain, scoretap gives the collector up to this long to write what it holds, then
/// the uploader up to as long again (core/src/server.rs).
fn stop_deadlines() -> Duration {
    2 * source_const_secs("core/src/server.rs", "COLLECTOR_STOP_DEADLINE")
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
            limit >= memory_floor(&cfg),
            "{file}: memory limit {limit} < 2 × capture buffer {} + {} uploads × 16 MiB",
            capture_buffer(&cfg),
            cfg["upload_concurrency"]
        );
        assert!(request <= limit, "{file}: request above limit");
        let spec = pod_spec(doc_of_kind(&docs, "Deployment"));
        let grace = Duration::from_secs(u(at(spec, &["terminationGracePeriodSeconds"])));
        let pre_stop = get(c, &["lifecycle", "preStop", "sleep", "seconds"])
            .map(|v| Duration::from_secs(u(v)))
            .unwrap_or_default();
        assert!(
            grace > pre_stop + drain(&cfg) + stop_deadlines(),
            "{file}: terminationGracePeriodSeconds {grace:?} must exceed preStop {pre_stop:?} + \
             drain timeout {:?} + collector and uploader deadlines {:?}",
            drain(&cfg),
            stop_deadlines()
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
        bytes >= memory_floor(&cfg),
        "{file}: memoryInGB {gb} below {}",
        memory_floor(&cfg)
    );

    let file = "deploy/compose.yaml";
    let cfg = cfg_of(file);
    let svc = at(&compose(), &["services", "scoretap"]).clone();
    let limit = memory_bytes(s(at(&svc, &["deploy", "resources", "limits", "memory"])));
    assert!(
        limit >= memory_floor(&cfg),
        "{file}: memory limit {limit} below {}",
        memory_floor(&cfg)
    );
    let grace = duration(s(at(&svc, &["stop_grace_period"])));
    assert!(
        grace > drain(&cfg) + stop_deadlines(),
        "{file}: stop_grace_period {grace:?} ≤ drain timeout + stop deadlines"
    );
}

// ---- (d) storage: spool on the volume, within its limit -----------------------------------------

/// The volume mounted at the directory holding `dir` in a Kubernetes container: (mountPath,
/// the pod's volume).
fn k8s_volume_for<'a>(spec: &'a Value, c: &Value, dir: &str) -> (String, &'a Value) {
    let mount = items(get(c, &["volumeMounts"]))
        .into_iter()
        .filter(|m| Path::new(dir).starts_with(s(at(m, &["mountPath"]))))
        .max_by_key(|m| s(at(m, &["mountPath"])).len())
        .unwrap_or_else(|| panic!("{dir} is not on any mounted volume"));
    let vol = named(at(spec, &["volumes"]), s(at(mount, &["name"])));
    (s(at(mount, &["mountPath"])).to_string(), vol)
}

#[test]
fn the_spool_is_on_the_volume_and_its_budget_below_the_volume_size() {
    // The image: the spool and the file store both under its volume.
    let env = env_of("deploy/Dockerfile");
    assert!(
        Path::new(&env["SCORETAP_SPOOL_DIR"]).starts_with(VOLUME_DIR),
        "Dockerfile: SCORETAP_SPOOL_DIR {} outside the volume {VOLUME_DIR}",
        env["SCORETAP_SPOOL_DIR"]
    );
    let default_budget = cfg_u64(&cfg_of("deploy/Dockerfile"), "spool_max_bytes");

    for file in REMOTE_STORE_FILES {
        let t = target(file);
        assert!(
            t.env.contains_key("SCORETAP_SPOOL_MAX_BYTES"),
            "{file}: set SCORETAP_SPOOL_MAX_BYTES (the default {default_budget} is not sized to \
             the volume)"
        );
        assert!(
            t.env.contains_key("SCORETAP_SPOOL_DIR"),
            "{file}: set SCORETAP_SPOOL_DIR (on the volume)"
        );
    }

    for (file, docs) in [
        ("deploy/aks/sidecar.yaml", sidecar_docs()),
        ("deploy/aks/standalone.yaml", standalone_docs()),
    ] {
        let cfg = cfg_of(file);
        let spool = cfg_str(&cfg, "spool_dir");
        let budget = cfg_u64(&cfg, "spool_max_bytes");
        let c = k8s_scoretap(&docs);
        let spec = pod_spec(doc_of_kind(&docs, "Deployment"));
        let (mount, vol) = k8s_volume_for(spec, c, spool);
        let size = memory_bytes(s(at(vol, &["emptyDir", "sizeLimit"])));
        // Past its sizeLimit the kubelet evicts the pod; the budget counts the spool's files but
        // not the filesystem's blocks and directories: leave a fifth for them.
        assert!(
            budget * 5 <= size * 4,
            "{file}: SCORETAP_SPOOL_MAX_BYTES {budget} must stay below 80% of the emptyDir \
             sizeLimit {size} mounted at {mount}"
        );
        assert!(
            get(vol, &["emptyDir", "medium"]).is_none(),
            "{file}: the spool is on disk, not in memory (medium: Memory counts against the \
             memory limit)"
        );
        if let Some(req) = get(c, &["resources", "requests", "ephemeral-storage"]) {
            assert!(
                memory_bytes(s(req)) >= size,
                "{file}: ephemeral-storage request below the spool volume's sizeLimit"
            );
        }
    }

    let file = "deploy/aci/container-group.yaml";
    let cfg = cfg_of(file);
    let group = aci();
    let c = aci_scoretap(&group);
    let spool = cfg_str(&cfg, "spool_dir");
    let mount = items(get(c, &["volumeMounts"]))
        .into_iter()
        .find(|m| Path::new(spool).starts_with(s(at(m, &["mountPath"]))))
        .unwrap_or_else(|| panic!("{file}: {spool} is not on a mounted volume"));
    let vol = named(
        at(&group, &["properties", "volumes"]),
        s(at(mount, &["name"])),
    );
    assert!(get(vol, &["emptyDir"]).is_some(), "{file}: emptyDir spool");
    assert!(
        cfg_u64(&cfg, "spool_max_bytes") < default_budget,
        "{file}: an ACI emptyDir has no size limit of its own: bound the spool below the default"
    );

    let file = "deploy/compose.yaml";
    let cfg = cfg_of(file);
    let spool = cfg_str(&cfg, "spool_dir").to_string();
    let comp = compose();
    let svc = at(&comp, &["services", "scoretap"]);
    assert!(
        items(get(svc, &["volumes"])).into_iter().any(|v| {
            let v = s(v);
            let target = v.split(':').nth(1).unwrap_or("");
            Path::new(&spool).starts_with(target)
                && get(&comp, &["volumes", v.split(':').next().unwrap()]).is_some()
        }),
        "{file}: {spool} is on a named volume (the root filesystem is read-only)"
    );
    assert_eq!(s(at(svc, &["read_only"])), "true", "{file}");
}

// ---- (e) credentials ---------------------------------------------------------------------------

/// Every literal in a manifest, with its path, for the secret scan.
fn literals(v: &Value, path: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(x) => out.push((path, x.clone())),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                literals(x, format!("{path}/{i}"), out);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                literals(x, format!("{path}/{k}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn credentials_come_from_workload_identity_or_a_secret_and_none_are_inline() {
    // No key material anywhere under deploy/, except Azurite's public development key, and only
    // in compose.
    for file in [
        "deploy/aks/sidecar.yaml",
        "deploy/aks/standalone.yaml",
        "deploy/aci/container-group.yaml",
        "deploy/compose.yaml",
        "deploy/Dockerfile",
        "deploy/README.md",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/prometheus-compose.yml",
    ] {
        for (n, line) in read(file).lines().enumerate() {
            let cleaned = line.replace(AZURITE_ACCOUNT_KEY, "<azurite-key>");
            assert!(
                !looks_like_secret(&cleaned),
                "{file}:{}: looks like a credential: {line}",
                n + 1
            );
            if file != "deploy/compose.yaml" && file != "deploy/README.md" {
                assert!(
                    !line.contains(AZURITE_ACCOUNT_KEY),
                    "{file}:{}: the Azurite key belongs in compose only",
                    n + 1
                );
            }
        }
    }
    for t in targets() {
        for e in &t.entries {
            if SECRET_ENV.contains(&e.name.as_str()) {
                match &e.source {
                    EnvSource::SecretKeyRef { .. } => {}
                    EnvSource::SecureValue(v) => assert!(
                        v.starts_with('<') && v.ends_with('>'),
                        "{}: {}'s secureValue must be a placeholder filled in at deploy time, \
                         not a committed key",
                        t.file,
                        e.name
                    ),
                    other => panic!("{}: {} from {other:?}", t.file, e.name),
                }
            }
        }
    }

    // Sidecar: workload identity. The pod's ServiceAccount is in the same file and carries the
    // identity's client id; the pod opts in with the label; no key is given to scoretap.
    let file = "deploy/aks/sidecar.yaml";
    let docs = sidecar_docs();
    let dep = doc_of_kind(&docs, "Deployment");
    let spec = pod_spec(dep);
    let sa_name = s(at(spec, &["serviceAccountName"]));
    let sa = docs
        .iter()
        .find(|d| {
            get(d, &["kind"]).and_then(Value::as_str) == Some("ServiceAccount")
                && get(d, &["metadata", "name"]).and_then(Value::as_str) == Some(sa_name)
        })
        .unwrap_or_else(|| panic!("{file}: no ServiceAccount {sa_name} in the file"));
    let client_id = s(at(
        sa,
        &[
            "metadata",
            "annotations",
            "azure.workload.identity/client-id",
        ],
    ));
    assert!(
        client_id.starts_with('<') && client_id.ends_with('>'),
        "{file}: the client id is a placeholder filled in by the apply command: {client_id}"
    );
    let labels = at(dep, &["spec", "template", "metadata", "labels"]);
    assert_eq!(
        s(at(labels, &["azure.workload.identity/use"])),
        "true",
        "{file}: the pod label that makes the webhook inject the identity"
    );
    let skipped = get(
        dep,
        &[
            "spec",
            "template",
            "metadata",
            "annotations",
            "azure.workload.identity/skip-containers",
        ],
    )
    .map(|v| s(v).split(';').map(str::trim).collect::<Vec<_>>())
    .unwrap_or_default();
    assert!(
        !skipped.contains(&"scoretap"),
        "{file}: scoretap must get the identity"
    );
    let env = env_of(file);
    for name in SECRET_ENV {
        assert!(
            !env.contains_key(*name),
            "{file}: workload identity is the primary path; {name} would take precedence over it"
        );
    }
    assert!(
        !env.contains_key("SCORETAP_AZURE_ENDPOINT"),
        "{file}: the endpoint comes from the account name"
    );
    assert!(env.contains_key("AZURE_STORAGE_ACCOUNT_NAME"), "{file}");
    let authority = &env["AZURE_AUTHORITY_HOST"];
    assert!(
        authority.starts_with("https://") && !authority.ends_with('/'),
        "{file}: AZURE_AUTHORITY_HOST {authority}: https, and without a trailing slash (the \
         token URL is HOST/TENANT/oauth2/v2.0/token)"
    );

    // Standalone: the account key from a Secret, created by the command in the file's header
    // (so the key is never in the file), with the same name and key.
    let file = "deploy/aks/standalone.yaml";
    let t = target(file);
    let refs: Vec<(String, String)> = t
        .entries
        .iter()
        .filter_map(|e| match &e.source {
            EnvSource::SecretKeyRef { name, key } => Some((name.clone(), key.clone())),
            _ => None,
        })
        .collect();
    assert!(
        t.entries
            .iter()
            .any(|e| e.name == "AZURE_STORAGE_ACCOUNT_KEY"
                && matches!(e.source, EnvSource::SecretKeyRef { .. })),
        "{file}: AZURE_STORAGE_ACCOUNT_KEY from a secretKeyRef"
    );
    let docs = standalone_docs();
    assert!(env_from_secrets(k8s_scoretap(&docs)).is_empty(), "{file}");
    for (name, key) in &refs {
        let command = format!("kubectl create secret generic {name} --from-literal={key}=");
        for doc in [file, "deploy/README.md"] {
            assert!(
                read(doc).contains(&command),
                "{doc}: no `{command}...` creating the Secret {file} reads"
            );
        }
    }
    // The sidecar's commented alternative names the same Secret and key.
    let sidecar = read("deploy/aks/sidecar.yaml");
    for (name, key) in &refs {
        assert!(
            sidecar.contains(&format!(
                "kubectl create secret generic {name} --from-literal={key}="
            )) && sidecar.contains(&format!("#           name: {name}"))
                && sidecar.contains(&format!("#           key: {key}")),
            "deploy/aks/sidecar.yaml: the commented Secret alternative names {name}/{key}"
        );
    }

    // ACI: a secure environment variable.
    let t = target("deploy/aci/container-group.yaml");
    assert!(
        t.entries
            .iter()
            .any(|e| e.name == "AZURE_STORAGE_ACCOUNT_KEY"
                && matches!(e.source, EnvSource::SecureValue(_))),
        "ACI: AZURE_STORAGE_ACCOUNT_KEY as a secureValue"
    );

    // Compose: Azurite's account, its public key, its endpoint.
    let env = env_of("deploy/compose.yaml");
    assert_eq!(env["AZURE_STORAGE_ACCOUNT_NAME"], AZURITE_ACCOUNT);
    assert_eq!(env["AZURE_STORAGE_ACCOUNT_KEY"], AZURITE_ACCOUNT_KEY);

    // Nothing else in any manifest looks like a key (values of every field, not just env).
    for (file, docs) in [
        ("deploy/aks/sidecar.yaml", sidecar_docs()),
        ("deploy/aks/standalone.yaml", standalone_docs()),
        ("deploy/aci/container-group.yaml", vec![aci()]),
    ] {
        let mut all = Vec::new();
        for d in &docs {
            literals(d, String::new(), &mut all);
        }
        for (path, v) in all {
            assert!(!looks_like_secret(&v), "{file}{path}: {v}");
        }
    }
}

/// The commands in deploy/README.md and the top-level README's "Put scoretap in front of your
/// endpoint" name what the manifests use.
#[test]
fn readme_commands_match_the_manifests() {
    let top = read("README.md");
    let section_start = top
        .find("## Put scoretap in front of your endpoint")
        .expect("README section");
    let section_end = top[section_start + 3..]
        .find("\n## ")
        .map_or(top.len(), |i| section_start + 3 + i);
    for (doc, readme) in [
        ("deploy/README.md", read("deploy/README.md")),
        ("README.md", top[section_start..section_end].to_string()),
    ] {
        // Workload identity: the federated credential's subject is the sidecar's ServiceAccount.
        let docs = sidecar_docs();
        let sa = s(at(
            pod_spec(doc_of_kind(&docs, "Deployment")),
            &["serviceAccountName"],
        ));
        let subject = format!("--subject system:serviceaccount:default:{sa}");
        assert!(
            readme.contains("az identity federated-credential create") && readme.contains(&subject),
            "{doc}: `az identity federated-credential create ... {subject}`"
        );
        for needed in [
            "--audience api://AzureADTokenExchange",
            "az identity create",
            "--enable-oidc-issuer --enable-workload-identity",
            "--role \"Storage Blob Data Contributor\"",
            "kubectl apply -f -",
            "az container create --resource-group",
            "docker compose -f deploy/compose.yaml up",
            "docker build -f deploy/Dockerfile",
        ] {
            assert!(readme.contains(needed), "{doc}: `{needed}`");
        }
        // The placeholders the apply commands fill in are the ones in the files.
        for (file, placeholders) in [
            (
                "deploy/aks/sidecar.yaml",
                &["<managed-identity-client-id>", "<storage-account>"][..],
            ),
            ("deploy/aks/standalone.yaml", &["<storage-account>"][..]),
            (
                "deploy/aci/container-group.yaml",
                &["<storage-account>", "<storage-account-key>"][..],
            ),
        ] {
            let text = read(file);
            for p in placeholders {
                assert!(text.contains(p), "{file} lacks {p}");
                assert!(
                    readme.contains(&format!("s/{p}/")) || readme.contains(&format!("s|{p}|")),
                    "{doc}: no sed filling {p} for {file}"
                );
            }
            assert!(readme.contains(&format!(" {file}")), "{doc} names {file}");
        }
        // The Secret the standalone manifest reads is the one the command creates.
        for e in target("deploy/aks/standalone.yaml").entries {
            if let EnvSource::SecretKeyRef { name, key } = e.source {
                let command = format!("kubectl create secret generic {name} --from-literal={key}=");
                assert!(readme.contains(&command), "{doc}: `{command}...`");
            }
        }
        // Every remote store's container is created by a command (compose's by azurite-init).
        for file in REMOTE_STORE_FILES {
            let (container, _) = az_store(&env_of(file)["SCORETAP_STORE"]);
            assert!(
                readme
                    .lines()
                    .any(|l| l.contains("az storage container create")
                        && l.contains(&format!("--name {container}"))),
                "{doc}: no `az storage container create ... --name {container}` for {file}"
            );
        }
    }
}

/// compose: Azurite, the init step creating the container scoretap writes to, and scoretap
/// pointed at them.
#[test]
fn compose_azurite_and_its_init_step_match_scoretap() {
    let comp = compose();
    let env = env_of("deploy/compose.yaml");
    let (container, _) = az_store(&env["SCORETAP_STORE"]);
    let endpoint = &env["SCORETAP_AZURE_ENDPOINT"];
    let azurite = at(&comp, &["services", "azurite"]);
    let cmd: Vec<&str> = items(get(azurite, &["command"]))
        .into_iter()
        .map(s)
        .collect();
    let port = cmd
        .iter()
        .position(|a| *a == "--blobPort")
        .map(|i| cmd[i + 1])
        .expect("azurite --blobPort");
    assert_eq!(
        endpoint,
        &format!("http://azurite:{port}/{AZURITE_ACCOUNT}"),
        "SCORETAP_AZURE_ENDPOINT is the azurite service's blob port and account"
    );
    assert!(
        cmd.contains(&"0.0.0.0"),
        "azurite listens beyond its own container"
    );
    let init = at(&comp, &["services", "azurite-init"]);
    let script: Vec<&str> = items(get(init, &["command"])).into_iter().map(s).collect();
    let script = script.join(" ");
    assert!(
        script.contains(&format!("az storage container create --name {container}")),
        "azurite-init creates {container}: {script}"
    );
    let conn = compose_env(get(init, &["environment"]))["AZURE_STORAGE_CONNECTION_STRING"].clone();
    assert!(
        conn.contains(&format!("AccountName={AZURITE_ACCOUNT};"))
            && conn.contains(&format!("AccountKey={AZURITE_ACCOUNT_KEY};"))
            && conn.contains(&format!("BlobEndpoint={endpoint};")),
        "azurite-init's connection string points at the same Azurite: {conn}"
    );
    assert_eq!(
        s(at(
            &comp,
            &[
                "services",
                "scoretap",
                "depends_on",
                "azurite-init",
                "condition"
            ]
        )),
        "service_completed_successfully",
        "scoretap starts once the container exists"
    );
    assert_eq!(
        s(at(init, &["depends_on", "azurite", "condition"])),
        "service_started"
    );
}

// ---- (f) the containers' environments, run on this host -----------------------------------------

/// The container's command line: the image's ENTRYPOINT + CMD (the manifests override neither),
/// with the image's binary path replaced by the one built here.
fn entrypoint_args(t: &Target) -> Vec<String> {
    let df = dockerfile();
    let mut args: Vec<String> = Vec::new();
    for (ins, a) in &df {
        if ins == "ENTRYPOINT" || ins == "CMD" {
            args.extend(exec_form(a));
        }
    }
    assert_eq!(
        args.first().map(String::as_str),
        Some("/usr/local/bin/scoretap")
    );
    assert!(t.args.is_empty(), "{}: overrides the entrypoint", t.file);
    args.remove(0);
    args
}

/// What the container's process sees: the image's ENV, overridden by the manifest's variables
/// (Kubernetes, ACI and compose all work this way), Kubernetes-filled values as stand-ins.
fn container_env(t: &Target) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = dockerfile_env(&dockerfile()).into_iter().collect();
    env.extend(t.env.clone());
    env
}

/// Host stand-ins for what only exists inside the pod or the compose network: the listeners go
/// to free local ports, the upstream is `upstream`, and every value naming the volume moves to
/// `volume`.
fn localize(env: &mut BTreeMap<String, String>, volume: &Path, upstream: &str) {
    for key in ["SCORETAP_LISTEN", "SCORETAP_ADMIN_LISTEN"] {
        env.insert(key.into(), format!("127.0.0.1:{}", free_port()));
    }
    env.insert("SCORETAP_UPSTREAM".into(), upstream.to_string());
    let local = volume.display().to_string();
    for v in env.values_mut() {
        if v.contains(VOLUME_DIR) {
            *v = v.replace(VOLUME_DIR, &local);
        }
    }
}

fn store_client_location(env: &BTreeMap<String, String>) -> StoreLocation {
    StoreLocation::parse(&env["SCORETAP_STORE"]).unwrap()
}

async fn post_score(addr: SocketAddr, id: &str, body: &str, auth: Option<&str>) -> Collected {
    let mut c = Client::connect(addr, Proto::H1).await;
    let mut req = c
        .req("POST", "/score")
        .header("x-request-id", id)
        .header("content-type", "application/json");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    c.fetch(
        req.body(full(body.to_owned())).unwrap(),
        Duration::from_secs(30),
    )
    .await
}

/// Every record of every trace batch in the store.
async fn stored_records(store: &RemoteStore) -> Vec<(String, TraceRecord)> {
    let mut out = Vec::new();
    for object in store.list("traces/").await.unwrap() {
        let bytes = store.get(&object.key).await.unwrap();
        for record in parse_jsonl(std::str::from_utf8(&bytes).unwrap(), None) {
            out.push((object.key.clone(), record));
        }
    }
    out
}

/// Polls `GET /capture` until nothing is pending and the spool is empty.
async fn wait_uploaded(admin: SocketAddr, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let state = capture_state(admin).await;
        let storage = &state["storage"];
        if storage["uploads_pending"] == 0 && storage["spool_bytes"] == 0 {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "uploads still pending after {limit:?}: {storage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET /capture` until `pred(storage)` holds.
async fn wait_storage(
    admin: SocketAddr,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let state = capture_state(admin).await;
        if pred(&state["storage"]) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}: {}",
            state["storage"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sidecar's scoretap container, run here: the image's entrypoint and ENV under the
/// manifest's env, with only what cannot exist outside the pod replaced: listeners and paths
/// local, the model container → a test upstream, and the storage account → Azurite (its
/// endpoint, its account and Shared Key, standing in for the workload identity the AKS webhook
/// gives the pod: Azurite takes no Entra tokens over http; the identity path has its own run
/// below). It serves, passes its probes, and on SIGTERM (what the kubelet sends after preStop)
/// seals the open batch and uploads it before exiting, well within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_environment_serves_passes_probes_and_uploads_to_azurite() {
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let file = "deploy/aks/sidecar.yaml";
    let t = target(file);
    let cfg = check_config(&t);
    let mut env = container_env(&t);
    let (container, prefix) = az_store(&env["SCORETAP_STORE"]);
    azurite.create_container(&container).await;
    let up = TestUpstream::start().await;
    let volume = TempDir::new("deploy-sidecar-volume");
    localize(&mut env, volume.path(), &up.url());
    for name in ["AZURE_STORAGE_ACCOUNT_KEY", "SCORETAP_AZURE_ENDPOINT"] {
        assert!(!env.contains_key(name), "{file} sets {name}");
    }
    env.insert("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into());
    env.insert(
        "AZURE_STORAGE_ACCOUNT_KEY".into(),
        AZURITE_ACCOUNT_KEY.into(),
    );
    env.insert("SCORETAP_AZURE_ENDPOINT".into(), azurite.endpoint());

    let mut run = HostRun::spawn(&entrypoint_args(&t), &env, volume.path());
    run.wait_healthy(Duration::from_secs(20)).await;
    // The probes of the manifest, on the admin port.
    assert_eq!(run.admin_get("/healthz").await.map(|x| x.0), Some(200));
    assert_eq!(run.admin_get("/readyz").await.map(|x| x.0), Some(200));

    let r = post_score(
        run.listen,
        "deploy-sidecar-1",
        r#"{"data": [[1,2,3]]}"#,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "proxied /score: {}", r.text());
    assert_eq!(up.request_count(), 1);
    let (st, body) = run.admin_get("/metrics").await.unwrap();
    assert_eq!(st, 200);
    let metrics = String::from_utf8_lossy(&body).into_owned();
    for series in ["scoretap_requests_total", "scoretap_spool_bytes"] {
        assert!(metrics.contains(series), "/metrics lacks {series}");
    }
    // The record sits in the spool, in the batch the manifest's 60s age has not sealed yet; the
    // spool's budget is the manifest's.
    let state = wait_storage(
        run.admin,
        Duration::from_secs(10),
        "record in the spool",
        |st| st["spool_bytes"].as_u64().unwrap_or(0) > 0,
    )
    .await;
    assert_eq!(
        state["storage"]["spool_limit_bytes"].as_u64(),
        Some(cfg_u64(&cfg, "spool_max_bytes"))
    );
    assert_eq!(state["storage"]["uploads_done"], 0, "{}", state["storage"]);
    let spool_dir = PathBuf::from(&env["SCORETAP_SPOOL_DIR"]);
    assert!(spool_dir.starts_with(volume.path()));
    assert!(
        !data_files(&spool_dir).is_empty(),
        "the batch is in the spool"
    );

    // SIGTERM: drain, seal, upload, exit, within what the pod's grace period leaves after preStop.
    let docs = sidecar_docs();
    let grace = Duration::from_secs(u(at(
        pod_spec(doc_of_kind(&docs, "Deployment")),
        &["terminationGracePeriodSeconds"],
    )));
    let pre_stop = Duration::from_secs(u(at(
        k8s_scoretap(&docs),
        &["lifecycle", "preStop", "sleep", "seconds"],
    )));
    let started = Instant::now();
    run.sigterm();
    let status = run.wait_exit(grace - pre_stop).await;
    let took = started.elapsed();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        run.stderr()
    );
    eprintln!("sidecar environment: SIGTERM to exit (batch sealed and uploaded) in {took:?}");
    assert!(
        data_files(&spool_dir).is_empty(),
        "everything uploaded before exit: {:?}",
        data_files(&spool_dir)
    );

    let store = azurite.remote_store(&store_client_location(&env)).await;
    let records = stored_records(&store).await;
    let (key, record) = records
        .iter()
        .find(|(_, r)| r.correlation_id() == "deploy-sidecar-1")
        .unwrap_or_else(|| panic!("no record in az://{container}/{prefix}/traces/: {records:?}"));
    assert!(
        key.starts_with(&format!("traces/{}/", env["SCORETAP_SERVICE"])) && key.contains(FROM_K8S),
        "batch key {key}: service and pod name (SCORETAP_INSTANCE)"
    );
    assert_eq!(record.str_at("/request/path"), Some("/score"));
    assert_eq!(record.u64_at("/response/status"), Some(200));
}

/// What the AKS workload identity webhook adds to a container's env: it appends its variables
/// only where the container does not set them already.
fn webhook_inject(env: &mut BTreeMap<String, String>, injected: &[(&str, String)]) {
    for (k, v) in injected {
        env.entry((*k).to_string()).or_insert_with(|| v.clone());
    }
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| pct_decode(v))
    })
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The sidecar's primary credential path, run here: the manifest's env plus what the workload
/// identity webhook injects (AZURE_CLIENT_ID from the ServiceAccount's annotation,
/// AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, AZURE_AUTHORITY_HOST — which the manifest already
/// sets, so the webhook's value with its trailing slash is not used). A local stand-in for Entra
/// ID and for the Blob endpoint (one HTTP server) checks that scoretap exchanges the projected
/// token for an access token at `<authority>/<tenant>/oauth2/v2.0/token` and uploads the batch
/// with that bearer token. Not covered: Entra ID itself and Azure Storage's RBAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_workload_identity_environment_exchanges_the_token_and_uploads_with_it() {
    const ACCESS_TOKEN: &str = "entra-access-token-for-scoretap";
    const TENANT: &str = "11111111-2222-3333-4444-555555555555";
    let fake = RawUpstream::start(|req: &RawRequest| {
        let target = req.head.target();
        if req.head.method() == "POST" && target.ends_with("/oauth2/v2.0/token") {
            let body = format!(
                r#"{{"access_token":"{ACCESS_TOKEN}","expires_in":3600,"token_type":"Bearer"}}"#
            );
            RawReply::bytes(format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ))
        } else if req.head.method() == "PUT" {
            RawReply::bytes(
                "HTTP/1.1 201 Created\r\netag: \"0x8DC0000000000001\"\r\nlast-modified: Mon, 23 Nov 2026 20:00:00 GMT\r\ncontent-length: 0\r\n\r\n",
            )
        } else {
            RawReply::bytes("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        }
    })
    .await;

    let file = "deploy/aks/sidecar.yaml";
    let t = target(file);
    let docs = sidecar_docs();
    let sa_name = s(at(
        pod_spec(doc_of_kind(&docs, "Deployment")),
        &["serviceAccountName"],
    ))
    .to_string();
    let sa = docs
        .iter()
        .find(|d| get(d, &["metadata", "name"]).and_then(Value::as_str) == Some(sa_name.as_str()))
        .unwrap();
    let client_id = fill_placeholders(s(at(
        sa,
        &[
            "metadata",
            "annotations",
            "azure.workload.identity/client-id",
        ],
    )));
    let mut env = container_env(&t);
    let up = TestUpstream::start().await;
    let volume = TempDir::new("deploy-wi-volume");
    localize(&mut env, volume.path(), &up.url());
    let account = fill_placeholders(&env["AZURE_STORAGE_ACCOUNT_NAME"]);
    env.insert("AZURE_STORAGE_ACCOUNT_NAME".into(), account.clone());
    // The Blob endpoint (https://<account>.blob.core.windows.net in AKS) and the authority host
    // move to the local stand-in; the authority keeps the manifest's form (no trailing slash).
    env.insert(
        "SCORETAP_AZURE_ENDPOINT".into(),
        format!("{}/{account}", fake.url()),
    );
    let authority = env["AZURE_AUTHORITY_HOST"].clone();
    let (scheme_host, rest) = authority
        .strip_prefix("https://")
        .map(|x| {
            x.split_once('/')
                .map(|(h, p)| (h, format!("/{p}")))
                .unwrap_or((x, String::new()))
        })
        .expect("https authority");
    assert!(!scheme_host.is_empty());
    env.insert(
        "AZURE_AUTHORITY_HOST".into(),
        format!("{}{rest}", fake.url()),
    );
    let token_file = volume.path().join("azure-identity-token");
    let projected = "eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.signature";
    std::fs::write(&token_file, projected).unwrap();
    webhook_inject(
        &mut env,
        &[
            ("AZURE_CLIENT_ID", client_id.clone()),
            ("AZURE_TENANT_ID", TENANT.to_string()),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                token_file.display().to_string(),
            ),
            (
                "AZURE_AUTHORITY_HOST",
                "https://login.microsoftonline.com/".to_string(),
            ),
        ],
    );
    assert!(!env["AZURE_AUTHORITY_HOST"].ends_with('/'));

    let mut run = HostRun::spawn(&entrypoint_args(&t), &env, volume.path());
    run.wait_healthy(Duration::from_secs(20)).await;
    assert_eq!(run.admin_get("/readyz").await.map(|x| x.0), Some(200));
    let r = post_score(run.listen, "deploy-wi-1", r#"{"data": [[4,5,6]]}"#, None).await;
    assert_eq!(r.status, 200);
    wait_storage(
        run.admin,
        Duration::from_secs(10),
        "record in the spool",
        |st| st["spool_bytes"].as_u64().unwrap_or(0) > 0,
    )
    .await;
    run.sigterm();
    let status = run.wait_exit(Duration::from_secs(50)).await;
    assert!(status.success(), "{status}");

    let seen = fake.requests();
    let token_req = seen
        .iter()
        .find(|r| r.head.method() == "POST")
        .unwrap_or_else(|| {
            panic!(
                "no token request; saw {:?}",
                seen.iter()
                    .map(|r| r.head.start_line.clone())
                    .collect::<Vec<_>>()
            )
        });
    assert_eq!(
        token_req.head.target(),
        format!("/{TENANT}/oauth2/v2.0/token"),
        "Entra ID's token endpoint under the authority host (a trailing slash on \
         AZURE_AUTHORITY_HOST would make it //{TENANT}/...)"
    );
    assert_eq!(
        form_field(&token_req.body, "client_id").as_deref(),
        Some(client_id.as_str())
    );
    assert_eq!(
        form_field(&token_req.body, "client_assertion").as_deref(),
        Some(projected),
        "the projected service account token is the client assertion"
    );
    assert_eq!(
        form_field(&token_req.body, "client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(
        form_field(&token_req.body, "scope").as_deref(),
        Some("https://storage.azure.com/.default")
    );
    let (container, prefix) = az_store(&t.env["SCORETAP_STORE"]);
    let put = seen
        .iter()
        .find(|r| r.head.method() == "PUT")
        .expect("the batch was uploaded");
    assert!(
        put.head
            .target()
            .starts_with(&format!("/{account}/{container}/{prefix}/traces/")),
        "{}",
        put.head.target()
    );
    assert_eq!(
        put.head.header("authorization"),
        Some(format!("Bearer {ACCESS_TOKEN}").as_str()),
        "the upload carries the access token from the exchange"
    );
    assert!(String::from_utf8_lossy(&put.body).contains("deploy-wi-1"));
    assert!(data_files(&PathBuf::from(&env["SCORETAP_SPOOL_DIR"])).is_empty());
}

/// The standalone manifest's environment in front of a remote https endpoint: the endpoint's
/// certificate is verified (a test CA stands in for the image's system roots, given the way the
/// manifest documents for a private CA: SCORETAP_UPSTREAM_CA), and without it the request fails
/// instead of going out unverified; the client's Authorization reaches the endpoint unchanged
/// and is redacted in the record stored in Azurite (the Secret's key is Azurite's here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_environment_verifies_tls_and_forwards_authorization() {
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let file = "deploy/aks/standalone.yaml";
    let t = target(file);
    let pki = Pki::new();
    let up = TestUpstream::start_tls(UpstreamProto::Auto, pki.clone()).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let mut env = container_env(&t);
    let (container, _) = az_store(&env["SCORETAP_STORE"]);
    azurite.create_container(&container).await;
    let volume = TempDir::new("deploy-standalone-volume");
    localize(&mut env, volume.path(), &url);
    assert!(env["AZURE_STORAGE_ACCOUNT_KEY"].starts_with("from-secret-"));
    env.insert("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into());
    env.insert(
        "AZURE_STORAGE_ACCOUNT_KEY".into(),
        AZURITE_ACCOUNT_KEY.into(),
    );
    env.insert("SCORETAP_AZURE_ENDPOINT".into(), azurite.endpoint());

    // Without the CA: the endpoint's certificate is not trusted, nothing is forwarded.
    {
        let mut run = HostRun::spawn(&entrypoint_args(&t), &env, volume.path());
        run.wait_healthy(Duration::from_secs(20)).await;
        let r = post_score(run.listen, "deploy-untrusted", "{}", Some("Bearer abc")).await;
        assert_eq!(
            r.status,
            502,
            "an untrusted certificate fails: {}",
            r.text()
        );
        assert_eq!(up.request_count(), 0, "nothing reached the endpoint");
        run.sigterm();
        assert!(run.wait_exit(Duration::from_secs(60)).await.success());
    }

    env.insert(
        "SCORETAP_UPSTREAM_CA".into(),
        pki.ca_path().display().to_string(),
    );
    let mut run = HostRun::spawn(&entrypoint_args(&t), &env, volume.path());
    run.wait_healthy(Duration::from_secs(20)).await;
    assert_eq!(run.admin_get("/readyz").await.map(|x| x.0), Some(200));
    let auth = "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.endpoint-key";
    let r = post_score(
        run.listen,
        "deploy-standalone-1",
        r#"{"data": [[1]]}"#,
        Some(auth),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.wait_path("/score").await;
    assert_eq!(
        seen.header("authorization").as_deref(),
        Some(auth),
        "forwarded unchanged"
    );
    run.sigterm();
    let status = run.wait_exit(Duration::from_secs(85)).await;
    assert!(status.success(), "{status}");

    let store = azurite.remote_store(&store_client_location(&env)).await;
    let records = stored_records(&store).await;
    let (_, record) = records
        .iter()
        .find(|(_, r)| r.correlation_id() == "deploy-standalone-1")
        .expect("the record reached Azurite");
    assert_eq!(
        record.header("request", "authorization").as_deref(),
        Some("[redacted]")
    );
    assert!(!record.brief().contains("endpoint-key"));
}

/// The example scoring service compose runs: azmlinfsrv serving tests/fixtures/azureml/score.py.
/// None (after saying so) with SCORETAP_SKIP_AZUREML=1, as tests/tests/azureml.rs does.
#[derive(Debug)]
struct ScoringServer {
    child: std::process::Child,
    port: u16,
    dir: TempDir,
}

impl ScoringServer {
    async fn start(command: &str) -> Option<Self> {
        use std::os::unix::process::CommandExt;
        if std::env::var("SCORETAP_SKIP_AZUREML").as_deref() == Ok("1") {
            eprintln!("SCORETAP_SKIP_AZUREML=1: compose's model service is a test upstream here");
            return None;
        }
        let bin = which("azmlinfsrv").unwrap_or_else(|| {
            panic!(
                "azmlinfsrv is not on PATH: run scripts/install-test-deps.sh, or set \
                 SCORETAP_SKIP_AZUREML=1"
            )
        });
        // compose: `... && azmlinfsrv --entry_script /app/score.py --port 5001`, score.py being
        // the mounted fixture.
        let (_, run) = command
            .split_once("azmlinfsrv ")
            .expect("azmlinfsrv in the command");
        let args: Vec<&str> = run.split_whitespace().collect();
        assert_eq!(args[0], "--entry_script");
        assert_eq!(args[1], "/app/score.py");
        let script = path("tests/fixtures/azureml/score.py");
        let port = free_port();
        let dir = TempDir::new("compose-model");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg("--entry_script")
            .arg(&script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--health_port")
            .arg(free_port().to_string())
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(log))
            .process_group(0)
            .spawn()
            .expect("spawn azmlinfsrv");
        let mut server = ScoringServer { child, port, dir };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        loop {
            if let Some(st) = server.child.try_wait().unwrap() {
                panic!("azmlinfsrv exited with {st}:\n{}", server.log());
            }
            if let Some((200, _)) = scoretap_tests::raw::try_get(addr, "/").await {
                return Some(server);
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "azmlinfsrv not up within 180 s (a loaded machine):\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for ScoringServer {
    fn drop(&mut self) {
        // The whole process group (gunicorn master and workers).
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- azmlinfsrv log ---\n{}", self.log());
        }
    }
}

/// Prometheus with compose's config (deploy/prometheus/prometheus-compose.yml and its alert
/// rules), the scoretap target moved from `scoretap:9901` to the local admin address.
#[derive(Debug)]
struct ComposePrometheus {
    child: std::process::Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl ComposePrometheus {
    async fn start(bin: &Path, compose_target: &str, admin: SocketAddr) -> Self {
        let dir = TempDir::new("compose-prometheus");
        let config = read("deploy/prometheus/prometheus-compose.yml");
        assert!(
            config.contains(compose_target),
            "{compose_target} in the config"
        );
        std::fs::write(
            dir.join("prometheus.yml"),
            config.replace(compose_target, &admin.to_string()),
        )
        .unwrap();
        std::fs::copy(path("deploy/prometheus/alerts.yml"), dir.join("alerts.yml")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .expect("spawn prometheus");
        Self { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until the scoretap job's target has been scraped successfully (health "up").
    async fn wait_target_up(&mut self, job: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("prometheus exited with {st}:\n{}", self.log());
            }
            if let Some(r) = scoretap_tests::traces::admin_request(
                self.addr,
                "GET",
                "/api/v1/targets?state=active",
                &[],
                b"",
            )
            .await
            {
                if r.status() == 200 {
                    let v = r.json();
                    if let Some(t) = v["data"]["activeTargets"]
                        .as_array()
                        .and_then(|a| a.iter().find(|t| t["labels"]["job"] == job))
                    {
                        if t["health"] == "up" {
                            return t.clone();
                        }
                    }
                }
            }
            assert!(
                started.elapsed() < limit,
                "prometheus: job {job} not up within {limit:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for ComposePrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scoretap <args>` with exactly `env` (nothing inherited): (status, stdout, stderr).
fn run_clean(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(scoretap_tests::process::scoretap_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// compose's stack on this host: the scoretap service's environment (image ENV under compose's),
/// the example scoring server (azmlinfsrv + score.py, as the model service runs it), a real
/// Azurite on the endpoint's place, Prometheus with compose's config. First without the init
/// step, to show what happens when the container is missing (the uploads fail and are retried,
/// the batch waits in the spool, the pod stays ready); then the container is created, as
/// azurite-init does, and the batch arrives. `scoretap traces` as the compose header shows it
/// reads it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_environment_with_model_azurite_and_prometheus_on_the_host() {
    let started = Instant::now();
    let Some(azurite) = Azurite::start_or_skip().await else {
        return;
    };
    let comp = compose();
    let model_cmd: Vec<&str> = items(get(&comp, &["services", "model", "command"]))
        .into_iter()
        .map(s)
        .collect();
    let model = ScoringServer::start(&model_cmd.join(" ")).await;
    eprintln!("compose: model up after {:?}", started.elapsed());
    let stand_in = if model.is_none() {
        Some(TestUpstream::start().await)
    } else {
        None
    };
    let upstream = model
        .as_ref()
        .map(ScoringServer::url)
        .or_else(|| stand_in.as_ref().map(TestUpstream::url))
        .unwrap();

    let file = "deploy/compose.yaml";
    let t = target(file);
    let mut env = container_env(&t);
    let volume = TempDir::new("deploy-compose-volume");
    localize(&mut env, volume.path(), &upstream);
    assert!(env["SCORETAP_AZURE_ENDPOINT"].starts_with("http://azurite:"));
    env.insert("SCORETAP_AZURE_ENDPOINT".into(), azurite.endpoint());
    let (container, _) = az_store(&env["SCORETAP_STORE"]);
    let batch_age = duration(&env["SCORETAP_TRACE_BATCH_AGE"]);

    let mut run = HostRun::spawn(&entrypoint_args(&t), &env, volume.path());
    run.wait_healthy(Duration::from_secs(20)).await;
    let prometheus = match scoretap_tests::prometheus::require("prometheus") {
        Some(bin) => Some(ComposePrometheus::start(&bin, "scoretap:9901", run.admin).await),
        None => None,
    };

    let r = post_score(
        run.listen,
        "deploy-compose-1",
        r#"{"data": [[1,2,3,4,5,6,7,8,9,10]]}"#,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    if model.is_some() {
        assert!(
            r.text().contains("385.5"),
            "score.py's answer: {}",
            r.text()
        );
    }

    eprintln!(
        "compose: scored through scoretap after {:?}",
        started.elapsed()
    );
    // No container yet: the sealed batch fails to upload, is retried, and stays in the spool.
    let state = wait_storage(
        run.admin,
        batch_age + Duration::from_secs(20),
        "a failed upload attempt",
        |st| st["upload_failed_attempts"].as_u64().unwrap_or(0) > 0,
    )
    .await;
    assert!(state["storage"]["uploads_pending"].as_u64().unwrap() >= 1);
    assert!(state["storage"]["spool_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        run.admin_get("/readyz").await.map(|x| x.0),
        Some(200),
        "storage does not make scoretap unready"
    );
    assert!(
        run.stderr().contains("ContainerNotFound"),
        "the log names the cause"
    );
    let spool_dir = PathBuf::from(&env["SCORETAP_SPOOL_DIR"]);
    assert!(!data_files(&spool_dir).is_empty());

    eprintln!(
        "compose: upload failing as expected after {:?}",
        started.elapsed()
    );
    // azurite-init: the container is created; the retried upload goes through.
    azurite.create_container(&container).await;
    wait_uploaded(run.admin, Duration::from_secs(60)).await;
    eprintln!("compose: uploaded after {:?}", started.elapsed());
    assert!(data_files(&spool_dir).is_empty());
    let store = azurite.remote_store(&store_client_location(&env)).await;
    let records = stored_records(&store).await;
    let (_, record) = records
        .iter()
        .find(|(_, r)| r.correlation_id() == "deploy-compose-1")
        .expect("the record reached Azurite");
    assert_eq!(record.u64_at("/response/status"), Some(200));

    // Reading it back as the compose header says (the emulator's account and key implied).
    let (ok, out, err) = run_clean(
        &[
            "traces",
            "--store",
            &env["SCORETAP_STORE"],
            "--azure-endpoint",
            &azurite.endpoint(),
            "--contains",
            "deploy-compose-1",
        ],
        &[("AZURE_STORAGE_USE_EMULATOR", "true")],
    );
    assert!(ok, "scoretap traces: {err}");
    assert!(out.contains("deploy-compose-1"), "{out}");
    let header = read(file);
    assert!(header.contains("AZURE_STORAGE_USE_EMULATOR=true scoretap traces --store az://"));

    if let Some(mut prom) = prometheus {
        // compose's scrape interval (15s) unchanged: the first scrape comes within it.
        let target = prom
            .wait_target_up("scoretap", Duration::from_secs(40))
            .await;
        assert_eq!(target["scrapeUrl"], format!("http://{}/metrics", run.admin));
        eprintln!(
            "compose: Prometheus scraped scoretap after {:?}",
            started.elapsed()
        );
    }

    let grace = duration(s(at(&comp, &["services", "scoretap", "stop_grace_period"])));
    run.sigterm();
    assert!(run.wait_exit(grace).await.success());
    drop(stand_in);
}
