#!/usr/bin/env bash
# Serve a `bot export` folder with vLLM and check it with the README's own client code.
#
#   bot export chat topic sentiment --to out/vllm
#   sh scripts/vllm-check.sh out/vllm
#
# Needs a CUDA GPU (`pip install vllm` is a CUDA build). Not part of `make test`.
# It makes a scratch venv ($VLLM_VENV, default ~/.cache/bot/vllm-venv), installs
# $VLLM_SPEC (default: vllm) + openai + peft, starts every `vllm serve` line of
# DIR/README.md (generation instance + one pooling instance per label count), runs
# scripts/vllm_check.py against them, prints the results and stops the servers.
# Environment: VLLM_DTYPE (default float32, to compare with bot's float32 numbers;
# bfloat16 if your kernels refuse float32), VLLM_GPU_UTIL (per instance, default 0.2),
# VLLM_TOL (max probability difference, default 0.02).
set -eu

DIR=${1:?usage: sh scripts/vllm-check.sh EXPORT_DIR (written by bot export)}
DIR=$(cd "$DIR" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VLLM_VENV:-$HOME/.cache/bot/vllm-venv}
DTYPE=${VLLM_DTYPE:-float32}
UTIL=${VLLM_GPU_UTIL:-0.2}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/vllm-check.XXXXXX")

if [ ! -f "$DIR/export.json" ] || [ ! -f "$DIR/README.md" ]; then
    echo "vllm-check: $DIR is not a bot export (no export.json/README.md). Fix: bot export NAME... --to $DIR" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "vllm-check: no CUDA GPU on this machine (nvidia-smi finds none). vLLM's PyPI build" \
         "needs one; run this script on a GPU machine. Nothing was checked." >&2
    exit 3
fi
nvidia-smi -L

if [ ! -x "$VENV/bin/vllm" ]; then
    echo "vllm-check: installing ${VLLM_SPEC:-vllm} into $VENV (first run only; several GB)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "${VLLM_SPEC:-vllm}" openai peft
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"

PIDS=""
cleanup() {
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    for pid in $PIDS; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# The README's `vllm serve` lines, run as documented (dtype and memory share adjusted).
grep '^vllm serve ' "$DIR/README.md" > "$LOGS/commands"
n=0
while IFS= read -r cmd; do
    n=$((n + 1))
    cmd=$(printf '%s' "$cmd" | sed "s/--dtype [a-z0-9]*/--dtype $DTYPE/")
    echo "vllm-check: starting [$n] $cmd"
    (cd "$DIR" && PATH="$VENV/bin:$PATH" exec $cmd --gpu-memory-utilization "$UTIL") \
        > "$LOGS/server-$n.log" 2>&1 &
    pid=$!
    PIDS="$PIDS $pid"
    port=$(printf '%s' "$cmd" | sed -n 's/.*--port \([0-9]*\).*/\1/p')
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then break; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "vllm-check: server [$n] exited; last lines of its log:" >&2
            tail -n 40 "$LOGS/server-$n.log" >&2
            exit 1
        fi
        sleep 1
    done
    curl -sf "http://127.0.0.1:$port/health" >/dev/null || {
        echo "vllm-check: server [$n] not healthy after 600 s; log: $LOGS/server-$n.log" >&2; exit 1; }
    curl -s "http://127.0.0.1:$port/v1/models"; echo
done < "$LOGS/commands"

"$VENV/bin/python" "$HERE/vllm_check.py" "$DIR" --tol "${VLLM_TOL:-0.02}"
