#!/usr/bin/env bash
# A screenshot of MLflow's compare-runs view for the two latest runs of an experiment, taken by a real
# headless browser (Chromium, from the system's packages) against `mlflow ui`. Run on demand, not in CI.
#
#   bash scripts/mlflow_screenshot.sh [STORE_URI] [EXPERIMENT] [OUTPUT.png]
#
# Defaults: sqlite:///mlruns/mlflow.db, experiment "recengine", docs/mlflow-compare.png. The store needs
# at least two finished runs in the experiment (two `recengine train` runs, e.g. with two feature sets).
# HEIGHT (pixels, default 2000) sets how much of the page (parameters, metrics) the picture holds.
set -euo pipefail

STORE="${1:-sqlite:///mlruns/mlflow.db}"
EXPERIMENT="${2:-recengine}"
OUTPUT="${3:-docs/mlflow-compare.png}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
    echo "Chromium is not installed; installing it from the system's packages (apt-get install chromium)..." >&2
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
        echo "Error: cannot install Chromium without root; run 'apt-get install -y chromium' as root, then this again." >&2
        exit 2
    fi
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq chromium >/dev/null
    browser="$(command -v chromium)"
fi

port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PYTHON" -m mlflow ui --backend-store-uri "$STORE" --host 127.0.0.1 --port "$port" --workers 1 >/dev/null 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT

# The two latest finished runs of the experiment, and the compare view's URL for them.
url="$("$PYTHON" - "$port" "$EXPERIMENT" <<'EOF'
import json, sys, time, urllib.parse, urllib.request

port, experiment = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"

def call(path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())

for _ in range(120):
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("Error: mlflow ui did not start within 60 s.")
try:
    found = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + urllib.parse.quote(experiment))
except urllib.error.HTTPError:
    sys.exit(f"Error: no experiment '{experiment}' in the store; train twice first (recengine train --experiment {experiment}).")
eid = found["experiment"]["experiment_id"]
runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [eid], "max_results": 2,
                                             "filter": "attributes.status = 'FINISHED'",
                                             "order_by": ["attributes.start_time DESC"]}).get("runs", [])
if len(runs) < 2:
    sys.exit(f"Error: experiment '{experiment}' has {len(runs)} finished run(s); the compare view needs two.")
ids = [run["info"]["run_id"] for run in reversed(runs)]
print("comparing", ", ".join(f"'{run['info']['run_name']}' ({run['info']['run_id']})" for run in reversed(runs)), file=sys.stderr)
# workflowType: MLflow 3 opens on its GenAI view; this selects the model-training one.
print(f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}&experiments={urllib.parse.quote(json.dumps([eid]))}"
      "&workflowType=machine_learning")
EOF
)"

mkdir -p "$(dirname "$OUTPUT")"
# --no-sandbox: Chromium refuses to run as root otherwise (containers); the page is our own local UI.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,${HEIGHT:-2000} \
    --virtual-time-budget=15000 --screenshot="$OUTPUT" "$url" 2>/dev/null
echo "screenshot of the compare view written to $OUTPUT ($(du -k "$OUTPUT" | cut -f1) KB)"
