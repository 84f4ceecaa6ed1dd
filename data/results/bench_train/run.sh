#!/usr/bin/env bash
# How the numbers in README.md were made (repository root, the project's venv, nothing else running).
set -euo pipefail
# time to a quality: each model at each regime, evaluated every 50 iterations until its target (resumable: finished
# model × preset pairs in the JSON are skipped) -> regimes.json
python -m onestage bench regimes --models fcos condinst --train-presets cpu fast fast:warm --threads 2 \
    --eval-every 50 --json data/results/bench_train/regimes.json --runs runs/bench_regimes
# the two `bench train` rows of the lever table (median of 3 steps after 1 warm-up)
python -m onestage bench train --models fcos --train-presets cpu --threads 2 --repeats 3 --warmup 1
python -m onestage bench train --models fcos condinst --train-presets fast --threads 2 --repeats 3 --warmup 1
# the full matrix: six models x both presets x 1 and 2 threads -> steps.json, steps.md (table printed at the end)
python -m onestage bench train --train-presets cpu fast --threads 1 2 --repeats 3 --warmup 1 \
    --json data/results/bench_train/steps.json
# the SOLO scale-range lever (solo_scale_ranges.json): the fast preset (scaled ranges) vs the paper's 800-px ranges
python -m onestage train --model solov2 --preset fast --max-iters 300 --eval --out runs/solo_scale/scaled
python -m onestage train --model solov2 --preset fast --max-iters 300 --eval --out runs/solo_scale/paper \
    --set 'scale_ranges=((1,96),(48,192),(96,384),(192,768),(384,2048))'
