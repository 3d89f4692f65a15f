#!/usr/bin/env bash
# GPU checks that need no vLLM: r1lab's trainers on CUDA, on a machine with a GPU and PyTorch.
#
#   bash benchmarks/gpu_check.sh            # writes logs and metrics under $OUT (default /tmp/gpu_check)
#
# 1. the tests marked `gpu` (the CUDA GRPO test runs; the vLLM ones skip where vLLM is missing),
# 2. GRPO on the shipped tiny base with the model on CUDA (rollouts by the CPU engine on a copy),
# 3. SFT on CUDA on traces sampled from that base, then eval of the result.
# Where the machine lacks r1lab's pure-Python dependencies, put their wheels in .whl/ first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R1LAB="python3 -c 'from r1lab.cli import main; main()'"
run() { echo "+ $*"; eval "$@"; echo "rc=$?"; }

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
run "python3 -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_grpo.py tests/unit/test_modeling.py tests/unit/test_packing.py 2>&1 | tail -15"
run "$R1LAB grpo recipes/grpo-arithmetic.yaml device=cuda threads=8 rl.steps=20 eval_every=10 \
  run_dir=$OUT/grpo progress=false > $OUT/grpo.log 2>&1; tail -3 $OUT/grpo.log"
cp "$OUT/grpo/metrics.jsonl" "$OUT/grpo_metrics.jsonl" 2>/dev/null
run "$R1LAB sample recipes/sample-arithmetic.yaml teacher.path=src/r1lab/data/bases/arith3-gpt2-2m/model \
  output=$OUT/traces.jsonl > $OUT/sample.log 2>&1; tail -2 $OUT/sample.log"
run "$R1LAB sft recipes/sft-arithmetic.yaml device=cuda data=[$OUT/traces.jsonl] run_dir=$OUT/sft \
  > $OUT/sft.log 2>&1; tail -3 $OUT/sft.log"
run "$R1LAB eval recipes/eval-tiny.yaml model=$OUT/sft/model out_dir=$OUT/eval > $OUT/eval.log 2>&1; tail -8 $OUT/eval.log"
