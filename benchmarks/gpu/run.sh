#!/usr/bin/env bash
# On a lent GPU machine (README, "Running the CUDA paths on a GPU"): two calls made one after the other
# while the machine stays warm, each printing its figures and writing them under $OUT.
#   bash benchmarks/gpu/run.sh tests   (carry .gpu/wheels)  install into $SITE, run the encoder, tuning,
#                                                            adapter, sequential and image tests with RECENGINE_TEST_DEVICE=cuda
#   bash benchmarks/gpu/run.sh bench   (carry .gpu/minilm)  MiniLM back to fp32, then benchmarks/encode.py
#                                                            (short and long texts) and benchmarks/tune.py
#                                                            (head, lora, adalora, full on the same cutoffs) and
#                                                            benchmarks/sequential.py (the sequential model's fit, CPU and CUDA)
# Here on a CPU, `DEVICE=cpu bash benchmarks/gpu/run.sh tests` checks the script itself.
set -uo pipefail
cd "$(dirname "$0")/../.."
SITE=${SITE:-/tmp/recengine-site}
OUT=${OUT:-/tmp/recengine-gpu-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" RECENGINE_TEST_DEVICE=$DEVICE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"

case "${1:-}" in
tests)
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl || exit 1
  # recengine and its plugins with their entry points (the plugin hook reads them), nothing else
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . plugins/recengine-transformers \
    $( [ -d plugins/recengine-images ] && echo plugins/recengine-images ) || exit 1
  # The tests that need MLflow or LightGBM's training stay on the CPU (MLflow does not fit in a call).
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_encoders.py tests/test_tuning.py tests/test_tuned.py \
    tests/test_adalora.py tests/test_adapters.py tests/test_sequential.py $( [ -f tests/test_images.py ] && echo tests/test_images.py ) \
    -k "not (recengine_tune or tune_until or tune_refuses or mlflow or training or trained or ranker or fresh_process or minilm)" \
    2>&1 | tee "$OUT/tests.txt"
  exit "${PIPESTATUS[0]}"
  ;;
bench)
  [ -d "$SITE/polars" ] || { echo "no $SITE/polars: run 'bash benchmarks/gpu/run.sh tests' first, on this warm machine"; exit 1; }
  model=/tmp/minilm-fp32
  "$PYTHON" - "$model" <<'PY' || exit 1
import shutil, sys
from pathlib import Path
from safetensors.numpy import load_file, save_file
source, target = Path(".gpu/minilm"), Path(sys.argv[1])
shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model-fp16.safetensors"))
save_file({k: v.astype("float32") if v.dtype.kind == "f" else v for k, v in load_file(source / "model-fp16.safetensors").items()},
          target / "model.safetensors")
PY
  "$PYTHON" benchmarks/sequential.py --model "$model" --devices cpu,$DEVICE --epochs ${SEQ_EPOCHS:-5} 2>&1 | grep -v Loading | tee "$OUT/sequential.txt"
  "$PYTHON" benchmarks/encode.py --model "$model" --n ${ENCODE_N:-50000} --repeats 3 --cache-n 0 2>&1 | grep -v Loading | tee "$OUT/encode.txt"
  "$PYTHON" benchmarks/tune.py --model "$model" --mode head,lora,adalora,full --cutoffs ${CUTOFFS:-3} --epochs 3 \
    --max-pairs 20000 --batch-size 256 --history 20 --set lora:lr=1e-4 --set adalora:lr=1e-3 --set full:lr=2e-5 \
    2>&1 | grep -v Loading | tee "$OUT/tune.txt"
  ;;
*)
  echo "usage: bash benchmarks/gpu/run.sh tests|bench (README: Running the CUDA paths on a GPU)"; exit 2 ;;
esac
