#!/usr/bin/env bash
# One prepared command for an accelerator machine: the Pallas attention, grouped matmul (MoE)
# and quantized matmul kernel tests on the device, then benchmarks/accelerator_step.py
# (kernel check, kernel-alone timings, the core engine's step at Llama-3.1-8B shapes with
# random weights: decode HBM-bandwidth fraction, prefill MFU; the quantized MoE products).
# About 8-9 minutes on an H200 (2026-12-04: kernel tests 112 s; the step's cases compile in
# 10-20 s each, and with 230 s for them the MoE part was skipped for time, hence 330 s now).
#
#   benchmarks/gpu_check.sh                 # NVIDIA GPU (JAX's CUDA plugin) or TPU
#   benchmarks/gpu_check.sh --smoke         # a CPU: tiny shapes, kernels in interpret mode
#   benchmarks/gpu_check.sh --json out.json # extra arguments go to accelerator_step.py
#
# Runs from a working tree of the repository (PYTHONPATH=., nothing installed); no vLLM, no
# network. Python: $PYTHON, else .venv/bin/python where it exists, else python3; it needs
# numpy, jax (with the device's plugin) and ml_dtypes, and pytest for the kernel tests.
# Exit status 0 only when every part ran and passed; each part says why it did not.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
SMOKE=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1; done
start=$SECONDS
status=0

echo "== gpu_check: python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo missing) ($PY)"
if ! "$PY" benchmarks/accelerator_step.py --check-deps "$@"; then
  echo "gpu_check: FAIL: Python dependencies or device (see above)"
  exit 2
fi
PLATFORM=$("$PY" -c 'import jax; b = jax.default_backend(); print("gpu" if b in ("cuda", "rocm") else b)')

# -- 1. kernel tests on the device ---------------------------------------------------------
# tests/conftest.py pins JAX to the CPU unless JAX_PLATFORMS says otherwise.
# The grouped and quantized matmul tests run both backends' kernels; on a device only its own
# kind runs natively (tests/helpers.pallas_interpret), the other kind is deselected.
PYTEST_ARGS=(-q --maxfail=8 -rf -p no:cacheprovider -m "slow or not slow")
MATMULS=(tests/kernels/test_pallas_gmm.py tests/kernels/test_pallas_quantized_matmul.py)
case "$PLATFORM" in
  gpu) JAX_PLATFORM=cuda; TESTS=(tests/kernels/test_pallas_gpu_attention.py "${MATMULS[@]}")
       PYTEST_ARGS+=(-k "not tpu") ;;
  tpu) JAX_PLATFORM=tpu; TESTS=(tests/kernels/test_pallas_tpu*.py "${MATMULS[@]}")
       PYTEST_ARGS+=(-k "not gpu") ;;
  *)   JAX_PLATFORM=cpu; TESTS=(tests/kernels/test_pallas_gpu_attention.py "${MATMULS[@]}")
       # interpret mode is slow: the smoke run proves the wiring with the lowering checks
       PYTEST_ARGS+=(-k "lowers or rejects") ;;
esac
if [ "$PLATFORM" = cpu ] && [ "$SMOKE" = 0 ]; then
  echo "gpu_check: FAIL: no accelerator (JAX's default backend is cpu); use --smoke on a CPU"
  exit 2
fi
echo "== kernel tests ($PLATFORM, JAX_PLATFORMS=$JAX_PLATFORM): ${TESTS[*]}"
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  echo "gpu_check: kernel test matrix NOT run: pytest is missing (pip install pytest);"
  echo "           accelerator_step.py's kernel check below still runs"
  status=1
elif ! ls "${TESTS[@]}" >/dev/null 2>&1; then
  echo "gpu_check: kernel tests NOT run: ${TESTS[*]} not in this tree"
  status=1
else
  JAX_PLATFORMS=$JAX_PLATFORM timeout 170 "$PY" -m pytest "${PYTEST_ARGS[@]}" "${TESTS[@]}"
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "gpu_check: kernel tests FAILED (exit $rc; 124: past the 170 s limit)"
    status=1
  fi
fi
echo "   ($((SECONDS - start)) s so far)"

# -- 2. kernel check and core-step benchmark ------------------------------------------------
echo "== accelerator_step.py $*"
# On a CPU (smoke) two virtual devices, so that its sharded MoE part (experts split over the
# devices, the GMM in a shard_map) runs as it does on a machine of several GPUs or TPU chips.
STEP_ENV=()
if [ "$PLATFORM" = cpu ]; then
  STEP_ENV=("XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=2")
fi
JAX_PLATFORMS=$JAX_PLATFORM env "${STEP_ENV[@]}" timeout 400 "$PY" benchmarks/accelerator_step.py "$@"
rc=$?
if [ $rc -ne 0 ]; then
  echo "gpu_check: accelerator_step.py FAILED (exit $rc; 124: past the 400 s limit)"
  status=1
fi
echo "== gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED) in $((SECONDS - start)) s"
exit $status
