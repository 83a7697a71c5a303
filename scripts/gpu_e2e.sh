#!/usr/bin/env bash
# sglmesh in front of real SGLang on an offline one-GPU Hopper host (issue 10).
# Run from the repository root; each argument is a step, run in order:
#
#   install        pip-install every wheel under .whl/ and .whl2/*/ not installed yet into
#                  $WORK/site (no index, no deps), add the transformers shim when needed, print
#                  versions and an import probe of sglmesh's services
#   rehearse-bg    start `rehearse` in its own session (it outlives the call) and return
#   rehearse       dummy-weight rehearsal: the whole driver, small workloads, SGLang workers
#                  with --load-format dummy (warms the Triton cache for `run` on the same host)
#   wait-rehearsal wait (up to $REHEARSAL_WAIT s) for the rehearsal; copy its results to $OUT
#   stash-a        keep the first GGUF half (.gguf/a/part0) in $WORK/chunks
#   run            second GGUF half (.gguf/b/part1) + the first -> GGUF -> HF safetensors
#                  (.gpu/scripts/gguf_to_hf.py), then the full driver (scripts/gpu_e2e.py) -> $OUT
#   sim            CPU rehearsal with --engine sim (no GPU, no sglang)
#
# Inputs (ignored by git): .whl/ (sglang bundle, ../shared/gpu/prepare_wheels.sh), .whl2/a, .whl2/b
# (sglmesh's own missing pure-Python deps), .gpu/scripts (copy of ../shared/gpu), .gpu/smollm2
# (config + tokenizer folder), .gguf/a/part0, .gguf/b/{part1,SHA256} (prepare_model.sh).
# State between calls on the same host: $WORK (default ~/.cache/sglmesh_gpu). Results: $OUT.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=${SGLMESH_GPU_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/sglmesh_gpu}
OUTD=${OUT:-$WORK/out}
PY=${PYTHON:-python3}
mkdir -p "$WORK" "$OUTD" "$WORK/installed"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SGLANG_DISABLE_REQUEST_LOGGING=1
export no_grpc_proxy=127.0.0.1,localhost,::1 no_proxy=127.0.0.1,localhost,::1 NO_PROXY=127.0.0.1,localhost,::1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$WORK/site:$ROOT:$ROOT/clients/python/src${PYTHONPATH:+:$PYTHONPATH}"

install() {
    local new=()
    for w in .whl/*.whl .whl2/*/*.whl .whl2/*.whl; do
        [ -f "$w" ] || continue
        [ -e "$WORK/installed/$(basename "$w")" ] || new+=("$w")
    done
    if [ ${#new[@]} -gt 0 ]; then
        log "pip install ${#new[@]} wheels -> $WORK/site"
        if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$WORK/site" "${new[@]}" >"$WORK/pip.log" 2>&1; then
            for w in "${new[@]}"; do touch "$WORK/installed/$(basename "$w")"; done
        else
            grep -v -i "warning" "$WORK/pip.log" | tail -5
        fi
    fi
    local tfv
    tfv=$($PY -c "import importlib.metadata as m; print(m.version('transformers'))" 2>/dev/null)
    case "$tfv" in
        5.12.*|5.11.*|5.10.*) rm -f "$WORK/site/sitecustomize.py" ;;
        *) [ -d "$WORK/site" ] && cp .gpu/scripts/sitecustomize.py "$WORK/site/sitecustomize.py" ;;
    esac
    $PY - <<'EOF'
import importlib, importlib.metadata as m, json
v = {}
for n in ("torch", "transformers", "sglang", "smg-grpc-servicer", "smg-grpc-proto", "grpcio",
          "protobuf", "openai", "sqlalchemy", "opentelemetry-sdk", "fastapi", "pydantic"):
    try:
        v[n] = m.version(n)
    except Exception:
        v[n] = None
print("versions:", json.dumps(v))
bad = {}
for mod in ("services.worker.sglang_engine", "services.worker.server", "services.router.server",
            "services.tokenizer.server", "services.gateway.server", "services.history.server",
            "sglmesh.router.v1.router_admin_pb2_grpc", "openai"):
    try:
        importlib.import_module(mod)
    except Exception as exc:
        bad[mod] = f"{type(exc).__name__}: {exc}"
print("import probe:", json.dumps(bad) if bad else "all sglmesh services import")
EOF
}

kill_rehearsal() {
    if [ -f "$WORK/rehearsal.pid" ]; then
        local pid; pid=$(cat "$WORK/rehearsal.pid")
        if kill -0 "$pid" 2>/dev/null; then
            log "stopping the rehearsal (session $pid)"
            kill -TERM -- "-$pid" 2>/dev/null
            for _ in $(seq 180); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null
        fi
        rm -f "$WORK/rehearsal.pid"
    fi
}

no_history_flag() {
    $PY -c "import sqlalchemy, aiosqlite" >/dev/null 2>&1 || echo --no-history
}

for step in "$@"; do
case "$step" in
install) install ;;
rehearse-bg)
    rm -f "$WORK/rehearsal.done"
    setsid nohup bash "$ROOT/scripts/gpu_e2e.sh" rehearse >"$WORK/rehearsal.log" 2>&1 </dev/null &
    echo $! >"$WORK/rehearsal.pid"
    log "rehearsal started in the background (pid $(cat "$WORK/rehearsal.pid"), log $WORK/rehearsal.log)"
    ;;
rehearse)
    rm -rf "$WORK/dummy" && cp -r .gpu/smollm2 "$WORK/dummy"
    log "rehearsal: dummy-weight SGLang workers, whole driver, small workloads"
    $PY scripts/gpu_e2e.py --engine sglang --model-dir "$WORK/dummy" --dummy-weights --quick \
        $(no_history_flag) --out "$WORK/rehearsal" --budget "${REHEARSAL_BUDGET:-560}"
    echo "$?" >"$WORK/rehearsal.done"
    ;;
wait-rehearsal)
    for _ in $(seq "${REHEARSAL_WAIT:-300}"); do [ -f "$WORK/rehearsal.done" ] && break; sleep 1; done
    log "rehearsal status: $(cat "$WORK/rehearsal.done" 2>/dev/null || echo still running)"
    # $OUT takes at most 8 files: results + one tarball of logs
    cp "$WORK/rehearsal/results.json" "$OUTD/rehearsal_results.json" 2>/dev/null
    cp "$WORK/rehearsal/results.md" "$OUTD/rehearsal_results.md" 2>/dev/null
    cp "$WORK/rehearsal.log" "$WORK/rehearsal/work/logs/driver.log" 2>/dev/null
    tar czf "$OUTD/rehearsal_logs.tgz" -C "$WORK/rehearsal/work" logs 2>/dev/null
    cut -c1-400 "$OUTD/rehearsal_results.md" 2>/dev/null
    grep -h -i -E "error|Traceback" "$WORK"/rehearsal/work/logs/*.log 2>/dev/null | cut -c1-300 \
        | sort | uniq -c | sort -rn | head -15
    ;;
stash-a)
    mkdir -p "$WORK/chunks" && cp .gguf/a/part0 "$WORK/chunks/part0" && ls -l "$WORK/chunks"
    ;;
run)
    kill_rehearsal
    mkdir -p "$WORK/m"
    G="$WORK/m/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [ ! -d "$WORK/hf" ]; then
        cat "$WORK/chunks/part0" .gguf/b/part1 >"$G"
        echo "$(cat .gguf/b/SHA256)  $G" | sha256sum -c - || exit 4
        log "GGUF -> HF safetensors"
        $PY .gpu/scripts/gguf_to_hf.py "$G" .gpu/smollm2 "$WORK/hf" 2>&1 | grep -v -i -E "warn|it/s" | tail -3
    fi
    rm -rf "$WORK/run"
    $PY scripts/gpu_e2e.py --engine sglang --model-dir "$WORK/hf" $(no_history_flag) \
        --out "$OUTD" --work "$WORK/run" --budget "${RUN_BUDGET:-540}" ${E2E_ARGS:-}
    rc=$?
    tar czf "$OUTD/run_logs.tgz" -C "$WORK/run" logs 2>/dev/null
    log "driver exit status $rc"
    ;;
sim)
    $PY scripts/gpu_e2e.py --engine sim --model-dir .gpu/smollm2 --out "$OUTD" --quick
    ;;
*) echo "unknown step $step"; exit 2 ;;
esac
done
log "done"
