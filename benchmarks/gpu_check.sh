#!/usr/bin/env bash
# GPU check (issue 3): on a machine with one CUDA GPU, check that CUDA, NCCL and FBGEMM's CUDA
# kernels work, then train a sharded DCN-V2 (20M-row table, dim 16, Zipf ids) on that one GPU through
# rec_dist's shard_model with a 1-process NCCL group, for table_wise / row_wise x fused /
# fused_uvm_caching kernels, and record samples/second.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]         (default OUT_DIR: benchmarks/gpu_check_results)
#
# Installs nothing: the Python env (PYTHON, default .venv/bin/python) must already hold CUDA builds
# of torch, fbgemm-gpu (not fbgemm-gpu-cpu) and torchrec. Knobs (env): ROWS (20000000), BATCH (16384),
# STEPS (50 timed steps per cell), CELLS ("table_wise:fused table_wise:fused_uvm_caching
# row_wise:fused row_wise:fused_uvm_caching"), TIMEOUT (480 s for the training part).
# DRY_RUN_CPU=1 skips the GPU checks and runs part 3 on CPU (gloo) with CELLS=table_wise:fused: a test
# of this script's plumbing on a machine without a GPU, not a GPU result.
# Writes OUT_DIR/env.txt (versions, nvidia-smi), OUT_DIR/gpu_check.json (every number),
# OUT_DIR/samples_per_s.tsv and OUT_DIR/gpu_check.log. Exit: 0 ok, 2 no GPU / env not usable,
# 3 a training cell failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-benchmarks/gpu_check_results}"
ROWS="${ROWS:-20000000}"
BATCH="${BATCH:-16384}"
STEPS="${STEPS:-50}"
CELLS="${CELLS:-table_wise:fused table_wise:fused_uvm_caching row_wise:fused row_wise:fused_uvm_caching}"
TIMEOUT="${TIMEOUT:-480}"

fail() { echo "gpu_check: FAIL: $*" >&2; exit 2; }
DEVICE=cuda
if [ "${DRY_RUN_CPU:-0}" = 1 ]; then
  DEVICE=cpu CELLS="table_wise:fused"
  echo "gpu_check: DRY_RUN_CPU=1: no GPU checks, training on CPU (a plumbing test, not a GPU result)"
  mkdir -p "$OUT" || fail "cannot create $OUT"
else

# ---- 1. fail fast when there is no GPU -------------------------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 \
  || fail "no nvidia-smi on PATH: this machine has no NVIDIA driver / GPU. Run this script on a machine with one CUDA GPU."
nvidia-smi -L >/dev/null 2>&1 || fail "nvidia-smi finds no usable GPU: $(nvidia-smi -L 2>&1 | head -1)"
[ -x "$PY" ] || fail "no Python at $PY (set PYTHON=/path/to/python of an env with CUDA torch, fbgemm-gpu, torchrec)"
mkdir -p "$OUT" || fail "cannot create $OUT"

# ---- 2. versions, CUDA, NCCL, FBGEMM CUDA ops --------------------------------------------------------
{ date -u; nvidia-smi; } > "$OUT/env.txt" 2>&1
timeout 180 "$PY" - >> "$OUT/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md
import os
import sys


def fail(msg):
    print(f"gpu_check: FAIL: {msg}")
    sys.exit(2)


import torch

print("python", sys.version.split()[0])
for name in ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-nightly", "lightning", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print("torch.version.cuda", torch.version.cuda)
if torch.version.cuda is None:
    fail(f"torch {torch.__version__} in {sys.prefix} is a CPU-only build: this env needs CUDA builds of torch, "
         "fbgemm-gpu and torchrec (this script installs nothing)")
if not torch.cuda.is_available():
    fail("torch.cuda.is_available() is False (driver older than the CUDA runtime? CUDA_VISIBLE_DEVICES empty?)")
props = torch.cuda.get_device_properties(0)
print(f"GPU 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
      f"{torch.cuda.device_count()} visible")
if not torch.distributed.is_nccl_available():
    fail("this torch build has no NCCL")
print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
try:
    import fbgemm_gpu  # noqa: F401
    torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2], device="cuda"))
except Exception as err:  # noqa: BLE001
    fail(f"FBGEMM's CUDA ops do not run ({type(err).__name__}: {err}); is fbgemm-gpu-cpu installed instead of fbgemm-gpu?")
import torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
t = torch.ones(4, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
assert t.sum().item() == 4
dist.destroy_process_group()
print("checks: CUDA ok, NCCL all_reduce ok, FBGEMM CUDA ops ok")
EOF
status=$?
cat "$OUT/env.txt"
[ $status -eq 0 ] || fail "environment check failed (exit $status); see $OUT/env.txt"
fi

# ---- 3. sharded training on the GPU, samples/s -----------------------------------------------------
# shellcheck disable=SC2086  # CELLS is a list
timeout "$TIMEOUT" "$PY" benchmarks/sharding.py --gpu --rows "$ROWS" --batch-size "$BATCH" --timed-steps "$STEPS" \
  --gpu-device "$DEVICE" --gpu-cells $CELLS --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
[ $status -eq 0 ] || { echo "gpu_check: FAIL: training run exited with $status (124: timeout); see $OUT/gpu_check.log" >&2; exit 3; }
"$PY" - "$OUT" <<'EOF'
import json
import sys

out = sys.argv[1]
cells = json.load(open(f"{out}/gpu_check.json"))["gpu"]
with open(f"{out}/samples_per_s.tsv", "w") as fh:
    fh.write("sharding\tkernel\trows\tbatch\tsamples_per_s\tmax_gpu_mem_mib\tfirst_loss\tlast_loss\terror\n")
    for c in cells:
        losses = c.get("losses") or [float("nan")]
        fh.write(f"{c['sharding']}\t{c['kernel']}\t{c.get('rows', '')}\t{c.get('batch_size', '')}\t"
                 f"{c.get('samples_per_s', float('nan')):.0f}\t{c.get('max_gpu_mem_mib') or float('nan'):.0f}\t"
                 f"{losses[0]:.4f}\t{losses[-1]:.4f}\t{c.get('error', '')}\n")
print(open(f"{out}/samples_per_s.tsv").read())
sys.exit(3 if any("error" in c for c in cells) else 0)
EOF
status=$?
echo "gpu_check: results in $OUT/ (samples_per_s.tsv, gpu_check.json, env.txt, gpu_check.log)"
exit $status
