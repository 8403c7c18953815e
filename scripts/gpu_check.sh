#!/usr/bin/env bash
# The GPU checks of docs/speed.md on a bare CUDA machine with PyTorch, Lightning and transformers installed (the
# device image of this project's GPU sessions): stage .gpuassets/ first (scripts/gpu_assets.sh), carry it, then
#   bash scripts/gpu_check.sh [profile] [bench] [compile] [tests]     (default: all four, in that order)
# Results go to $OUT (or outputs/gpu_check): step profiles, benchmark tables and JSON, the pytest log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/.gpuassets/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false FTLAB_CACHE=/tmp/ftlab-cache
# conf/ installs as the package ftlab.conf (pyproject.toml); from a source tree it is linked into place
[ -e src/ftlab/conf ] || ln -s ../../conf src/ftlab/conf
steps=${*:-profile bench compile tests}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/device.txt"
python3 -c "import torch, pytorch_lightning, transformers; print('torch', torch.__version__, 'lightning', pytorch_lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
no_weights="model.backbone.pretrained=false"  # the weights are not on that machine; random ones cost the same
for step in $steps; do
  start=$(date +%s)
  case $step in
    profile)
      for c in minilm_rt/full bert_base_rt128/full; do
        python3 benchmarks/step_profile.py --gpu --case "$c" --warmup 30 --steps 40 --set "$no_weights" \
          --out "$out/profile_${c%%/*}" 2>"$out/profile_${c%%/*}.err" | tee "$out/profile_${c%%/*}.md"
      done ;;
    bench)
      python3 benchmarks/run.py --gpu --repetitions 3 --cases minilm_rt/full minilm_rt_b128/full bert_base_rt128/full \
        --set "$no_weights" --out "$out/bench" 2>&1 | tail -n 30 ;;
    compile)
      python3 benchmarks/run.py --gpu --cases minilm_rt/compile bert_base_rt128/compile minilm_rt_b128/compile \
        --set "$no_weights" --out "$out/compile" 2>&1 | tail -n 30 ;;
    tests)
      python3 -m pytest -m gpu -p no:cacheprovider -q -x --timeout 600 tests/test_gpu.py tests/test_clipping.py \
        2>&1 | tee "$out/pytest_gpu.log" | tail -n 15 ;;
    *) echo "unknown step $step (profile, bench, compile, tests)"; exit 2 ;;
  esac
  echo "== $step: $(( $(date +%s) - start )) s"
done
