#!/usr/bin/env bash
# Prepare what a lent GPU machine lacks (see README, "Running the CUDA paths on a GPU"), here, on the CPU:
#   .gpu/wheels/  polars, lightgbm, click and pytest wheels for the GPU machine's Python (one `run` call carries it)
#   .gpu/minilm/  the packaged all-MiniLM-L6-v2 with its weights in fp16 (about 45 MB: the second call)
# Both folders are git-ignored. The GPU machine has torch, transformers, peft, sentence-transformers, pluggy,
# pyarrow and scipy; a call carries at most 64 MiB, so MLflow (and the tests that need it) stay here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
bash scripts/setup.sh
rm -rf .gpu/wheels .gpu/minilm && mkdir -p .gpu/wheels .gpu/minilm
# --no-deps: the machine has numpy, pyarrow and the rest; only these are missing. Versions as installed here.
want=$(.venv/bin/python - <<'PY'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ["polars", "polars-runtime-32", "lightgbm", "click", "pytest", "iniconfig", "tqdm"]))
PY
)
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/wheels $want
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

from safetensors.numpy import load_file, save_file
from recengine_transformers import packaged_model_path

source, target = packaged_model_path(), Path(".gpu/minilm")
for path in source.rglob("*"):
    if path.is_file() and path.name != "model.safetensors" and path.suffix != ".md":
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / path.relative_to(source))
weights = load_file(source / "model.safetensors")
save_file({k: v.astype("float16") if v.dtype.kind == "f" else v for k, v in weights.items()}, target / "model-fp16.safetensors")
PY
du -sh .gpu/wheels .gpu/minilm
echo "ready: now, with the GPU machine lent, run 'bash benchmarks/gpu/run.sh tests' carrying .gpu/wheels, then at once"
echo "'bash benchmarks/gpu/run.sh bench' carrying .gpu/minilm (README: Running the CUDA paths on a GPU)."
