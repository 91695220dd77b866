#!/usr/bin/env bash
# The GPU check: one prepared run, under 8 minutes on one NVIDIA GPU.
#   1. set up what it needs (the venv if missing, torchcodec for NVDEC when pip can get it,
#      a 1080p H.264 clip for the decode benchmark when ffmpeg is there);
#   2. pytest -m cuda: models on CUDA vs CPU, budgeted start-up of a workload larger than the
#      budget, eviction and reload under a budget, a split under a budget, budget accounting vs
#      the allocator, NVDEC decode of a ../shared clip;
#   3. tools/bench_gpu.py: throughput (YOLOv8n, ResNet50; batch 1/8/32; fp32/fp16), ResNet50
#      switch time under a budget, bench_swap with real copies, NVDEC vs CPU decode, the
#      run-time cost of residual layers (merge --residuals int8).
# Prints one table and writes it (and the pytest log) to $OUT_DIR (default out/).
# Without a GPU it still runs end to end and reports the CUDA parts as skipped.
#   bash tools/gpu_check.sh            # exit status: pytest's, or 1 if the benchmark failed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-out}"
mkdir -p "$OUT_DIR"
START=$(date +%s)
export PYTHONPATH="$PWD"
export PYTHONUNBUFFERED=1

log() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*"; }

# -- 1. set-up ------------------------------------------------------------------------------
PY=""
for candidate in .venv/bin/python python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch, torchvision" 2>/dev/null; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ]; then
  log "no python with torch: running tools/setup.sh"
  bash tools/setup.sh || { log "setup failed"; exit 2; }
  PY=.venv/bin/python
fi
if ! "$PY" -c "import edgeva.daemon, pytest, zmq, yaml, scipy, ultralytics" 2>/dev/null; then
  log "installing edgeva's dependencies"
  "$PY" -m pip install -q --retries 0 --timeout 15 -e ".[test]" || log "pip install failed; tests needing missing packages will fail"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
if [ "$CUDA" = 1 ] && ! "$PY" -c "import torchcodec" 2>/dev/null && ! "$PY" -c "import PyNvVideoCodec" 2>/dev/null; then
  log "installing torchcodec for NVDEC (optional)"
  timeout 120 "$PY" -m pip install -q --retries 0 --timeout 15 torchcodec 2>&1 | tail -2 || true
  "$PY" -c "import torchcodec" 2>/dev/null || log "torchcodec unavailable: NVDEC rows will say why they skip"
fi
CLIPS=()
SHARED_CLIP=$(ls -S ../shared/videos/tune/*.mp4 2>/dev/null | head -1 || true)
if [ -n "$SHARED_CLIP" ]; then
  CLIPS+=(--clip "$SHARED_CLIP")
  if command -v ffmpeg >/dev/null; then
    [ -s "$OUT_DIR/decode_1080p.mp4" ] || timeout 120 ffmpeg -loglevel error -y -stream_loop 3 -i "$SHARED_CLIP" \
      -t 30 -vf scale=1920:1080 -c:v libx264 -preset veryfast -pix_fmt yuv420p "$OUT_DIR/decode_1080p.mp4" || true
    [ -s "$OUT_DIR/decode_1080p.mp4" ] && CLIPS+=(--clip "$OUT_DIR/decode_1080p.mp4")
  fi
fi

# -- 2. pytest -m cuda ----------------------------------------------------------------------
log "pytest -m cuda"
timeout 330 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_pytest.txt"
TEST_RC=${PIPESTATUS[0]}
log "pytest exit status $TEST_RC"

# -- 3. benchmark ---------------------------------------------------------------------------
log "tools/bench_gpu.py"
timeout 240 "$PY" tools/bench_gpu.py --out "$OUT_DIR/gpu_bench.md" "${CLIPS[@]}"
BENCH_RC=$?
log "benchmark exit status $BENCH_RC; table in $OUT_DIR/gpu_bench.md, test log in $OUT_DIR/gpu_pytest.txt"
log "done in $(( $(date +%s) - START ))s"
[ "$TEST_RC" -ne 0 ] && exit "$TEST_RC"
[ "$BENCH_RC" -ne 0 ] && exit 1
exit 0
