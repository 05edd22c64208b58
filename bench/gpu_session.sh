#!/usr/bin/env bash
# The whole GPU session in ONE call of the device tool, at most 8 minutes on an H100 / H200 (16 cores):
#
#   bash bench/gpu_session.sh                              # on the GPU machine (see bench/README.md)
#   STFAST_SESSION_DEVICE=cpu bash bench/gpu_session.sh    # dry run on a CPU, tiny settings (CI runs it)
#
# Steps, most valuable first; each runs under `timeout` (its own limit, cut to what is left of the
# session's budget, STFAST_SESSION_BUDGET_S, default 470 s) and its log and results are written into
# $OUT as soon as it ends, so a call killed at its limit still brings back every finished step:
#   install      pip install -e . (the C++/CUDA extension built with every core, sm_90)
#   imports      torch sees the GPU and stfast.kernels imports, else the session STOPS; the extension (with
#                CUDA kernels) loads, else this step fails and the session goes on (the triton steps)
#   gpu_tests    both ops on both kernel backends vs torch / float64: fp32, TF32, bf16, fp16 (a subset)
#   check        stfast check --device cuda --quick
#   himnet_step  HimNet training step: reference, torch, triton, cuda (eager)
#   himnet_compile  the same for torch.compile of the reference
#   node_lora    node_lora op micro-benchmark (fp32 and bf16)
#   meta_gconv   meta_gconv op micro-benchmark (the cuda kernels' tensor-core and SIMT paths, TF32)
#   tune         the Triton kernels' candidate launches timed per tuning key (bench/tune_triton.py): the new
#                kernels/_tuned.py (on a CPU: only the candidates listed, --list)
#   auto_table   measured winners for backend "auto" (bench/auto_table.py): the new _auto_table.py
#   stlora       stfast bench stlora --quick, STGCN and D2STGNN (the paper quotes D2STGNN) (skipped, with a note, if the subcommand is missing)
#   efficiency   stfast bench efficiency --quick (the paper's table, short form)
#   gate         the compile gate's CI sample under this machine's Triton (3.6 on the GPU machines)
#
# $OUT (the device tool returns at most 8 files, at most 2 folders deep) receives 4 files:
#   summary.md       one row per step (status, seconds, where its results are), rewritten after each step
#   session.log      every step's full log, appended when the step ends
#   results.tar.gz   every step's result files (results/<step>/...), re-packed after each step
#   environment.txt  versions, device, extension build
# Unpack results.tar.gz into bench/results/<device>/ and commit. Without $OUT (a local run) they go to
# /tmp/stfast-session/out. The summary table is printed last.
#
# Knobs: STFAST_SESSION_DEVICE (cuda | cpu), STFAST_SESSION_BUDGET_S, STFAST_SESSION_STEPS (a
# space-separated subset of the steps, in this order), STFAST_SESSION_STEP_SCALE (an integer multiplying
# every step's limit; CI's dry run on a busy machine), STFAST_SESSION_INSTALL=0 (use the installed
# package: the CPU dry run in CI), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
device="${STFAST_SESSION_DEVICE:-cuda}"
budget="${STFAST_SESSION_BUDGET_S:-470}"
scale="${STFAST_SESSION_STEP_SCALE:-1}"  # multiplies every step's own limit (a slow machine's dry run)
python="${PYTHON:-python3}"
work="/tmp/stfast-session"
out="${OUT:-$work/out}"
results="$work/results"
rm -rf "$work/logs" "$results"
mkdir -p "$work/logs" "$results" "$out"
: >"$out/session.log"
export PYTHONUNBUFFERED=1 STFAST_CUDA_ARCH="${STFAST_CUDA_ARCH:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
started=$SECONDS
summary_rows=()

case "$device" in
    cuda | cpu) ;;
    *) echo "gpu_session: STFAST_SESSION_DEVICE must be cuda or cpu, got '$device'"; exit 2 ;;
esac

write_summary() {
    {
        echo "# GPU session ($device), $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - started)) s of $budget s"
        echo
        echo "| step | status | seconds | results |"
        echo "|---|---|---|---|"
        printf '%s\n' "${summary_rows[@]}"
    } >"$out/summary.md"
}

pack_results() {  # atomically: a call killed while packing keeps the previous archive
    tar czf "$out/results.tar.gz.tmp" -C "$work" results && mv "$out/results.tar.gz.tmp" "$out/results.tar.gz"
}

selected() {  # selected NAME: whether STFAST_SESSION_STEPS (if set) names the step
    [ -z "${STFAST_SESSION_STEPS:-}" ] || [[ " $STFAST_SESSION_STEPS " == *" $1 "* ]]
}

# step NAME LIMIT_S COMMAND...: run under timeout (cut to the budget left), log, record, pack.
step() {
    local name="$1" limit="$2"
    shift 2
    selected "$name" || return 0
    local left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 10 ]; then
        summary_rows+=("| $name | skipped: session budget spent | 0 | |")
        echo "== $name: skipped (session budget spent)"
        write_summary
        return 0
    fi
    limit=$((limit * scale))
    [ "$limit" -gt "$left" ] && limit=$left
    mkdir -p "$results/$name"
    echo "== $name (limit ${limit} s): $*"
    local begin=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$work/logs/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - begin)) status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT after ${limit} s"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
    fi
    tail -n 15 "$work/logs/$name.log"
    echo "== $name: $status (${took} s)"
    {
        echo "===== $name: $status, ${took} s: $*"
        cat "$work/logs/$name.log"
        echo
    } >>"$out/session.log"
    local files
    files=$(find "$results/$name" -type f | wc -l)
    summary_rows+=("| $name | $status | $took | $([ "$files" -gt 0 ] && echo "results/$name/ ($files files)") |")
    write_summary
    pack_results
    return "$rc"
}

stop() {  # a failure that makes every later step meaningless
    echo "gpu_session: STOP: $1" | tee -a "$out/session.log"
    summary_rows+=("| (stopped) | $1 | | |")
    write_summary
    cat "$out/summary.md"
    exit 3
}

# ---------------------------------------------------------------- install and imports

if [ "${STFAST_SESSION_INSTALL:-1}" = "1" ]; then
    step install 240 "$python" -m pip install --no-build-isolation --no-deps --no-index -e . ||
        stop "pip install -e . failed (session.log, step install): nothing else can run"
fi

step imports 60 "$python" - "$device" "$out/environment.txt" <<'EOF'
import sys

device, env_file = sys.argv[1], sys.argv[2]
import torch

lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (cuda {torch.version.cuda})"]
try:
    import triton
    lines.append(f"triton {triton.__version__}")
except ImportError as err:
    sys.exit(f"triton does not import: {err}")
try:
    import stfast
    import stfast.kernels.meta_gconv
    import stfast.kernels.node_lora
except ImportError as err:
    sys.exit(f"stfast.kernels does not import ({err}): is the package installed (pip install -e .)?")
from stfast.ops import _ext, available_backends

if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    lines.append(f"device {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                 f"{props.total_memory / 2**30:.0f} GiB")
extension = _ext.status(device)
lines.append(f"stfast {stfast.__version__}, extension: {_ext.build_info() if extension is True else extension}")
for op in ("meta_gconv", "node_lora"):
    lines.append(f"{op} backends: {available_backends(device, op)}")
open(env_file, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
if extension is not True:  # exit 4: the session goes on (the triton steps can still run)
    print(f"the stfast extension cannot run on {device}: {extension}", file=sys.stderr)
    sys.exit(4)
EOF
case $? in
    0) ;;
    4) echo "gpu_session: the extension is missing (session.log, step imports): its steps will fail; going on" ;;
    *) stop "stfast is not usable here (session.log, step imports): no test would run" ;;
esac

# ---------------------------------------------------------------- correctness

R="$results"
if [ "$device" = cuda ]; then
    step gpu_tests 150 "$python" -m pytest -q -rs -p no:cacheprovider --junitxml="$R/gpu_tests/junit.xml" \
        "tests/test_meta_gconv_triton.py::TestGPU" "tests/test_node_lora_triton.py::TestGPU" \
        tests/test_node_lora_ext_cuda.py tests/test_extension.py -k "(TestGPU or cuda) and not compile_with_nvcc"
    step check 75 "$python" -m stfast check --device cuda --quick --json "$R/check/check_quick.json" --no-progress
else
    step gpu_tests 120 "$python" -m pytest -q -rs -p no:cacheprovider --junitxml="$R/gpu_tests/junit.xml" \
        tests/test_node_lora_ext.py -k "mask"
    step check 90 "$python" -m stfast check --device cpu --quick --ops node_lora --json "$R/check/check_quick.json" \
        --no-progress
fi

# ---------------------------------------------------------------- measurements

if [ "$device" = cuda ]; then
    step himnet_step 70 "$python" bench/himnet_step.py --device cuda --backends reference torch triton cuda \
        --warmup 2 --repeats 5 --out "$R/himnet_step"
    step himnet_compile 90 "$python" bench/himnet_step.py --device cuda --backends reference --modes compile \
        --warmup 2 --repeats 5 --out "$R/himnet_step"
    step node_lora 60 bash -c "'$python' bench/node_lora_op.py --device cuda --methods einsum torch triton cuda \
        cuda_simt --warmup 3 --repeats 10 --out '$R/node_lora' && '$python' bench/node_lora_op.py --device cuda \
        --dtype bfloat16 --methods einsum torch triton cuda cuda_simt --warmup 3 --repeats 10 --out '$R/node_lora'"
    step meta_gconv 50 "$python" bench/ext_ops.py --device cuda --tf32 --repeats 10 \
        --out "$R/meta_gconv/meta_gconv_paths_tf32.md"
    step tune 90 "$python" bench/tune_triton.py --shapes metr-la-b16 pems07-b64 --precisions tf32 bf16 \
        --rounds 3 --warmup-ms 5 --rep-ms 10 --out "$R/tune"
    step auto_table 60 "$python" bench/auto_table.py --device cuda --rounds 3 --repeats 5 --out "$R/auto_table"
else
    step himnet_step 120 "$python" bench/himnet_step.py --device cpu --backends reference torch --warmup 0 \
        --repeats 1 --batch-size 1 --out "$R/himnet_step"
    step node_lora 60 "$python" bench/node_lora_op.py --device cpu --methods torch cpu --shape 4 7 16 16 4 \
        --warmup 1 --repeats 2 --out "$R/node_lora"
    step meta_gconv 60 "$python" bench/ext_ops.py --device cpu --axes S --repeats 2 --warmup 1 \
        --out "$R/meta_gconv/meta_gconv_paths.md"
    step tune 60 bash -c "'$python' bench/tune_triton.py --list --precisions tf32 >'$R/tune/candidates.txt'"
    step auto_table 60 "$python" bench/auto_table.py --device cpu --ops node_lora --rounds 1 --repeats 1 --warmup 1 \
        --out "$R/auto_table"
fi

if ! selected stlora; then
    :
elif "$python" -m stfast bench stlora --help >/dev/null 2>&1; then
    if [ "$device" = cuda ]; then
        step stlora 70 "$python" -m stfast bench stlora --device cuda --quick --backbones stgcn d2stgnn --out "$R/stlora"
    else
        step stlora 90 "$python" -m stfast bench stlora --device cpu --quick --backbones stid --adapters per_node \
            --batch-size 2 --out "$R/stlora"
    fi
else
    summary_rows+=("| stlora | skipped: \`stfast bench stlora\` does not exist in this tree | 0 | |")
    write_summary
fi

if [ "$device" = cuda ]; then
    step efficiency 90 "$python" -m stfast bench efficiency --device cuda --quick --out "$R/efficiency"
    step gate 60 "$python" bench/compile_gate.py --ci --out "$R/gate"
else
    step efficiency 120 "$python" -m stfast bench efficiency --device cpu --quick --models stid --out "$R/efficiency"
fi

write_summary
pack_results
echo
cat "$out/summary.md"
failed=$(printf '%s\n' "${summary_rows[@]}" | grep -c -E "FAILED|TIMEOUT" || true)
echo "gpu_session: $failed step(s) failed; files in $out"
[ "$failed" -eq 0 ]
