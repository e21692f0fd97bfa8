#!/usr/bin/env bash
# The project's one prepared GPU check (issue 16): under 8 minutes on one NVIDIA H200.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py flags, e.g. --tiny --only=step/]
#
# Writes OUT_DIR/gpu.json, OUT_DIR/gpu.md and OUT_DIR/pytest_gpu.log; run from the repository
# root. The H200 machine has Python 3.12, jax 0.11.2 with the CUDA 13 plugin, flax, optax,
# orbax-checkpoint, torch 2.11 (cu130) and pytest, but no network and none of grain, nibabel,
# ml-collections, clu, tensorboardX or monai: those come from wheels in the ignored .whl/
# folder, filled on a machine with network (from the repository root) by
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 portpicker \
#     nibabel==5.4.2 ml-collections==1.1.0 clu==0.0.12 tensorboardX==2.6.5 monai==1.6.1 \
#     importlib-resources
#
# (9.4 MB; every other dependency is on the machine's image). With the device tool:
# run(command="bash benchmarks/gpu_check.sh $OUT/gpu", carry=[".whl"], timeout_s=540).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py flags]}
shift
mkdir -p "$OUT"
START=$(date +%s)

if ! python3 -c "import grain, nibabel, ml_collections, clu, tensorboardX, monai" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_check: .whl/ is missing; see this script's header" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/resfuse_site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/resfuse_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package itself, uninstalled
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
  | tee "$OUT/nvidia_smi.csv" || echo "gpu_check: no nvidia-smi" >&2
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 2

# 1. The whole path on the GPU: 20-step bf16 training, predict, export reloaded (~2-3 min).
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
PYTEST=${PIPESTATUS[0]}

# 2. The measurements, within what is left of 7.5 minutes.
LEFT=$(( 450 - ($(date +%s) - START) ))
python3 -m benchmarks.gpu_check --out="$OUT" --budget_s="$LEFT" \
  --compile_cache=/tmp/resfuse_jax_xla_cache "$@"
CHECK=$?
echo "gpu_check: pytest -m gpu exit $PYTEST, measurements exit $CHECK, $(( $(date +%s) - START )) s"
[ "$PYTEST" -eq 0 ] && [ "$CHECK" -eq 0 ]
