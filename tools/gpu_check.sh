#!/usr/bin/env bash
# kfine on one GPU, measured in one command: writes gpu_check.json and prints a Markdown table.
#
#   tools/gpu_check.sh [--smoke] [--out FILE] [any tools/bench.py option, e.g. --data DIR --steps 20]
#
# What it measures (tools/bench.py's sections, ResNet50 with weights=null: ImageNet's arithmetic,
# no download; train.precision=mixed_bfloat16; 224 px JPEG photos, batch 32):
#   full        full fine-tune, steady-state images/s: kfine against a plain model.fit of the same
#               model on the same tf.data pipeline
#   head        head-only fine-tune, 10 epochs, with and without the frozen-feature cache
#   distribute  the full fine-tune under distribute.strategy data_parallel (JAX; mirrored on
#               TensorFlow) on the one device against distribute.strategy none
#   and after each, the accelerator's peak memory (JAX: peak_bytes_in_use; null on a CPU).
# --smoke: the same sections at toy sizes (5 48x40 random JPEGs a class, 32 px, 2 epochs of 1 step,
# one round of the full fine-tune, 3 head-only epochs, a scratch_cnn of 4-8 filters): about a minute of 2 idle CPU cores, so that the suite
# (tests/test_tools.py) proves the whole path before GPU time is spent on it.
#
# Backend: KERAS_BACKEND=jax wherever jax imports (the model on the GPU; TensorFlow-CPU feeds
# tf.data on the CPU cores), unless KERAS_BACKEND is set already. The first line of bench.py's
# output says which backend and device it measured on.
#
# On a lent GPU machine (no TensorFlow, no Keras there; no network: see the device notes of the
# project, shared/device.md): bring the wheels of tensorflow-cpu 2.21.0 (in 60 MiB pieces,
# reassembled from /tmp/tfp/part*), keras 3.15.1, namex, optree, astunparse, gast, google-pasta,
# termcolor in the checkout's ignored .whl/ folder ($KFINE_WHEELS); this script installs them
# into $KFINE_SITE (/tmp/site) once. The photos come from make_photo_dataset.py: put a copy at
# shared/tools/ in the checkout (or point KFINE_PHOTO_MAKER at it), or pass --data DIR. The whole
# run (writing the photo set, 4 full + 4 head-only + 2 distribute fits, XLA compiles included) is
# sized for about 5 minutes on one H100 (an estimate: not yet run there); --head-augment off
# halves the head-only part. Give it a timeout that leaves room for a second try, and copy
# gpu_check.json under $OUT.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."

smoke=0
out=gpu_check.json
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    *) extra+=("$1") ;;
  esac
  shift
done
case "$out" in /*) ;; *) out="$here/$out" ;; esac   # --out is relative to where the script was called

py=${PYTHON:-python3}
site=${KFINE_SITE:-/tmp/site}
wheels=${KFINE_WHEELS:-.whl}   # relative to the checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${KERAS_BACKEND:-}" ] && "$py" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('jax'))"; then
  export KERAS_BACKEND=jax
fi
export KERAS_BACKEND=${KERAS_BACKEND:-tensorflow} KFINE_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
# found without importing them (TensorFlow's import alone takes seconds; bench.py imports them next)
versions='import os, sys, importlib.util as u, importlib.metadata as m
assert u.find_spec("tensorflow") and u.find_spec("keras")
v = {d.metadata["Name"].lower(): d.version for d in m.distributions()}
print("gpu_check: KERAS_BACKEND=%s, python %s, keras %s, tensorflow %s" % (os.environ["KERAS_BACKEND"],
      sys.version.split()[0], v.get("keras"), v.get("tensorflow") or v.get("tensorflow-cpu")))'
if ! "$py" -c "$versions" 2>/dev/null; then
  if [ ! -f "$site/keras/__init__.py" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    if ls /tmp/tfp/part* >/dev/null 2>&1 && ! ls /tmp/tensorflow_cpu-*.whl >/dev/null 2>&1; then
      cat /tmp/tfp/part* > /tmp/tensorflow_cpu-2.21.0-cp312-cp312-manylinux_2_27_x86_64.whl   # the carried pieces
    fi
    echo "gpu_check: installing the wheels of $wheels into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl $(ls /tmp/tensorflow_cpu-*.whl 2>/dev/null || true)
  fi
  export PYTHONPATH="$PYTHONPATH:$site"
  if ! "$py" -c "$versions"; then
    echo "gpu_check: $py cannot import tensorflow and keras; install kfine's requirements (pip install -e .), or carry their wheels in $wheels/ (see this script's header)" >&2
    exit 2
  fi
fi

if [ "$smoke" = 1 ]; then
  # 5 JPEGs a class: 4 train (whole batches of 4: no second program for a partial one), 1 val;
  # 2 epochs: the steady state is the later one; 3 head-only epochs: the fewest that cache K=2 views;
  # one plain and one kfine full fine-tune (a GPU run alternates them twice)
  sizes=(--tiny-data 5 --classes 2 --image-size 32 --batch-size 4 --epochs 2 --steps 1 --head-epochs 3 --rounds 1
         --set model.backbone=scratch_cnn --set "model.scratch.filters=[4,4,8,8,8]" --set model.scratch.dense_units=8)
else
  sizes=(--per-class 100 --classes 10 --image-size 224 --batch-size 32 --epochs 3 --steps 40 --head-epochs 10)
fi
# "${extra[@]}" last: an option given on the command line wins over the defaults above
exec "$py" tools/bench.py --only full,head,distribute --set train.precision=mixed_bfloat16 --markdown \
  --out "$out" "${sizes[@]}" ${extra[@]+"${extra[@]}"}
