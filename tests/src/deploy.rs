//! Reading the deployment files under `deploy/` (Dockerfile, Kubernetes/ACI manifests, compose)
//! for `tests/tests/deploy.rs`.
//!
//! No YAML crate: [`parse_yaml`] reads the block-style subset these files are written in
//! (mappings, sequences, `- key: value` items, plain/quoted scalars, `[a, b]` flow sequences of
//! scalars, `{}`, comments, `---` documents) into `serde_json::Value`s whose scalars are all
//! strings. Anything outside that subset (anchors, block scalars `|`/`>`, multi-line flow
//! collections) panics, so a manifest edit that needs more fails loudly here instead of being
//! silently misread.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::util::workspace_root;

/// Path of a file under the workspace root, e.g. `deploy/aks/sidecar.yaml`.
pub fn path(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

/// Contents of a file under the workspace root.
pub fn read(rel: &str) -> String {
    std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Parse a (multi-document) YAML file of the supported subset.
pub fn parse_yaml_file(rel: &str) -> Vec<Value> {
    parse_yaml(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[derive(Debug, Clone)]
struct Line {
    no: usize,
    indent: usize,
    text: String,
}

/// Parse YAML text (the subset described in the module docs) into one value per document.
pub fn parse_yaml(src: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    let mut cur: Vec<Line> = Vec::new();
    for (i, raw) in src.lines().enumerate() {
        if raw.trim_end() == "---" {
            if !cur.is_empty() {
                docs.push(parse_doc(std::mem::take(&mut cur))?);
            }
            continue;
        }
        if raw.contains('\t') && raw.trim_start().starts_with('\t') {
            return Err(format!("line {}: tab indentation", i + 1));
        }
        let text = strip_comment(raw);
        let trimmed = text.trim_end();
        if trimmed.trim().is_empty() {
            continue;
        }
        let indent = trimmed.len() - trimmed.trim_start().len();
        cur.push(Line {
            no: i + 1,
            indent,
            text: trimmed.trim_start().to_string(),
        });
    }
    if !cur.is_empty() {
        docs.push(parse_doc(cur)?);
    }
    Ok(docs)
}

fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn parse_doc(mut lines: Vec<Line>) -> Result<Value, String> {
    let mut i = 0;
    let indent = lines[0].indent;
    let v = parse_block(&mut lines, &mut i, indent)?;
    if i < lines.len() {
        return Err(format!(
            "line {}: unexpected indentation or content {:?}",
            lines[i].no, lines[i].text
        ));
    }
    Ok(v)
}

fn is_seq_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

fn parse_block(lines: &mut [Line], i: &mut usize, indent: usize) -> Result<Value, String> {
    if is_seq_item(&lines[*i].text) {
        parse_seq(lines, i, indent)
    } else {
        parse_map(lines, i, indent)
    }
}

fn parse_seq(lines: &mut [Line], i: &mut usize, indent: usize) -> Result<Value, String> {
    let mut items = Vec::new();
    while *i < lines.len() && lines[*i].indent == indent && is_seq_item(&lines[*i].text) {
        let rest = lines[*i].text[1..].to_string();
        let inner = rest.trim_start();
        if inner.is_empty() {
            *i += 1;
            if *i < lines.len() && lines[*i].indent > indent {
                let ind = lines[*i].indent;
                items.push(parse_block(lines, i, ind)?);
            } else {
                items.push(Value::Null);
            }
        } else if split_key(inner).is_some() || is_seq_item(inner) {
            // `- key: value` (a mapping item) or `- - x`: re-read the line as if the item's
            // content started on its own line at the column after "- ".
            let ind = indent + 1 + (rest.len() - inner.len());
            lines[*i].indent = ind;
            lines[*i].text = inner.to_string();
            items.push(parse_block(lines, i, ind)?);
        } else {
            items.push(scalar(inner, lines[*i].no)?);
            *i += 1;
        }
    }
    Ok(Value::Array(items))
}

/// `key: rest` or `key:` (outside quotes) → (key, rest).
fn split_key(text: &str) -> Option<(String, String)> {
    let (mut single, mut double) = (false, false);
    let bytes = text.as_bytes();
    for (idx, c) in text.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            ':' if !single && !double => {
                let end = idx + 1 == bytes.len();
                if end || bytes[idx + 1] == b' ' {
                    let key = unquote(text[..idx].trim());
                    if key.is_empty() || text.starts_with('[') || text.starts_with('{') {
                        return None;
                    }
                    return Some((key, text[idx + 1..].trim().to_string()));
                }
            }
            _ => {}
        }
    }
    None
}

fn unquote(s: &str) -> String {
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        let inner = &s[1..s.len() - 1];
        if s.starts_with('"') {
            inner.replace("\\\"", "\"").replace("\\\\", "\\")
        } else {
            inner.replace("''", "'")
        }
    } else {
        s.to_string()
    }
}

fn scalar(s: &str, no: usize) -> Result<Value, String> {
    let s = s.trim();
    if s.starts_with('&') || s.starts_with('*') || s.starts_with('!') {
        return Err(format!(
            "line {no}: anchors, aliases and tags are not supported"
        ));
    }
    if s == "|" || s == ">" || s.starts_with("|-") || s.starts_with(">-") {
        return Err(format!("line {no}: block scalars are not supported"));
    }
    if s == "{}" {
        return Ok(Value::Object(Map::new()));
    }
    if s.starts_with('{') {
        return Err(format!("line {no}: flow mappings are not supported"));
    }
    if let Some(inner) = s.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("line {no}: multi-line flow sequence"))?;
        let mut items = Vec::new();
        let (mut single, mut double, mut start) = (false, false, 0);
        for (idx, c) in inner.char_indices() {
            match c {
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                ',' if !single && !double => {
                    items.push(Value::String(unquote(inner[start..idx].trim())));
                    start = idx + 1;
                }
                _ => {}
            }
        }
        if !inner[start..].trim().is_empty() {
            items.push(Value::String(unquote(inner[start..].trim())));
        }
        return Ok(Value::Array(items));
    }
    Ok(Value::String(unquote(s)))
}

fn parse_map(lines: &mut [Line], i: &mut usize, indent: usize) -> Result<Value, String> {
    let mut map = Map::new();
    while *i < lines.len() && lines[*i].indent == indent && !is_seq_item(&lines[*i].text) {
        let no = lines[*i].no;
        let (key, rest) = split_key(&lines[*i].text)
            .ok_or_else(|| format!("line {no}: expected `key: value`, got {:?}", lines[*i].text))?;
        *i += 1;
        let value = if rest.is_empty() {
            match lines.get(*i) {
                Some(next) if next.indent > indent => {
                    let ind = next.indent;
                    parse_block(lines, i, ind)?
                }
                // A sequence may sit at its key's own indentation.
                Some(next) if next.indent == indent && is_seq_item(&next.text) => {
                    parse_seq(lines, i, indent)?
                }
                _ => Value::Null,
            }
        } else {
            scalar(&rest, no)?
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(format!("line {no}: duplicate key {key:?}"));
        }
    }
    Ok(Value::Object(map))
}

// ---- Dockerfile ------------------------------------------------------------------------------

/// A Dockerfile's instructions of the final stage: (INSTRUCTION, arguments), continuation lines
/// joined, comments dropped.
pub fn dockerfile_final_stage(src: &str) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(t);
        let full = std::mem::take(&mut pending);
        let (ins, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        all.push((ins.to_ascii_uppercase(), args.trim().to_string()));
    }
    let last_from = all
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .expect("Dockerfile has a FROM");
    all.split_off(last_from)
}

/// `ENV K=V K2="V 2"` pairs of the given instructions (the `ENV K V` form is rejected).
pub fn dockerfile_env(instrs: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (_, args) in instrs.iter().filter(|(i, _)| i == "ENV") {
        for tok in split_ws_quoted(args) {
            let (k, v) = tok
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV {args:?}: use the KEY=VALUE form"));
            out.push((k.to_string(), unquote(v)));
        }
    }
    out
}

fn split_ws_quoted(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The strings of a JSON-array (exec form) instruction argument, e.g. `["/bin/x", "--y"]`.
pub fn exec_form(args: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("{args:?} is not the exec (JSON array) form: {e}"));
    v.as_array()
        .unwrap_or_else(|| panic!("{args:?} is not an array"))
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

// ---- values --------------------------------------------------------------------------------

/// `v[a][b]...` through objects (by key) and arrays (by index); panics with the path if missing.
pub fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for (n, k) in path.iter().enumerate() {
        let next = match cur {
            Value::Object(m) => m.get(*k),
            Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        cur = next.unwrap_or_else(|| panic!("missing {:?} in {cur}", &path[..=n]));
    }
    cur
}

/// Like [`at`] but `None` when missing.
pub fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for k in path {
        cur = match cur {
            Value::Object(m) => m.get(*k)?,
            Value::Array(a) => a.get(k.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A scalar as a string (all scalars are strings in [`parse_yaml`]'s output).
pub fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a scalar, got {v}"))
}

/// A scalar as an unsigned integer.
pub fn u(v: &Value) -> u64 {
    s(v).parse()
        .unwrap_or_else(|e| panic!("expected an integer, got {v}: {e}"))
}

/// Elements of a sequence (empty if missing/null).
pub fn items(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        _ => Vec::new(),
    }
}

/// The element of a sequence whose `name` is `name`.
pub fn named<'a>(seq: &'a Value, name: &str) -> &'a Value {
    seq.as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| get(x, &["name"]).and_then(Value::as_str) == Some(name))
        })
        .unwrap_or_else(|| panic!("no element named {name:?} in {seq}"))
}

/// The first document of `docs` with `kind: <kind>`.
pub fn doc_of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| get(d, &["kind"]).and_then(Value::as_str) == Some(kind))
        .unwrap_or_else(|| panic!("no document of kind {kind}"))
}

/// A Kubernetes/ACI `env`/`environmentVariables` list as name → value. Entries without a literal
/// `value` (`valueFrom`, `secureValue`) get `placeholder` so the name is still checked.
pub fn env_list(list: Option<&Value>, placeholder: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in items(list) {
        let name = s(at(e, &["name"])).to_string();
        let value = get(e, &["value"])
            .map(|v| s(v).to_string())
            .unwrap_or_else(|| placeholder.to_string());
        assert!(
            out.insert(name.clone(), value).is_none(),
            "duplicate env {name}"
        );
    }
    out
}

/// A compose `environment:` (mapping or `KEY=VALUE` list) as name → value.
pub fn compose_env(v: Option<&Value>) -> BTreeMap<String, String> {
    match v {
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| (k.clone(), s(v).to_string()))
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                let (k, v) = s(x).split_once('=').expect("KEY=VALUE");
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Kubernetes memory quantity (`256Mi`, `1Gi`, `512M`, `1G`, `1024Ki`, plain bytes) in bytes.
/// Also compose's `256m`/`1g` style (binary units, as docker reads them).
pub fn memory_bytes(q: &str) -> u64 {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let n: f64 = num.parse().unwrap_or_else(|e| panic!("memory {q:?}: {e}"));
    let mult: f64 = match unit {
        "" | "b" | "B" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        // docker/compose: k, m, g are binary.
        "k" | "kb" => 1024.0,
        "m" | "mb" => 1024.0 * 1024.0,
        "g" | "gb" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("memory {q:?}: unknown unit {unit:?}"),
    };
    (n * mult) as u64
}

/// A duration as printed by `--check-config` or written in manifests: `25s`, `1m`, `1s 500ms`,
/// `1m30s`, `40` (seconds, Kubernetes style).
pub fn duration(d: &str) -> Duration {
    let d = d.trim();
    if let Ok(secs) = d.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = d;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let n_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or_else(|| panic!("duration {d:?}: number without unit"));
        let n: u64 = rest[..n_end]
            .parse()
            .unwrap_or_else(|e| panic!("duration {d:?}: {e}"));
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..u_end];
        rest = &rest[u_end..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "us" => Duration::from_micros(n),
            "ns" => Duration::from_nanos(n),
            _ => panic!("duration {d:?}: unknown unit {unit:?}"),
        };
    }
    total
}

/// The port of a `HOST:PORT` listen address.
pub fn addr_port(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not HOST:PORT"))
}

/// `--flag` tokens (with `=value` cut off) of an argument list.
pub fn flags_of(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// Does `scoretap run --help` output document the environment variable `name`? (clap prints
/// `[env: NAME=...]`, or `[env: NAME]` for hidden values, possibly wrapped before the name.)
pub fn help_has_env(help: &str, name: &str) -> bool {
    help.contains(&format!("{name}=")) || help.contains(&format!("{name}]"))
}

/// Does `scoretap run --help` output document the flag `--name`?
pub fn help_has_flag(help: &str, flag: &str) -> bool {
    help.split(|c: char| c.is_whitespace() || c == ',')
        .any(|tok| tok == flag)
}

// ---- environment entries -------------------------------------------------------------------

/// Where a Kubernetes/ACI environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSource {
    /// `value: "..."`.
    Literal(String),
    /// `valueFrom: fieldRef: fieldPath: ...` (Kubernetes fills it in).
    FieldRef(String),
    /// `valueFrom: secretKeyRef: {name, key}`.
    SecretKeyRef { name: String, key: String },
    /// ACI `secureValue: "..."` (a secure environment variable).
    SecureValue(String),
}

/// One `env`/`environmentVariables` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub name: String,
    pub source: EnvSource,
}

/// A Kubernetes `env` or ACI `environmentVariables` list, with where each value comes from.
/// Panics on a kind of entry these files do not use (so a new one is looked at, not skipped).
pub fn env_entries(list: Option<&Value>) -> Vec<EnvEntry> {
    items(list)
        .into_iter()
        .map(|e| {
            let name = s(at(e, &["name"])).to_string();
            let source = if let Some(v) = get(e, &["value"]) {
                EnvSource::Literal(s(v).to_string())
            } else if let Some(v) = get(e, &["secureValue"]) {
                EnvSource::SecureValue(s(v).to_string())
            } else if let Some(f) = get(e, &["valueFrom", "fieldRef", "fieldPath"]) {
                EnvSource::FieldRef(s(f).to_string())
            } else if let Some(r) = get(e, &["valueFrom", "secretKeyRef"]) {
                EnvSource::SecretKeyRef {
                    name: s(at(r, &["name"])).to_string(),
                    key: s(at(r, &["key"])).to_string(),
                }
            } else {
                panic!("env entry {name}: unsupported kind {e}")
            };
            EnvEntry { name, source }
        })
        .collect()
}

/// `envFrom: - secretRef: name: X` names of a Kubernetes container.
pub fn env_from_secrets(container: &Value) -> Vec<String> {
    items(get(container, &["envFrom"]))
        .into_iter()
        .filter_map(|e| get(e, &["secretRef", "name"]).map(|n| s(n).to_string()))
        .collect()
}

/// Does `value` look like key material: a run of at least 32 base64 characters (an account key
/// is 88, a SAS signature 44+), or a SAS query (`sig=`) / connection-string key (`AccountKey=`)?
/// Placeholders (`<storage-account-key>`), URLs, paths and names do not.
pub fn looks_like_secret(value: &str) -> bool {
    for marker in ["sig=", "AccountKey=", "SharedAccessSignature="] {
        let mut rest = value;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            if rest.chars().next().is_some_and(|c| c != '<' && c != ';') {
                return true;
            }
        }
    }
    let mut run = 0usize;
    let mut mixed = (false, false, false);
    for c in value.chars() {
        if c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=' {
            run += 1;
            mixed.0 |= c.is_ascii_uppercase();
            mixed.1 |= c.is_ascii_lowercase();
            mixed.2 |= c.is_ascii_digit();
            if run >= 32 && mixed.0 && mixed.1 && mixed.2 {
                return true;
            }
        } else {
            run = 0;
            mixed = (false, false, false);
        }
    }
    false
}

/// The seconds of `const NAME: Duration = Duration::from_secs(N);` in a Rust source file: how
/// the tests learn a deadline the binary has no flag for (e.g. the collector's stop deadline).
pub fn source_const_secs(rel: &str, name: &str) -> Duration {
    let src = read(rel);
    let pattern = format!("const {name}: Duration = Duration::from_secs(");
    let start = src
        .find(&pattern)
        .unwrap_or_else(|| panic!("{rel} has no `{pattern}N)`: update this test's reading of it"))
        + pattern.len();
    let end = src[start..]
        .find(')')
        .unwrap_or_else(|| panic!("{rel}: unterminated {name}"))
        + start;
    Duration::from_secs(
        src[start..end]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{rel}: {name} is not whole seconds: {e}")),
    )
}

// ---- running a container's entrypoint on the host ----------------------------------------------

/// scoretap started the way a container runtime starts the image: the entrypoint's arguments,
/// exactly the given environment (nothing inherited from the test process: no `PATH`, no
/// `AZURE_*` the store tests set), and `workdir` standing in for the image's `WORKDIR`.
/// Killed on drop; its stderr is shown when the test fails.
#[derive(Debug)]
pub struct HostRun {
    child: std::process::Child,
    pub listen: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    logs: crate::util::TempDir,
    exit: Option<std::process::ExitStatus>,
}

impl HostRun {
    /// Spawns `scoretap args` with `env` in `workdir`; the proxy and admin addresses are read
    /// from `SCORETAP_LISTEN` / `SCORETAP_ADMIN_LISTEN` in `env`.
    pub fn spawn(
        args: &[String],
        env: &BTreeMap<String, String>,
        workdir: &std::path::Path,
    ) -> Self {
        use std::process::{Command, Stdio};
        let addr = |name: &str| -> std::net::SocketAddr {
            env.get(name)
                .unwrap_or_else(|| panic!("{name} is not set"))
                .parse()
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let logs = crate::util::TempDir::new("hostrun");
        let stderr = std::fs::File::create(logs.join("stderr")).expect("stderr file");
        let stdout = std::fs::File::create(logs.join("stdout")).expect("stdout file");
        let child = Command::new(crate::process::scoretap_bin())
            .args(args)
            .env_clear()
            .envs(env)
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn scoretap: {e}"));
        Self {
            child,
            listen: addr("SCORETAP_LISTEN"),
            admin: addr("SCORETAP_ADMIN_LISTEN"),
            logs,
            exit: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far (the logs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.join("stderr")).unwrap_or_default()
    }

    /// Has it exited? (non-blocking)
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    /// Waits until `GET /healthz` answers 200 and the proxy port accepts; panics (with the log)
    /// if the process exits or `limit` passes first.
    pub async fn wait_healthy(&mut self, limit: Duration) {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "scoretap exited during startup with {status}\n--- stderr ---\n{}",
                    self.stderr()
                );
            }
            if let Some((200, _)) = crate::raw::try_get(self.admin, "/healthz").await {
                if tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                    return;
                }
            }
            assert!(
                started.elapsed() < limit,
                "scoretap not healthy on {} within {limit:?}\n--- stderr ---\n{}",
                self.admin,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET path` on the admin listener → (status, body); None when it does not answer.
    pub async fn admin_get(&self, path: &str) -> Option<(u16, Vec<u8>)> {
        crate::raw::try_get(self.admin, path).await
    }

    /// Sends SIGTERM (what the kubelet does after preStop).
    pub fn sigterm(&self) {
        crate::process::signal(self.pid(), "TERM");
    }

    /// Waits for the exit; panics (with the log) after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "scoretap did not exit within {limit:?}\n--- stderr ---\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HostRun {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- scoretap (host run) stderr ---\n{}\n--- end ---",
                self.stderr()
            );
        }
    }
}

/// Files under `root`, leaving out scoretap's own bookkeeping (`.scoretap/`: sequence numbers).
pub fn data_files(root: &std::path::Path) -> Vec<PathBuf> {
    crate::traces::walk(root)
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == ".scoretap"))
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn yaml_subset() {
        let docs = parse_yaml(
            "a: 1 # c\nb:\n  - name: x\n    value: \"0.0.0.0:80\"\n  - y\nc: [\"p\", 'q', r]\nd: {}\n---\nk:\n- 1\n- 2\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(s(at(&docs[0], &["a"])), "1");
        assert_eq!(s(at(&docs[0], &["b", "0", "value"])), "0.0.0.0:80");
        assert_eq!(s(at(&docs[0], &["b", "1"])), "y");
        assert_eq!(s(at(&docs[0], &["c", "1"])), "q");
        assert_eq!(u(at(&docs[1], &["k", "1"])), 2);
        assert!(parse_yaml("a: |\n  x\n").is_err());
    }

    #[test]
    fn secrets_are_recognised() {
        assert!(looks_like_secret(
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
        ));
        assert!(looks_like_secret("sv=2022-11-02&ss=b&sig=abc"));
        assert!(looks_like_secret(
            "DefaultEndpointsProtocol=https;AccountKey=x"
        ));
        assert!(!looks_like_secret(
            "AccountName=a;AccountKey=<azurite-key>;"
        ));
        for fine in [
            "<storage-account-key>",
            "az://scoring-data/my-model",
            "http://azurite:10000/devstoreaccount1",
            "https://login.microsoftonline.com",
            "/var/lib/scoretap/spool",
            "myregistry.azurecr.io/scoretap:0.1.0",
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert!(!looks_like_secret(fine), "{fine}");
        }
    }

    #[test]
    fn units() {
        assert_eq!(memory_bytes("256Mi"), 256 << 20);
        assert_eq!(memory_bytes("1Gi"), 1 << 30);
        assert_eq!(duration("1s 500ms"), Duration::from_millis(1500));
        assert_eq!(duration("1m"), Duration::from_secs(60));
        assert_eq!(duration("40"), Duration::from_secs(40));
    }
}
