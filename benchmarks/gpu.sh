#!/usr/bin/env bash
# The GPU path, ready to prove: on a host with an NVIDIA GPU, make onnxruntime run on
# CUDA (and TensorRT when its provider can be installed), check it from the sessions'
# own get_providers(), then run the serving benchmark for raw onnxruntime at batch
# 1..64 and for the service at concurrency 1..64. Everything lands in one folder:
# $OUT if set, else ./gpu-results (gpu-result.json and gpu-result.md say what happened).
#
#   bash benchmarks/gpu.sh                  # the whole check, within 8 minutes
#   MODELS="DIR1 DIR2" bash benchmarks/gpu.sh   # exports to use (model.onnx + card);
#                                           # default: .thyroid-cad/bench/models/*, else
#                                           # exported here when TensorFlow is installed
#   QUICK=1 bash benchmarks/gpu.sh          # tiny model, seconds (the test suite's run)
#
# Offline-friendly: installs come from wheels in ./.whl when present, else from the
# package index, each bounded in time; a host that can reach neither keeps what it has
# and the result says what was missing. Without a GPU it exits 0 with a "no GPU" result.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu.log
: >"$LOG"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-450} # the harness's share of the 8 minutes
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

log() { echo "$(date +%T) $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# status (no-gpu | ok | cuda-unavailable | benchmark-failed), message, exit code
finish() {
    "$PYTHON" - "$OUT" "$1" "$2" "$(($(date +%s) - T0))" <<'PY'
import json, sys
from pathlib import Path

out, status, message, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
def read(name):
    p = out / name
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None
result = {"status": status, "gpu": status not in ("no-gpu",), "message": message,
          "seconds": seconds, "providers": read("providers.json")}
gpus = out / "nvidia-smi.txt"
result["nvidia_smi"] = gpus.read_text().strip() if gpus.is_file() else None
bench = read("benchmarks-serve.json")
result["benchmark"] = "benchmarks-serve.json" if bench else None
(out / "gpu-result.json").write_text(json.dumps(result, indent=1))
lines = [f"# GPU check: {status}", "", message, "", f"Took {seconds} s. Log: gpu.log."]
p = result["providers"] or {}
for k in ("cuda", "tensorrt"):
    if k in p:
        v = p[k]
        lines.append(f"- {k}: requested {v.get('requested')}, sessions run on "
                     f"{v.get('active') or v.get('error')}")
if bench and (out / "benchmarks-serve.md").is_file():
    lines += ["", (out / "benchmarks-serve.md").read_text()]
(out / "gpu-result.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:8]))
PY
    exit "$3"
}

providers() { "$PYTHON" benchmarks/harness.py providers --out "$OUT/providers.json" >>"$LOG" 2>&1; }
active() { # $1 = cuda | tensorrt: 0 when sessions really run on that provider
    "$PYTHON" -c "import json,sys; sys.exit(0 if json.load(open('$OUT/providers.json')).get('$1', {}).get('runs_on_it') else 1)" 2>>"$LOG"
}
install() { # bounded pip install, from ./.whl first (offline hosts)
    local args=(-m pip install -q --disable-pip-version-check)
    if [ -d .whl ]; then args+=(--no-index --find-links .whl); fi
    log "installing $*"
    timeout 180 "$PYTHON" "${args[@]}" "$@" >>"$LOG" 2>&1 || log "install of $* failed (offline?)"
}
# CUDA libraries shipped as pip packages (nvidia-*), e.g. beside PyTorch: let the
# onnxruntime providers find them.
nvidia_libs() {
    "$PYTHON" -c "import glob, nvidia; print(':'.join(d for p in nvidia.__path__ for d in glob.glob(p + '/*/lib')))" 2>/dev/null
}

log "gpu.sh: python $($PYTHON -c 'import sys; print(sys.version.split()[0])') at $PYTHON, results in $OUT"
if ! "$PYTHON" -c "import onnxruntime, onnx, numpy" 2>>"$LOG"; then
    install onnxruntime onnx numpy
fi

# 1. Is there a GPU at all?
if ! command -v nvidia-smi >/dev/null 2>&1 ||
    ! nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>>"$LOG" || ! grep -q GPU "$OUT/nvidia-smi.txt"; then
    rm -f "$OUT/nvidia-smi.txt"
    providers || true
    finish no-gpu "no GPU: nvidia-smi is absent or lists no device. Sessions asked for CUDA \
run on the CPU here (see providers.json); nothing was benchmarked on a GPU." 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/nvidia-smi.txt" 2>&1
log "GPU: $(head -1 "$OUT/nvidia-smi.txt")"
LIBS=$(nvidia_libs)
if [ -n "$LIBS" ]; then export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi

# 2. onnxruntime on CUDA, checked on a real session
providers
if ! active cuda; then
    log "sessions do not run on CUDA; installing onnxruntime-gpu"
    "$PYTHON" -m pip uninstall -y -q onnxruntime >>"$LOG" 2>&1
    install "onnxruntime-gpu[cuda,cudnn]" || true
    LIBS=$(nvidia_libs)
    if [ -n "$LIBS" ]; then export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
    providers
fi
if ! active cuda; then
    finish cuda-unavailable "a GPU is present but onnxruntime sessions asked for CUDA do not run \
on it (providers.json; the log has onnxruntime's reason, e.g. a missing CUDA 13 / cuDNN 9 \
library or no onnxruntime-gpu wheel reachable from here)." 1
fi
log "CUDA provider active"

# 3. TensorRT, when its provider can be installed
if ! active tensorrt; then
    install "tensorrt-cu13" || true
    LIBS=$(nvidia_libs)
    if [ -n "$LIBS" ]; then export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
    # tensorrt wheels keep their libraries in tensorrt_libs/
    TRT=$("$PYTHON" -c "import tensorrt_libs, os; print(os.path.dirname(tensorrt_libs.__file__))" 2>/dev/null)
    if [ -n "$TRT" ]; then export LD_LIBRARY_PATH=$TRT:$LD_LIBRARY_PATH; fi
    providers
fi
if active tensorrt; then log "TensorRT provider active"; else log "TensorRT provider not usable (recorded)"; fi

# 4. The harness: raw batch 1..64, and the service when its packages are here
if ! "$PYTHON" -c "import fastapi, uvicorn, pydantic_settings, multipart, sqlalchemy, alembic, mlflow, simplejpeg, psutil, aiohttp" 2>>"$LOG"; then
    install -e ".[serve]" psutil aiohttp mlflow || true
fi
ARGS=(--gpu --out "$OUT" --work "${WORK:-.thyroid-cad/bench}")
if ! "$PYTHON" -c "import fastapi, uvicorn, pydantic_settings, multipart, sqlalchemy, alembic, mlflow, simplejpeg" 2>>"$LOG"; then
    log "service packages missing: raw onnxruntime rows only"
    ARGS+=(--routes none)
fi
if [ -n "${QUICK:-}" ]; then ARGS+=(--quick); fi
MODELS=${MODELS:-$(ls -d .thyroid-cad/bench/models/*/ 2>/dev/null | grep -v tiny | tr '\n' ' ')}
for m in $MODELS; do ARGS+=(--export "$m"); done
log "harness: serve.py ${ARGS[*]} (budget $(left) s)"
if timeout "$(left)" "$PYTHON" benchmarks/serve.py "${ARGS[@]}" >>"$LOG" 2>&1; then
    finish ok "onnxruntime runs on CUDA$(active tensorrt && echo ' and TensorRT'); raw batch \
sweep and service rows in benchmarks-serve.json / .md." 0
fi
finish benchmark-failed "CUDA works but the benchmark failed or ran out of time; partial \
results (if any) in benchmarks-serve.json, details in gpu.log." 1
