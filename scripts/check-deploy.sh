#!/usr/bin/env bash
# Validates what can be validated of deploy/ without a container engine or
# a cluster: every YAML document parses, the dashboard is JSON, the
# Prometheus rules pass `promtool check rules`. (Building the image needs a
# container engine: `docker build -f deploy/Dockerfile .`.)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null 2>&1 || { echo "check-deploy: python3 not found" >&2; exit 1; }
python3 -c 'import yaml' 2>/dev/null || { echo "check-deploy: PyYAML missing: apt-get install python3-yaml" >&2; exit 1; }
command -v promtool >/dev/null 2>&1 || { echo "check-deploy: promtool missing: apt-get install prometheus" >&2; exit 1; }
python3 - <<'PY'
import glob, json, sys, yaml
files = sorted(glob.glob("deploy/**/*.y*ml", recursive=True))
for f in files:
    with open(f) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    if not docs:
        sys.exit(f"check-deploy: {f} holds no YAML document")
    for d in docs:
        if f.startswith("deploy/k8s/") and not {"apiVersion", "kind", "metadata"} <= set(d):
            sys.exit(f"check-deploy: {f}: a Kubernetes object needs apiVersion, kind and metadata")
    print(f"ok  {f} ({len(docs)} document(s))")
for f in sorted(glob.glob("deploy/**/*.json", recursive=True)):
    json.load(open(f))
    print(f"ok  {f}")
PY
promtool check rules deploy/prometheus/alerts.yml
