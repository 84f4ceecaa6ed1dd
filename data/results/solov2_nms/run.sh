#!/bin/bash
# SOLOv2 Matrix NMS vs greedy mask NMS on two trained checkpoints (post-processing only: no training)
set -e
cd "$(dirname "$0")/../../.." && source .venv/bin/activate  # the repository root
export OMP_NUM_THREADS=1
# the shipped cpu checkpoint of that time: git show 608b4f3:data/checkpoints/solov2_cpu_synthetic.pt > data/checkpoints/solov2_cpu_synthetic.pt
for ck in "runs/solov2_800_256/final.pt:800it" "data/checkpoints/solov2_cpu_synthetic.pt:shipped"; do
  path=${ck%%:*}; name=${ck##*:}
  for nms in matrix mask; do
    out=runs/solov2_nms/${name}__${nms}.json
    [ -f "$out" ] && continue
    python -m onestage eval --checkpoint "$path" --device cpu --no-progress --batch-size 1 --model-set nms=$nms --json "$out.tmp" && mv "$out.tmp" "$out"
  done
done
