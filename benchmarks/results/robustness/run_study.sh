#!/bin/bash
# The robustness study (issue 17): one workdir, the knob-off runs shared by both sweeps.
set -e
cd /work/main
source .venv/bin/activate
export RESFUSE_CACHE=/tmp/rc_study JAX_COMPILATION_CACHE_DIR=/tmp/jaxcc
W=/work/study/W
OUT=/work/study/results
mkdir -p $OUT
COMMON="--config=configs/phantom.py --models=resfuse,resfuse_identity,resunet_early,resunet --seeds=0,1,2 --workdir=$W --config.data.phantom_cases=200 --config.train.steps=400 --config.eval.every_steps=400 --config.checkpoint.every_steps=400"
run() {  # $1 = sweep, $2 = name of the copy
  echo "=== $(date -u +%H:%M:%S) sweep $1"
  python -m resfuse_jax.compare $COMMON --sweep=$1 > $OUT/$2.stdout 2> $OUT/$2.stderr
  mkdir -p $OUT/$2 && cp $W/sweep.json $W/sweep.md $W/sweep.png $OUT/$2/
  echo "=== $(date -u +%H:%M:%S) done $1"
}
run data.misregistration_mm=0,4.5 misregistration_2pt
run data.pre_slice_mm=0,4.5 slices_2pt
run data.misregistration_mm=0,2.25,4.5 misregistration
run data.pre_slice_mm=0,3,4.5 slices
