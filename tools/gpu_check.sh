#!/bin/bash
# The GPU check a session runs when it is lent a GPU (the device tool: one prepared script, minutes of device time).
# The GPU image has its own torch; this project's pinned transformers, TRL, PEFT, datasets and vaderSentiment travel as
# wheels in .whl/ (ignored by git; `carry` it), fetched here first:
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl/alt
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl transformers==5.24.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 \
#     vaderSentiment==3.3.2 tokenizers==0.23.3 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/alt "datasets>=4.7,<5"
# then run it there: `bash tools/gpu_check.sh` (it writes under $OUT). What it found on an H200 (2026-12-04): README,
# "On a GPU, as far as it has been run". STEPS picks and orders the checks; each has its own time limit.
cd "$(dirname "$0")/.." || exit 1
exec > >(tee -a "${OUT:-/tmp}/log.txt") 2>&1
PA=$(python3 -c "import pyarrow; print(pyarrow.__version__)")
W=$(ls .whl/*.whl)  # datasets 5 needs pyarrow >= 24; older images get datasets 4
if [ "${PA%%.*}" -lt 24 ]; then W="$(ls .whl/*.whl | grep -v -e datasets-5 -e fsspec) $(ls .whl/alt/datasets-4*.whl)"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, torch.cuda.get_device_name(0), \
'| transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
step() { local name=$1 limit=$2; shift 2; local t=$(date +%s); timeout "$limit" "$@" > "${OUT:-/tmp}/$name.txt" 2>&1
  echo "== $name: rc=$? $(( $(date +%s) - t )) s"; tail -8 "${OUT:-/tmp}/$name.txt"; }
for s in ${STEPS:-default_run accelerator_tests journey}; do
  case $s in
    default_run)  # the default task on one GPU (DDP config: bf16 mixed precision), every stage through make
      step default_run 420 make --no-print-directory -o .venv/.done sft rm ppo eval PY=python3 \
        ACCELERATE_CONFIG=configs/accelerate/multi_gpu.yaml RUNS_DIR=/tmp/gruns
      python3 -c "import json; m = json.load(open('/tmp/gruns/default/eval/manifest.json'))['metrics']; \
print({k: m.get(k) for k in ('gold_win_rate', 'gold_win_rate_ci_low', 'kl_mean', 'rm_gold_agreement')})" ;;
    accelerator_tests)  # the stage tests that move models to the accelerator
      step accelerator_tests 120 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_eval.py tests/test_pairs.py \
        tests/test_sft.py tests/test_rm.py tests/test_dpo.py -k "accelerator or bf16_base_trains or mixed_precision" -m "not slow" tests/test_judges.py ;;
    journey)  # tests/test_journey.py under the GPU configs (-s: its progress survives a timeout)
      for cfg in multi_gpu fsdp; do
        ACCELERATE_CONFIG=configs/accelerate/$cfg.yaml step journey_$cfg 300 python3 -m pytest -x -s -q -p no:cacheprovider tests/test_journey.py -k bf16-checkpoint
      done ;;
  esac
done
