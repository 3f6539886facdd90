#!/usr/bin/env bash
# CPU benchmark of sdgen against diffusers on the same full-size random-weight SD 1.5, same
# thread count, in one run; prints both sets of figures and their ratios (sdgen / diffusers).
#
#   scripts/bench.sh [THREADS] [f32|bf16|f16]
#
# SDGEN_BENCH_FAMILY=sdxl benchmarks a full-size random SDXL base at 1024x1024 instead (made
# with scripts/make_fixtures.py --full-size-xl into ~/.cache/sdgen-bench/sdxl-random, about
# 14 GB; needs about 20 GB of memory).
#
# SDGEN_BENCH_DEVICE=cuda times both on the GPU instead (sdgen built with --features cuda,
# torch with CUDA); THREADS then only sets the CPU threads of the host side.
#
# Needs Python with scripts/requirements.txt (set PYTHON, default python3). The model is made
# once with scripts/make_fixtures.py --full-size into $SDGEN_BENCH_DIR (default
# ~/.cache/sdgen-bench/sd15-random, about 4 GB; never commit it).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
dtype=${2:-f32}
py=${PYTHON:-python3}
family=${SDGEN_BENCH_FAMILY:-sd15}
case $family in
  sd15) default_dir=sd15-random make=--full-size ;;
  sdxl) default_dir=sdxl-random make=--full-size-xl ;;
  *) echo "SDGEN_BENCH_FAMILY is sd15 or sdxl" >&2; exit 2 ;;
esac
model=${SDGEN_BENCH_DIR:-$HOME/.cache/sdgen-bench/$default_dir}
if [ ! -f "$model/model_index.json" ]; then
  echo "making the full-size random model in $model" >&2
  "$py" scripts/make_fixtures.py "$make" "$model"
fi
device=${SDGEN_BENCH_DEVICE:-cpu}
features=()
case $device in cuda*) features=(--features cuda) ;; esac
cargo build --release --quiet "${features[@]}"
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
ours=$(SDGEN_BENCH_MODEL=$model SDGEN_BENCH_DTYPE=$dtype SDGEN_BENCH_DEVICE=$device cargo bench --quiet "${features[@]}" --bench pipeline 2>/dev/null | tail -1)
theirs=$("$py" scripts/bench_diffusers.py "$model" --threads "$threads" --dtype "$dtype" --device "$device" 2>/dev/null | tail -1)
"$py" - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'':26} {'sdgen':>10} {'diffusers':>10} {'ratio':>7}")
keys = ["load_s", "text_encoder_s", "unet_step_256_s", "unet_step_512_s", "vae_decode_512_s", "generation_512_2steps_s", "peak_rss_mb"]
if a.get("family") == "sdxl":
    keys = ["load_s", "text_encoder_s", "unet_step_1024_s", "vae_decode_1024_s", "generation_1024_2steps_s", "peak_rss_mb"]
for k in keys:
    print(f"{k:26} {a[k]:10.2f} {b[k]:10.2f} {a[k] / b[k]:7.2f}")
print(json.dumps({"sdgen": a, "diffusers": b}))
PY
