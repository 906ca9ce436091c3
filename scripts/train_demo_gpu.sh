#!/usr/bin/env bash
# Train the demo agent model on a GPU machine, with its ablation and a same-seed repeat beside it
# (benchmarks/engram_ablation.py --parallel), and collect what a servable checkpoint needs in OUT.
#
#   scripts/train_demo_gpu.sh OUT [SECONDS [ABLATION ARGS...]]   # SECONDS of training per run (default 470)
#
# Extra arguments go to benchmarks/engram_ablation.py after the defaults (so they override them); PYTHON and
# DEVICE choose the interpreter and device (a CPU smoke run: PYTHON=.venv/bin/python DEVICE=cpu ... 30
# --batch-size 2 ...). Wheels in .whl/ (packages the GPU machine lacks, e.g. pydantic) go to /tmp/site first.
# OUT receives the shipped variant's checkpoint files, ablation.txt (the benchmark's output) and
# runs.tgz (every run's training.json and log).
set -uo pipefail
out=${1:?usage: scripts/train_demo_gpu.sh OUT [SECONDS]}
budget=${2:-470}
shift $(( $# < 2 ? $# : 2 ))
python=${PYTHON:-python3}
runs=${RUNS:-/tmp/demo-runs}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null && [ "${WHEELS:-1}" = 1 ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  nproc
} 2>&1 | tee "$out/ablation.txt"
PYTHONUNBUFFERED=1 timeout $((${budget%.*} + 150)) "$python" benchmarks/engram_ablation.py --device "${DEVICE:-cuda}" \
  --precision bf16 --workers 3 --parallel --time-budget "$budget" --repeat --tasks 0 --batch-size 48 \
  --short-batch-size 96 --copy-batch-size 32 --checkpoint-every 500 --eval-every 500 --eval-examples 256 \
  --out "$runs" "$@" 2>&1 | tee -a "$out/ablation.txt"
status=${PIPESTATUS[0]}
tar czf "$out/runs.tgz" -C "$runs" $(cd "$runs" && ls -d */training.json */train.log 2>/dev/null)
shipped="$runs/engram-plain-t${budget%.*}-seed0"  # this budget's run (an earlier budget's may be there too)
if [ -f "$shipped/model.safetensors" ]; then
  cp "$shipped"/{config.json,model.safetensors,engram_tables.safetensors,tokenizer.json,tokenizer_config.json} "$out/"
fi
exit "$status"
