#!/bin/bash
# Device-side wrapper (not part of the project): bash .gpu/run.sh <study seconds> <run_recbole_mm.py args...>
set -u
REPO=$PWD; T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$REPO/.gpu/stub MINILM_DIR=/tmp/minilm
export RECBOLE_MM_NINEREC_DIR=$REPO/.gpu/ninerec_bili OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p /tmp/minilm && tar xzf .gpu/minilm.tgz -C /tmp/minilm || exit 4
python3 - <<'PY' || exit 5
import os, torch, sys
from safetensors.torch import load_file, save_file
p = "/tmp/minilm/model.safetensors"
sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(p).items()}
save_file(sd, p, metadata={"format": "pt"}); os.utime(p, (1.7e9, 1.7e9))  # fixed mtime: stable fingerprint across machines
import pandas, numpy, transformers, recbole
print("versions: torch", torch.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__,
      "transformers", transformers.__version__, "recbole", recbole.__version__, "python", sys.version.split()[0])
print("gpu:", torch.cuda.get_device_name(0), "cpus:", os.cpu_count())
PY
if [ -n "${MPS:-}" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog
  if nvidia-cuda-mps-control -d && python3 -c "import torch; print('mps client ok', torch.ones(4).cuda().sum().item())"; then echo "MPS on"; else
    echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS failed"; export JOBS_FALLBACK=1; fi
fi
W=/tmp/w; mkdir -p $W; [ -f .gpu/state.tgz ] && tar xzf .gpu/state.tgz -C $W
cd $W
echo "setup took $(( $(date +%s) - T0 ))s"
J=${JOBS:-14}; [ -n "${JOBS_FALLBACK:-}" ] && J=3; echo "jobs $J"
( while sleep 25; do cd $W && tar czf /tmp/snap.tgz studies/bili/records studies/bili/logs 2>/dev/null && mv /tmp/snap.tgz $OUT/records.tgz; done ) &
SNAP=$!
timeout -k 30 "$1" python3 $REPO/run_recbole_mm.py "${@:2}" --jobs $J > $OUT/study.log 2>&1
echo "study exit $? after $(( $(date +%s) - T0 ))s"; tail -25 $OUT/study.log

kill $SNAP; cd $W && tar czf /tmp/snap.tgz studies/bili/records studies/bili/logs studies/bili/results.md studies/bili/cells.csv 2>/dev/null; mv /tmp/snap.tgz $OUT/records.tgz
du -sh $W/studies/bili/* $W/dataset/* | sort -h | tail -8
[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control
ls -la $OUT; nvidia-smi --query-gpu=memory.used,memory.total --format=csv
