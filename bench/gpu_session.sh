#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in stages that each fit one device call (< 10 min):
#
#   bash bench/gpu_session.sh test     build the CUDA extension, run every GPU test, stfast check --device cuda
#   bash bench/gpu_session.sh bench    HimNet step, node_lora and meta_gconv micro-benchmarks
#   bash bench/gpu_session.sh paths    the CUDA kernels' tensor-core vs SIMT paths against torch / triton,
#                                      fp32, fp32 with TF32 and bf16, both ops
#   bash bench/gpu_session.sh table    stfast bench efficiency --device cuda (the paper's table)
#
# Each stage installs stfast first (a no-op when the machine still holds the build), writes its logs
# and results under /tmp/stfast-session/<stage>/ and packs them into $OUT/<stage>.tar.gz (the device
# tool returns at most 8 files from $OUT); unpack them into bench/results/<device>/ and commit. The summary table of each
# benchmark is printed last. STFAST_SESSION_DEVICE=cpu runs the same commands on the CPU with tiny
# settings (a dry run of this script; CI does not run it).
set -uo pipefail
stage="${1:?usage: bash bench/gpu_session.sh test|bench|paths|table}"
device="${STFAST_SESSION_DEVICE:-cuda}"
out="/tmp/stfast-session/$stage"
packed="${OUT:-/tmp/stfast-session}/$stage.tar.gz"
rm -rf "$out"
mkdir -p "$out" "$(dirname "$packed")"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 STFAST_CUDA_ARCH="${STFAST_CUDA_ARCH:-9.0}"
status=0

run() {  # run NAME COMMAND...: log to $out/NAME.log, remember a failure, keep going
    local name="$1"
    shift
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
}

install() {
    if ! "$python" -c "import stfast.ops._ext as e; assert e.load() is True" >/dev/null 2>&1; then
        run install "$python" -m pip install --no-build-isolation --no-deps --no-index -e .
    fi
    "$python" - <<'EOF' | tee "$out/environment.txt"
import torch, stfast
from stfast.ops import _ext, available_backends
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not importable")
print("extension", _ext.load(), _ext.build_info())
for op in ("meta_gconv", "node_lora"):
    print(op, available_backends("cuda" if torch.cuda.is_available() else "cpu", op))
EOF
}

case "$stage" in
    test)
        install
        run gpu_tests "$python" -m pytest -q -rs tests/test_extension.py tests/test_node_lora_ext_cuda.py \
            tests/test_meta_gconv_triton.py tests/test_node_lora_triton.py tests/test_profiler.py
        if [ "$device" = cuda ]; then
            run check "$python" -m stfast check --device cuda --json "$out/check.json" --no-progress
            run check_himnet "$python" -m stfast check --device cuda --model himnet --json "$out/check_himnet.json" \
                --no-progress
        else
            run check "$python" -m stfast check --device cpu --quick --json "$out/check.json" --no-progress
        fi
        ;;
    bench)
        install
        if [ "$device" = cuda ]; then
            run himnet_step "$python" bench/himnet_step.py --device cuda --backends reference torch triton cuda \
                --out "$out"
            run node_lora "$python" bench/node_lora_op.py --device cuda --methods einsum torch triton cuda \
                cuda_simt --stlora-step himnet --out "$out"
            run node_lora_bf16 "$python" bench/node_lora_op.py --device cuda --dtype bfloat16 \
                --methods einsum torch triton cuda cuda_simt --out "$out"
            run meta_gconv "$python" -m pytest -q bench/test_meta_gconv_bench.py --benchmark-only \
                --benchmark-json "$out/meta_gconv_op.json"
        else
            run node_lora "$python" bench/node_lora_op.py --device cpu --methods torch cpu --shape 4 7 16 16 4 \
                --repeats 2 --warmup 1 --out "$out"
        fi
        ;;
    paths)
        install
        if [ "$device" = cuda ]; then
            run meta_gconv_fp32 "$python" bench/ext_ops.py --out "$out/meta_gconv_paths_float32.md"
            run meta_gconv_tf32 "$python" bench/ext_ops.py --tf32 --out "$out/meta_gconv_paths_tf32.md"
            run meta_gconv_bf16 "$python" bench/ext_ops.py --dtype bfloat16 --out "$out/meta_gconv_paths_bfloat16.md"
            run node_lora_tf32 "$python" bench/node_lora_op.py --device cuda --tf32 \
                --methods einsum torch triton cuda cuda_simt --out "$out"
        else
            run meta_gconv_tf32 "$python" bench/ext_ops.py --tf32 --axes S --repeats 2 --warmup 1 \
                --out "$out/meta_gconv_paths_tf32.md"
        fi
        ;;
    table)
        install
        if [ "$device" = cuda ]; then
            run efficiency "$python" -m stfast bench efficiency --device cuda --out "$out/efficiency"
        else
            run efficiency "$python" -m stfast bench efficiency --device cpu --quick --models stid --out "$out/efficiency"
        fi
        ;;
    *)
        echo "unknown stage $stage (expected test, bench or table)"
        exit 2
        ;;
esac

tar czf "$packed" -C "$(dirname "$out")" "$stage"
echo "== packed $packed; exit status $status"
exit "$status"
