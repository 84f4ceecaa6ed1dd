#!/bin/bash
# positive-cell diagnostics of every finished run of the 300-iteration CoordConv pair
cd "$(dirname "$0")/../../../.." && source .venv/bin/activate  # the repository root
export OMP_NUM_THREADS=1
for i in $(seq 1 120); do
  for rec in runs/reproduce_300/solo_coordconv/*__seed*.json; do
    name=$(basename "$rec" .json); out=runs/diag300/$name.json
    [ -f "$out" ] && continue
    python -m onestage.analysis.solo_diagnostics "runs/reproduce_300/solo_coordconv/$name/final.pt" --size 256 --max-images 200 > "$out.tmp" 2>> runs/diag300/err.txt && mv "$out.tmp" "$out"
  done
  [ $(ls runs/diag300/*__seed*.json 2>/dev/null | wc -l) -ge 4 ] && break
  sleep 60
done
