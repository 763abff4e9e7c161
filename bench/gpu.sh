#!/usr/bin/env bash
# The GPU proof, in one script (under 8 minutes on one GPU): writes bench/results/gpu.json.
#
#   1. onnxrepair doctor --require cuda            (each provider proven by running a tiny model)
#   2. a ResNet-50-size round trip on the CUDA provider: torchvision resnet50(weights=None), exported here by
#      torch.onnx.export (no download), then `onnxrepair roundtrip --provider cuda --require-provider cuda`
#   3. DeepPatch on the small CIFAR-10 ResNet (bench/train_cifar_resnet.py) with --device cuda --provider cuda,
#      on the CIFAR-10 training image folder (read lazily), --limit images
#   4. evaluation throughput, CPU provider vs CUDA provider, on the same images: ResNet-50 (224x224, the 32x32
#      CIFAR-10 test images resized at decode) and the CIFAR ResNet; clean + two corruptions at severity 3
#
# Usage (from the repository root; DATA_DIR must hold cifar10-jpg.tar.gz):
#   DATA_DIR=../shared/datasets bash bench/gpu.sh
# Dry run of every step on a machine without a GPU (small sizes, CPU everywhere; writes gpu_dryrun.json):
#   DEVICE=cpu DATA_DIR=../shared/datasets bash bench/gpu.sh
# Knobs: PY (python, default .venv/bin/python), CACHE (bench/work: data, trained model), WORK (bench/work/gpu), LIMIT (DeepPatch images),
#        EPOCHS (DeepPatch epochs), EVAL_N50 / EVAL_N (images for the ResNet-50 / CIFAR ResNet throughput runs).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${DEVICE:-cuda}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
DATA_DIR=${DATA_DIR:-../shared/datasets}
CACHE=${CACHE:-$ROOT/bench/work}   # the CIFAR-10 folders and the trained CIFAR ResNet, shared with the other benches
WORK=${WORK:-$CACHE/gpu}           # this run's outputs
if [ "$DEVICE" = cuda ]; then
  LIMIT=${LIMIT:-5000}; EPOCHS=${EPOCHS:-5}; EVAL_N50=${EVAL_N50:-2000}; EVAL_N=${EVAL_N:-10000}; OUT=${OUT:-bench/results/gpu.json}
else
  LIMIT=${LIMIT:-600}; EPOCHS=${EPOCHS:-1}; EVAL_N50=${EVAL_N50:-32}; EVAL_N=${EVAL_N:-500}; OUT=${OUT:-bench/results/gpu_dryrun.json}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$CACHE" "$WORK"
STEPS=$WORK/steps.jsonl
: > "$STEPS"
OR=("$PY" -m onnxrepair)

# step NAME TIMEOUT_S CMD...: run, time, record {name, rc, seconds, stdout file} (stdout is the command's JSON)
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >&2
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  local rc=$?
  local dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  dt=$(printf '%d.%03d' $((dt / 1000)) $((dt % 1000)))
  echo "   rc=$rc in ${dt}s" >&2
  [ $rc -ne 0 ] && tail -3 "$WORK/$name.err" >&2
  printf '{"name": "%s", "rc": %d, "seconds": %s, "command": "%s"}\n' "$name" "$rc" "$dt" "$(echo "$*" | sed 's/"/\\"/g')" >> "$STEPS"
  return $rc
}

# 0. data: the CIFAR-10 image folders
if [ ! -d "$CACHE/cifar10/test" ]; then
  tar xzf "$DATA_DIR/cifar10-jpg.tar.gz" -C "$CACHE" || { echo "no $DATA_DIR/cifar10-jpg.tar.gz (set DATA_DIR)" >&2; exit 2; }
fi

# 1. doctor
if [ "$DEVICE" = cuda ]; then step doctor 120 "${OR[@]}" doctor --require cuda --json; else step doctor 120 "${OR[@]}" doctor --json; fi

# 2. ResNet-50 round trip
step export_resnet50 300 "$PY" - "$WORK/resnet50.onnx" <<'EOF'
import json, sys, time
import torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None).eval()
t = time.perf_counter()
torch.onnx.export(m, torch.randn(2, 3, 224, 224), sys.argv[1], input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
print(json.dumps({"parameters": sum(p.numel() for p in m.parameters()), "export_s": time.perf_counter() - t}))
EOF
REQ=(); [ "$DEVICE" = cuda ] && REQ=(--require-provider cuda)
step roundtrip_resnet50 300 "${OR[@]}" roundtrip "$WORK/resnet50.onnx" -o "$WORK/resnet50_rt.onnx" --provider "$DEVICE" "${REQ[@]}" --json

# 3. DeepPatch on the CIFAR ResNet (trained and cached by bench/train_cifar_resnet.py)
step train_cifar_resnet 600 "$PY" bench/train_cifar_resnet.py --data-dir "$DATA_DIR" --work "$CACHE" --threads 4
CIFAR_MODEL=$CACHE/cifar_resnet_n5000_e6_s0.onnx
CIFAR_FLAGS=(--scale 255 --mean 0.49,0.48,0.45 --std 0.25,0.24,0.26)
step deeppatch_cifar 360 "${OR[@]}" repair "$CIFAR_MODEL" --method deeppatch --data "$CACHE/cifar10/train" --limit "$LIMIT" \
  --device "$DEVICE" --provider "$DEVICE" --epochs "$EPOCHS" -o "$WORK/cifar_deeppatch.onnx" --report "$WORK/deeppatch_report.json" \
  --json -q "${CIFAR_FLAGS[@]}"

# 4. evaluation throughput, CPU vs CUDA provider (the CUDA run keeps batches on the GPU: I/O binding)
IMNET=(--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)
for prov in cpu $([ "$DEVICE" = cuda ] && echo cuda); do
  step "eval_resnet50_$prov" 300 "${OR[@]}" evaluate "$WORK/resnet50.onnx" --data "$CACHE/cifar10/test" --limit "$EVAL_N50" --provider "$prov" \
    --device "$prov" --no-blur --corruptions gaussian_noise,fog --severities 3 --batch-size 128 --json -q "${IMNET[@]}"
  step "eval_cifar_resnet_$prov" 300 "${OR[@]}" evaluate "$CIFAR_MODEL" --data "$CACHE/cifar10/test" --limit "$EVAL_N" --provider "$prov" \
    --device "$prov" --no-blur --corruptions gaussian_noise,fog --severities 3 --batch-size 256 --json -q "${CIFAR_FLAGS[@]}"
done

# 5. gpu.json
"$PY" - "$WORK" "$STEPS" "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path
work, steps, out, device = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

def load(name):
    try:
        return json.loads((work / f"{name}.out").read_text())
    except (OSError, ValueError):
        return None

rows = [json.loads(l) for l in steps.read_text().splitlines() if l.strip()]
res = {"device_asked": device, "steps": rows, "ok": all(r["rc"] == 0 for r in rows)}
doc = load("doctor")
if doc:
    res["doctor"] = doc
rt = load("roundtrip_resnet50")
if rt:
    res["roundtrip_resnet50"] = {"export": load("export_resnet50"), **{k: rt.get(k) for k in ("exporter", "opset", "nodes", "times", "validation")}}
dp = load("deeppatch_cifar")
if dp:
    res["deeppatch_cifar"] = dp
thr = {}
for model in ("resnet50", "cifar_resnet"):
    for prov in ("cpu", "cuda"):
        r = load(f"eval_{model}_{prov}")
        if r:
            m = r["models"][0]
            thr.setdefault(model, {})[prov] = {"images": r["n"], "model_evaluations": r["images_scored"], "seconds": r["seconds"],
                                               "images_per_s": r["images_per_s"], "provider_used": m["provider"], "clean": m["clean"]}
    if model in thr and {"cpu", "cuda"} <= thr[model].keys():
        thr[model]["speedup_cuda_over_cpu"] = thr[model]["cuda"]["images_per_s"] / thr[model]["cpu"]["images_per_s"]
res["evaluation_throughput"] = thr
res["total_seconds"] = sum(r["seconds"] for r in rows)
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(res, indent=2, default=str) + "\n")
print(json.dumps({k: v for k, v in res.items() if k in ("ok", "total_seconds", "evaluation_throughput")}, indent=2))
print(f"wrote {out}", file=sys.stderr)
EOF
