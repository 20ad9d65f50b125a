#!/usr/bin/env bash
# The GPU validation campaign (issue 4: families, recipes, allocator settings), in one command (see benchmarks/gpu_campaign.py).
#
#   benchmarks/gpu_campaign.sh                    # one H200-class GPU, ~8 minutes, random weights
#   benchmarks/gpu_campaign.sh --dry-run          # the same path on a CPU with tiny stand-in models
#   BUDGET=300 benchmarks/gpu_campaign.sh --only 10
#
# Needs torch, transformers, peft, nvidia-ml-py; the wheels in .whl/ (bitsandbytes, and the
# transformers / peft releases the estimate describes) are installed first when present (no
# network needed). Writes, under $OUT (default /tmp/vramplan-campaign), at most 8 files:
#   campaign.jsonl   every record, one per line, appended as each configuration finishes
#   snapshots-N.tar  each CUDA run's allocator snapshot, gzipped (<id>.snapshot.pickle.gz:
#                    `vramplan replay --check` it), in parts of at most 15 MiB, the runs whose
#                    peak reserved the estimate missed most first
#   campaign.log     progress; summary.md the error table; env.txt the machine
# Afterwards, in the repository: python benchmarks/gpu_campaign.py unpack campaign.jsonl profiles/h200
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/vramplan-campaign}
BUDGET=${BUDGET:-480}
FOLDER=${FOLDER:-profiles/h200}
DEVICE=cuda
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then DEVICE=cpu; FOLDER=${DRY_FOLDER:-$OUT/dry-run-records}; fi
done
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import bitsandbytes" >/dev/null 2>&1; then
  echo "bitsandbytes is not importable and there is no wheel in .whl/" >&2
  exit 1
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch, transformers, peft, bitsandbytes; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

status=0
python3 benchmarks/gpu_campaign.py run --device "$DEVICE" --budget "$BUDGET" --out "$FOLDER" \
  --bundle "$OUT/campaign.jsonl" --log "$OUT/campaign.log" --summary "$OUT/summary.md" "$@" || status=$?

if [ -f "$OUT/campaign.jsonl" ] && [ "$DEVICE" = cuda ]; then
  python3 benchmarks/gpu_campaign.py pack-snapshots "$OUT/campaign.jsonl" "$FOLDER" "$OUT" --part-mib 15 --parts 3 \
    | tee -a "$OUT/campaign.log" || true
fi
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
exit $status
