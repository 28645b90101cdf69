#!/usr/bin/env bash
# The GPU check on a machine prepared by benchmarks/gpu_prepare.sh (.gpu/ carried along), from the repository root:
# install the carried packages beside the machine's own torch, then run benchmarks/gpu_step.py. Extra arguments go to
# gpu_step.py. The JSON lands in $OUT where that is set (the lent GPU machine), else in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/trl_ladi_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/wheels/*.whl
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .gpu/sdist/pycosat-*.tar.gz; then
    # reasoning_gym imports pycosat for its SAT tasks; chain_sum never calls it
    echo "pycosat did not build here: a module that raises on use stands in for it"
    printf 'def __getattr__(name):\n    raise ImportError("pycosat could not be built on this machine")\n' > "$site/pycosat.py"
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'cuda', torch.cuda.is_available())"
# gpu_step.py rewrites its JSON after every section: under $OUT (the lent GPU machine) it comes back even when the
# call is stopped at its time limit
output="${OUT:-benchmarks/results}/gpu_step_cuda.json"
python3 benchmarks/gpu_step.py --tokenizer .gpu/tokenizer --output "$output" "$@"
