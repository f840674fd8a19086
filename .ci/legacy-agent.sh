#!/usr/bin/env bash
# Legacy device stack: the agent on numpy<2 + tflite-runtime 2.14 (no ai-edge-litert),
# which is what many deployed devices still run. Builds .venv-legacy (python3.11) with
# the project installed --no-deps and the agent's runtime dependencies pinned for that
# stack, then runs tests/legacy. Torch, the compiler and the hub's web/database
# dependencies are deliberately absent: the agent must not need them.
#
#   bash .ci/legacy-agent.sh            # build (or reuse) .venv-legacy and test
#   LEGACY_VENV=/tmp/v bash .ci/legacy-agent.sh
#
# Extra pytest arguments are passed through: bash .ci/legacy-agent.sh -k litert
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${LEGACY_PYTHON:-python3.11}"
if ! command -v "$PY" >/dev/null 2>&1; then
  # The main venv's interpreter is a 3.11 too; use it to seed the legacy venv.
  if [ -x .venv/bin/python3.11 ]; then PY=.venv/bin/python3.11; else
    echo "python3.11 is required for the legacy stack" >&2; exit 2; fi
fi
VENV="${LEGACY_VENV:-.venv-legacy}"
export PATH="$PATH:/usr/sbin"

# The pins describe the device stack, not the newest releases: keep them in one place.
PINS=(
  "numpy>=1.24,<2"                 # numpy 1.26.x
  "tflite-runtime==2.14.0"         # the LiteRT fallback (agent/runtimes/litert.py)
  "onnxruntime==1.18.1"            # last release built against numpy 1.x
  "onnx>=1.16,<1.17"               # tests build tiny models; 1.16 is numpy-1 built
  "datasketches==5.0.2"            # numpy-1 built; the sketch wire format is unchanged
  "paho-mqtt>=2.0,<3"
  "orjson>=3.10"                   # V2 JSON (agent/v2.py); float16 from 3.10
  "cryptography>=42"
  "tuf>=5,<8"
  "securesystemslib>=1.0"
  "pydantic>=2.6,<3"
  "psutil>=5.9"
  "prometheus-client>=0.20"        # GET /metrics (agent/metrics.py)
  "click>=8.1"                     # base dependencies of the package (the CLI)
  "rich>=13"
  "pytest>=8"
  "pytest-timeout>=2.3"
)

stamp="$VENV/.legacy-pins"
want="$(printf '%s\n' "${PINS[@]}")"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "building $VENV with $($PY -V)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  printf '%s\n' "$want" >"$stamp"
fi

# Fail loudly if the stack drifted (a newer numpy or ai-edge-litert sneaking in).
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import numpy, onnxruntime, tflite_runtime
bad = []
if int(numpy.__version__.split(".")[0]) >= 2:
    bad.append(f"numpy {numpy.__version__}")
for forbidden in ("ai_edge_litert", "torch", "fastapi", "sqlmodel", "pydantic_settings"):
    if importlib.util.find_spec(forbidden) is not None:
        bad.append(f"{forbidden} is installed")
print(f"legacy stack: numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"tflite-runtime {tflite_runtime.__version__}", file=sys.stderr)
if bad:
    sys.exit("legacy stack is not legacy: " + ", ".join(bad))
PY

# tests/agent files that also run here, unchanged. Each needs none of torch, the
# compiler, ai-edge-litert or the hub's web/database stack (fastapi, sqlmodel,
# pydantic-settings) and imports no hub module at the top; tests/agent/conftest.py
# imports hub.repository only inside the bench fixtures. A few tests below do use a
# bench (one each in test_config, test_metrics, test_spool_faults): that needs only
# hub.repository (tuf, securesystemslib, cryptography), as tests/legacy does.
# Left out: files that import hub modules or need the hub's extras (test_deployments,
# test_trust_helper, test_fault_injection), and the files built on the bench (an agent,
# broker and repository per test: test_candidates,
# test_health_rollback, test_inbound, test_localapi, test_restart_faults, test_serving,
# test_transfer), which take minutes; tests/legacy/test_deployment.py and test_stack.py
# cover that path in short form. test_capture_feedback does use benches, but it
# caught numpy 1.x storing np.savez's allow_pickle keyword as an array, so it runs
# here (14 s). Together the files below take about 40 s.
AGENT_TESTS=(
  tests/agent/test_bundle.py          # bundle format: truncated, oversized, traversal
  tests/agent/test_capture_feedback.py # captured samples (npz) and labels
  tests/agent/test_clock.py           # sketches (datasketches) and probes vs clock steps
  tests/agent/test_config.py          # settings files, environment, CLI errors
  tests/agent/test_health_probes.py   # http/exec/file probes
  tests/agent/test_hooks.py           # deployment hooks: timeouts, environment
  tests/agent/test_memory.py          # page release under onnxruntime 1.18
  tests/agent/test_metrics.py         # /metrics with prometheus-client
  tests/agent/test_npz_limits.py      # bounded .npz reading on numpy 1.x
  tests/agent/test_profiles.py        # firmware profile files
  tests/agent/test_protocol.py        # MQTT payloads and frames
  tests/agent/test_slots.py           # A/B slots and disk space
  tests/agent/test_spool_faults.py    # the telemetry spool (sqlite)
  tests/agent/test_transfer_faults.py # HTTP/MQTT transfer faults
  tests/agent/test_v2_codec.py        # V2 JSON/binary codec on numpy 1.x
)

exec "$VENV/bin/python" -m pytest tests/legacy "${AGENT_TESTS[@]}" -q -p no:cacheprovider "$@"
