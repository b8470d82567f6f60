#!/usr/bin/env bash
# GPU check (issue 15): train the sentiment adapter for a few hundred steps on CUDA,
# evaluate it, run the serving benchmark (1, 4, 8 and 16 concurrent clients), and print
# the figures beside the committed CPU ones (adapters/sentiment/metrics.json,
# reports/serve.json when present).
#
# Needs: a CUDA GPU, a CUDA build of torch in the environment (the Makefile installs
# the CPU build: `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128`
# or similar), the bundled data and backbone wheels (requirements/assets.txt), and `bot serve`.
# Nothing in the repository is overwritten: the adapter is trained into a temporary folder.
#
# Usage: scripts/gpu-check.sh [STEPS]        (default 300 optimizer steps)
#        PYTHON=.venv/bin/python BOT_BACKBONE=folder-or-id scripts/gpu-check.sh
# Dry run of the script itself on a CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_SERVE=0 scripts/gpu-check.sh 3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${1:-300}
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/bot-gpu-check.XXXXXX)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export BOT_DEVICE=$DEVICE HF_HUB_OFFLINE=1  # every `bot` process below (and `bot serve`) loads there

[ "$DEVICE" = cpu ] || "$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA GPU; nothing was run")
print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

# a copy of the sentiment manifest, so the committed adapter stays as it is
mkdir -p "$OUT/adapters"
cp -r adapters/sentiment "$OUT/adapters/sentiment"
rm -f "$OUT/adapters/sentiment/"{adapter_model.safetensors,head.safetensors,metrics.json}
cp -r adapters/chat "$OUT/adapters/chat"  # the serving benchmark's generation adapter

BATCH=$("$PY" -c "from bot.manifests.spec import AdapterSpec; print(AdapterSpec.from_dir('adapters/sentiment').train.batch_size)")
EXAMPLES=$((STEPS * BATCH))
echo "== train sentiment on $DEVICE: $STEPS steps x $BATCH examples"
"$PY" -m bot.cli train sentiment --adapters-dir "$OUT/adapters" --device "$DEVICE" \
    --epochs 1 --max-examples "$EXAMPLES" --eval-examples 1000 | tee "$OUT/train.txt"

echo "== eval sentiment on $DEVICE"
"$PY" -m bot.cli eval sentiment --adapters-dir "$OUT/adapters" --device "$DEVICE" --no-router \
    --max-examples 400 --out "$OUT/reports" | tee "$OUT/eval.txt"

echo "== serving benchmark on $DEVICE (bot serve + openai clients: 1, 4, 8, 16 at once)"
BB_JSON=null
if [ -n "${BOT_BACKBONE:-}" ]; then BB_JSON="\"$BOT_BACKBONE\""; fi
[ "${GPU_CHECK_SERVE:-1}" = 0 ] || "$PY" -m bot.serve.load_bench "{\"adapters_dir\": \"$OUT/adapters\", \"backbone\": $BB_JSON, \"json\": \"$OUT/serve-gpu.json\"}"

echo "== GPU figures beside the committed CPU ones"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
gpu = json.loads((out / "adapters/sentiment/metrics.json").read_text())
cpu_path = Path("adapters/sentiment/metrics.json")
cpu = json.loads(cpu_path.read_text()) if cpu_path.exists() else None

def acc(m):
    return f"{m['heldout']['text']['accuracy']:.1%} (n={m['heldout']['text']['n']})"

def rate(m):
    return f"{m['examples_seen'] / max(m['train_seconds'], 1e-9):.1f} examples/s"

rows = [("held-out accuracy", acc), ("training speed", rate),
        ("steps", lambda m: str(m["steps"])), ("device", lambda m: m.get("device", "cpu")),
        ("machine", lambda m: m["machine"])]
print("| sentiment adapter | CPU (committed) | GPU (this run) |\n|---|---|---|")
for label, fn in rows:
    print(f"| {label} | {fn(cpu) if cpu else 'n/a'} | {fn(gpu)} |")

if not (out / "serve-gpu.json").exists():
    print(f"\nserving benchmark skipped; files in {out}")
    sys.exit(0)
serve = json.loads((out / "serve-gpu.json").read_text())
cpu_serve_path = Path("reports/serve.json")
cpu_serve = json.loads(cpu_serve_path.read_text())["isa"][0] if cpu_serve_path.exists() else None
print("\n| clients | CPU tokens/s | GPU tokens/s | CPU p95 TTFT ms | GPU p95 TTFT ms |\n|---|---|---|---|---|")
for c in ("1", "4", "8", "16"):
    g = serve["levels"][c]
    k = cpu_serve["levels"][c] if cpu_serve else {}
    print(f"| {c} | {k.get('tokens_per_s', 'n/a')} | {g['tokens_per_s']} | "
          f"{k.get('p95_ttft_ms', 'n/a')} | {g['p95_ttft_ms']} |")
print(f"\nGPU run failures: {serve['failed']}; files in {out}")
EOF
