#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a machine with one CUDA GPU:
# each step under its own time limit, its log in $OUT (default /tmp/gpu_all), a summary of
# each step (exit code, seconds, the log's tail) on stdout. The steps, most important first:
#
#   probe      GPU, torch, dask, dask-cuda versions
#   val_batch  TMC-Shapley on pyDVL's tutorial workload on the GPU: pyDVL 0.10 + skorch
#              (device cuda) vs dvl_ooc TorchBatchUtility on a 1-GPU LocalCUDACluster
#   val_model  the same with dvl_ooc's one-model-at-a-time ModelUtility(TorchEstimator)
#   influence  benchmarks/gpu_check.py: every influence model and In-Run/TracIn, CUDA vs CPU
#   cluster    benchmarks/gpu_cluster_check.py: the calculator on LocalCUDACluster vs CPU
#   inrun      benchmarks/bench_inrun.py --device cuda --quick
#
# Usage: bash benchmarks/gpu_all.sh [STEP ...]   (default: all, in the order above)
# pyDVL, skorch and dask-cuda must import with python3 (PYDVL_PYTHON overrides pyDVL's python).
#
# On the device tool's GPU image (Python 3.12, torch 2.11+cu130, numpy 2.5; no dask, zarr,
# dask-cuda, pyDVL), carry wheels in a git-ignored .whl/ (19 MB), downloaded here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_27_x86_64 --platform manylinux_2_5_x86_64 --platform any -d .whl \
#     dask==2026.7.1 distributed==2026.7.1 dask-cuda==26.10.0 zarr==3.1.6 numcodecs==0.16.6 \
#     donfig google-crc32c tblib zict tornado partd locket pydvl==0.10.0 skorch==1.4.0 \
#     cvxpy qdldl more-itertools pyDeprecate deprecated
# (dask 2026.7.1: dask-cuda 26.10 pins it; pyDVL imports cvxpy and qdldl, not scs/osqp/clarabel)
# and run, with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu_all.sh
set -u
out=${OUT:-/tmp/gpu_all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
pydvl_py=${PYDVL_PYTHON:-$py}

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    grep -v -E "Warning|warn\(|^\s*$|return _callable_pack" "$out/$name.log" | tail -n 25
}

probe() {
    nvidia-smi -L
    "$py" - <<'EOF'
import dask, distributed, numpy, torch, zarr
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("numpy", numpy.__version__, "dask", dask.__version__, "distributed",
      distributed.__version__, "zarr", zarr.__version__)
import dask_cuda
print("dask_cuda", dask_cuda.__version__)
import dvl_ooc
print("dvl_ooc", dvl_ooc.__file__)
EOF
}

export -f probe
export py
steps=${*:-probe val_batch val_model influence cluster inrun}
for s in $steps; do
    case $s in
        probe) step probe 60 bash -c probe ;;
        val_batch) step val_batch 200 "$py" benchmarks/bench_valuation.py --tutorial \
            --device cuda --workers 1 --budget 15 --methods batch --dvl-permutations 128 \
            --dvl-batch-size 128 --models-per-pass 128 --pydvl-python "$pydvl_py" ;;
        val_model) step val_model 100 "$py" benchmarks/bench_valuation.py --tutorial \
            --device cuda --workers 1 --methods model --dvl-permutations 2 \
            --dvl-batch-size 1 --pydvl-python none ;;
        influence) step influence 150 "$py" benchmarks/gpu_check.py ;;
        cluster) step cluster 100 "$py" benchmarks/gpu_cluster_check.py --n-test 8192 \
            --n-train 32768 ;;
        inrun) step inrun 60 "$py" benchmarks/bench_inrun.py --device cuda --quick ;;
        *) echo "unknown step $s" ;;
    esac
done
