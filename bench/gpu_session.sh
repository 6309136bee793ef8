#!/usr/bin/env bash
# Every GPU check of this project as one script with a time cap per stage, for a GPU that is
# lent for minutes (see docs/export.md, "What has run where"):
#
#   bash bench/gpu_session.sh OUT_DIR [TRAIN_MINUTES [CONFIG...]]
#
# 1. the environment: GPU, torch, whether tensorrt / onnxruntime's CUDA provider exist
# 2. bench/bench_export.py --gpu-only: eager fp16 vs torch.compile, family student and SD 1.5
#    (first, alone on the GPU; BENCH=0 skips it)
# 3. with TEACHER_CONFIG set: the teacher's U-Net stage on the GPU (its config's unet_minutes
#    bound it; TEACHER_CAP caps the stage), exported to <its out>/export, which distill configs
#    can name as their teacher; its weights come back as teacher-{unet,text_encoder}.safetensors
#    and the rest of the folder, its loss log and sample grids as teacher-rest.tgz
# 4. with TRAIN_MINUTES > 0: the distill configs (default configs/gpu/shapes64-{3,2,1}step.json)
#    train side by side on the GPU, in the background, each into the "out" its config names
#    (TRAIN_SLACK, default 150 s, is each run's time beyond TRAIN_MINUTES before it is killed)
# 5. meanwhile pytest -m gpu (capped at PYTEST_CAP, default 300 s) on $GPU_TESTS (default: the
#    torch backend in fp16 and with torch.compile + CUDA graphs, the service on CUDA, distillation
#    and the teacher's training on CUDA, and the TensorRT tests, which skip without tensorrt)
# Logs and the students are packed into OUT_DIR (logs.tgz, student-<config name>.tgz).
#
# The GPU images seen on 2026-11-26 (H200 and H100, torch 2.11.0+cu130) lacked diffusers,
# fastapi, starlette, uvicorn, pydantic(-core, -settings), python-dotenv, annotated-types,
# typing-inspection, importlib-metadata and opentelemetry-api (fastapi >= 0.165 imports it);
# the H100 session also carried annotated-doc, anyio, click, h11 and typing_extensions at this
# machine's versions. Install them first from carried wheels into a folder on PYTHONPATH, e.g.
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Its transformers 5.17 worked as is.
set -u
out=${1:?usage: bench/gpu_session.sh OUT_DIR [TRAIN_MINUTES [CONFIG...]]}
train=${2:-0}
shift $(($# < 2 ? $# : 2))
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/gpu/shapes64-3step.json configs/gpu/shapes64-2step.json configs/gpu/shapes64-1step.json)
py=${PYTHON:-python3}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

stage() {  # stage NAME CAP_SECONDS COMMAND...: run with a cap, log to OUT_DIR/logs/NAME.log, show its tail
    local name=$1 cap=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (cap ${cap}s)"
    timeout -k 10 "$cap" "$@" >"$out/logs/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - t0)) s"
    grep -v -e "should be kept in float32" -e "Loading weights" "$out/logs/$name.log" | tail -n "${TAIL:-25}"
}

stage env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $py - <<'EOF'
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
for name in ('diffusers', 'transformers', 'fastapi', 'onnx', 'onnxruntime', 'tensorrt'):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, 'MISSING:', type(e).__name__, e)
try:
    import onnxruntime as ort
    print('onnxruntime providers', ort.get_available_providers())
except Exception:
    pass
EOF"

# timings first, on a quiet GPU
[ "${BENCH:-1}" = 0 ] || TAIL=40 stage bench-export-gpu 150 "$py" bench/bench_export.py --gpu-only --gpu-batch 1 4 16 \
    --compile-modes reduce-overhead --repeats 20 --json "$out/logs/bench_export.json"

if [ -n "${TEACHER_CONFIG:-}" ]; then
    tout=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['out'])" "$TEACHER_CONFIG")
    stage teacher "${TEACHER_CAP:-420}" "$py" -m flash.cli train-teacher --config "$TEACHER_CONFIG" --export "$tout/export"
    if [ -f "$tout/export/unet/diffusion_pytorch_model.safetensors" ]; then
        cp "$tout/export/unet/diffusion_pytorch_model.safetensors" "$out/teacher-unet.safetensors"
        cp "$tout/export/text_encoder/model.safetensors" "$out/teacher-text_encoder.safetensors"
        tar czf "$out/teacher-rest.tgz" --exclude='*.safetensors' -C "$tout" export loss.jsonl samples config.json
    fi
fi

# then training in the background while the correctness tests share the GPU
pids=()
if awk "BEGIN { exit !($train > 0) }"; then
    echo "== train: ${configs[*]} side by side for $train min (in the background)"
    for c in "${configs[@]}"; do
        OMP_NUM_THREADS=4 timeout -k 20 "$(awk "BEGIN { print int($train * 60 + ${TRAIN_SLACK:-150}) }")" \
            "$py" -m flash.cli distill --config "$c" --minutes "$train" \
            >"$out/logs/train-$(basename "$c" .json).log" 2>&1 &
        pids+=($!)
    done
fi

TAIL=40 stage pytest-gpu "${PYTEST_CAP:-300}" "$py" -m pytest -m gpu -p no:cacheprovider -rs -s -q \
    ${GPU_TESTS:-tests/test_gpu_torch.py tests/test_export_gpu.py}

for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    echo "   ${configs[$i]}: exit $?"
done
for c in "${configs[@]}"; do
    name=$(basename "$c" .json)
    run=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['out'])" "$c")
    [ -d "$run" ] || continue  # (a run that never started, e.g. its teacher stage failed)
    tail -n 2 "$run/loss.jsonl" 2>/dev/null
    "$py" -c "import json, sys; c = json.load(open(sys.argv[1])); print(c['distill']['trained_steps'], 'steps', c['eval'])" \
        "$run/student/flash.json" 2>/dev/null
    [ -d "$run/student" ] && tar czf "$out/student-$name.tgz" -C "$run" student
    mkdir -p "$out/logs/run-$name"
    cp -r "$run/loss.jsonl" "$run/config.json" "$run/samples" "$out/logs/run-$name/" 2>/dev/null
done

tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
ls -la "$out"
