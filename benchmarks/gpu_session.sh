#!/usr/bin/env bash
# One call on a lent GPU machine: install, smoke check, train every missing gpu-profile run, copy the results out.
#
#   bash benchmarks/gpu_session.sh [JOBS] [MINUTES]      # defaults: 4 runs sharing the GPU, 9 minutes of training
#
# 1. install: `pip install -e .` with the machine's own torch kept (a constraint pins its installed version, so pip
#    downloads no other torch; the metadata version, not torch.__version__, which may carry "+cu130");
# 2. smoke check: two training steps of a tiny model on CUDA, so that a broken install costs seconds, not the session;
# 3. `python -m moe_lib run all --profile gpu --jobs JOBS` under `timeout -s INT MINUTES`: every finished run is
#    committed as it finishes, so a run cut off by the limit is simply trained by the next session (resumable);
# 4. copies results/gpu (CSVs, histories, grid.json) and the log to $OUT when $OUT is set.
set -uo pipefail
JOBS="${1:-4}"
MINUTES="${2:-9}"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG="$(mktemp -d)/gpu_session.log"
exec > >(tee "$LOG") 2>&1

echo "[gpu_session] $(date -u +%FT%TZ) install"
CONSTRAINT="$(mktemp)"
if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$CONSTRAINT"
    echo "[gpu_session] keeping the machine's $(cat "$CONSTRAINT")"
fi
PIP_CONSTRAINT="$CONSTRAINT" "$PYTHON" -m pip install --quiet --disable-pip-version-check -e . || { echo "[gpu_session] install failed"; exit 1; }

echo "[gpu_session] $(date -u +%FT%TZ) smoke check on CUDA"
"$PYTHON" - <<'PY' || { echo "[gpu_session] smoke check failed"; exit 1; }
import torch
from moe_lib.profiles import get_profile
from moe_lib.training.loop import train_run
assert torch.cuda.is_available(), "no CUDA device visible"
config = get_profile("smoke").base.with_train(device="cuda", steps=2, warmup_steps=1, eval_every=2, final_eval_batches=2)
result = train_run(config)
print(f"[gpu_session] smoke: {torch.cuda.get_device_name()}, precision {result.metrics['precision_used']}, val loss {result.metrics['val_loss']:.3f}")
PY

echo "[gpu_session] $(date -u +%FT%TZ) run all --profile gpu --jobs $JOBS for at most $MINUTES min"
timeout -s INT "${MINUTES}m" "$PYTHON" -m moe_lib run all --profile gpu --jobs "$JOBS"
echo "[gpu_session] $(date -u +%FT%TZ) run all ended with status $? (124: the time limit; resume with the same command)"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp -r results/gpu "$OUT/results/"
    cp "$LOG" "$OUT/"
    echo "[gpu_session] copied results/gpu and the log to $OUT"
fi
