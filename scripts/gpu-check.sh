#!/usr/bin/env bash
# The one GPU session's check, run on the GPU machine from the repository root: the CUDA
# kernels' tests, image parity, torch's CUDA generator, then the benchmark (sdgen's kernels,
# candle's alone, diffusers) with a per-operation profile. Prepared where the code is built:
#
#   scripts/build-cuda.sh --release --bin sdgen --bench pipeline
#   CARGO_COMMAND=test scripts/build-cuda.sh --release --lib --no-run   # the kernel tests binary
#   mkdir -p .dev; xz -T0 -c <binary> > .dev/{sdgen,bench,ops-tests}.xz
#   pip download diffusers==0.42.1 importlib_metadata into .dev/whl (when the GPU machine
#   has no diffusers)
#
# then, there: `bash scripts/gpu-check.sh [PARTS]` with PARTS among tests, parity, rng, bench,
# profile, diffusers, batch (default all; ROUNDS=N repeats the alternated bench; VARIANTS,
# PROFILE_VARIANTS and BATCH_VARIANT pick sdgen's configurations, PROFILE_BATCH the profile's
# images per U-Net call, DTYPES the bench's types, BATCH_DIFFUSERS="" skips diffusers' batch
# runs). Writes logs and
# results to $OUT (or /tmp/gpu-check).
# Needs on the GPU machine: an NVIDIA driver, a CUDA 13 PyTorch (its libraries serve sdgen).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out" /tmp/sdgen-bin
parts=${1:-tests,parity,rng,bench,profile,diffusers,batch}
want() { [[ ",$parts," == *",$1,"* ]]; }
py=${PYTHON:-python3}

# the CUDA 13 libraries sdgen links (cuBLAS, cuRAND, cudart, nvrtc, cuDNN 9) from the machine's PyTorch
libs=$("$py" - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for name in ["libcublas.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13", "libcudnn.so.9"]:
        for f in glob.glob(os.path.join(sp, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
for b in sdgen bench ops-tests; do
    [ -f ".dev/$b.xz" ] && xz -dc ".dev/$b.xz" >"/tmp/sdgen-bin/$b" && chmod +x "/tmp/sdgen-bin/$b"
done
if [ -d .dev/whl ] && ! "$py" -c "import diffusers" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/whl/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$out/gpu.txt"
status=0

if want tests; then
    echo "== kernel tests (ops::tests::cuda)"
    /tmp/sdgen-bin/ops-tests cuda --test-threads=1 2>&1 | tee "$out/tests.log" | tail -8
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if want parity; then
    echo "== image parity (tiny, tiny2; every scheduler; f32 vs diffusers, f16/bf16 vs f32)"
    rm -rf /tmp/parity && mkdir -p /tmp/parity
    "$py" scripts/gpu_parity.py /tmp/sdgen-bin/sdgen /tmp/parity cuda 2>&1 | tee "$out/parity.txt" || status=1
fi

if want rng; then
    echo "== torch's CUDA generator against tests/fixtures/reference/randn_cuda.safetensors"
    "$py" - <<'PY' 2>&1 | tee "$out/rng.txt"
import re, torch
from safetensors.torch import load_file
ref = load_file("tests/fixtures/reference/randn_cuda.safetensors")
cases = {}
for key in ref:
    m = re.fullmatch(r"seed(\d+)_draw(\d+)_n(\d+)", key)
    if m:
        cases.setdefault(int(m[1]), []).append((int(m[2]), int(m[3]), key))
worst = 0.0
for seed, draws in sorted(cases.items()):
    g = torch.Generator("cuda").manual_seed(seed)
    for k, n, key in sorted(draws):
        x = torch.randn(n, generator=g, device="cuda").cpu()
        idx = ref.get(key + "_idx")
        x = x[idx] if idx is not None else x
        d = (x - ref[key]).abs().max().item()
        worst = max(worst, d)
        print(f"seed {seed} draw {k} n {n}: max |difference| {d:.2e}")
x = torch.randn((1, 4, 64, 64), generator=torch.Generator("cuda").manual_seed(42), device="cuda")
print("seed 42 (1,4,64,64) first values", x.flatten()[:4].tolist())
# the reference is the fixture script's float32 numpy: a few ulps of values up to ~5
print("worst", worst, "PASS" if worst < 4e-6 else "FAIL")
PY
fi

model=/tmp/sd15-random
if want bench || want profile || want diffusers || want batch; then
    if [ ! -f $model/model_index.json ]; then
        t=$(date +%s)
        "$py" scripts/make_fixtures.py --full-size $model >"$out/make.log" 2>&1 || { tail -5 "$out/make.log"; exit 1; }
        echo "full-size random SD 1.5 made in $(( $(date +%s) - t )) s"
    fi
fi
# VARIANTS: sdgen configurations compared, KERNELS:CONV[:ALGO] each (SDGEN_CUDA_KERNELS 1|0,
# SDGEN_CUDA_CONV cudnn|im2col, SDGEN_CUDNN_ALGO heuristic|timed)
variants=${VARIANTS:-1:cudnn 1:im2col 0:im2col}
field() { echo "$1" | cut -d: -f"$2"; }
bench() { # dtype variant parts
    SDGEN_BENCH_MODEL=$model SDGEN_BENCH_DEVICE=cuda SDGEN_BENCH_DTYPE=$1 \
        SDGEN_CUDA_KERNELS=$(field $2 1) SDGEN_CUDA_CONV=$(field $2 2) \
        SDGEN_CUDNN_ALGO=$(field $2 3) SDGEN_BENCH_PARTS=$3 /tmp/sdgen-bin/bench --bench 2>>"$out/bench.err" | tail -1
}
if want bench; then
    echo "== sdgen U-Net step and VAE decode (s) per variant (kernels:conv), alternated"
    for round in $(seq "${ROUNDS:-1}"); do
        for dtype in ${DTYPES:-f16 bf16 f32}; do
            for v in $variants; do
                echo "{\"round\": $round, \"variant\": \"$v\", \"result\": $(bench $dtype $v unet256,unet512,vae)}" | tee -a "$out/bench.jsonl"
            done
        done
    done
fi
if want bench; then
    echo "== sdgen, process start to PNG: one 512x512 image, 50 steps (PNDM, CFG)"
    for dtype in f16 bf16; do
        for v in $variants; do
            t0=$(date +%s%N)
            SDGEN_CUDA_KERNELS=$(field $v 1) SDGEN_CUDA_CONV=$(field $v 2) SDGEN_CUDNN_ALGO=$(field $v 3) \
                /tmp/sdgen-bin/sdgen "a cat on a beach" -m $model --steps 50 \
                --device cuda --dtype $dtype -o /tmp/whole-$dtype.png --quiet --overwrite
            echo "$dtype $v: $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$out/whole.txt"
        done
    done
fi
# the GPU's memory in use, sampled every 50 ms while "$@" runs: its peak (MiB) to $peak_file
peak_file=/tmp/gpu-peak
with_peak() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >/tmp/gpu-mem.log &
    local poll=$!
    "$@"
    local rc=$?
    sleep 0.2; kill $poll; wait $poll 2>/dev/null
    sort -n /tmp/gpu-mem.log | tail -1 >$peak_file
    return $rc
}
stamp() { while IFS= read -r line; do echo "$(date +%s.%N) $line"; done; }
if want batch; then
    echo "== 50-step 512x512 images, batch 1 and 8, f16, ${BATCH_VARIANT:-1:cudnn}: time per image and peak GPU memory"
    v=${BATCH_VARIANT:-1:cudnn}
    export SDGEN_CUDA_KERNELS=$(field $v 1) SDGEN_CUDA_CONV=$(field $v 2) SDGEN_CUDNN_ALGO=$(field $v 3)
    for b in 1 8; do
        t0=$(date +%s.%N)
        with_peak /tmp/sdgen-bin/sdgen "a cat on a beach" -m $model --steps 50 --device cuda --dtype f16 \
            --num-images 8 --batch-size $b -o /tmp/batch-$b-{index}.png --json --quiet | stamp >/tmp/batch-$b.log
        "$py" - "$t0" /tmp/batch-$b.log $b "$(cat $peak_file)" <<'PY' | tee -a "$out/batch.jsonl"
import json, statistics, sys
t0, log, b, peak = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t = [float(l.split(" ", 1)[0]) - t0 for l in open(log)]
r = {"impl": "sdgen", "batch_size": b, "images": len(t), "line_times_s": [round(x, 3) for x in t], "gpu_peak_mib": peak}
if b == 1:  # steady time per image between written images; the rest of the first is start-up
    r["per_image_s"] = statistics.median(y - x for x, y in zip(t, t[1:]))
    r["startup_s"] = t[0] - r["per_image_s"]
print(json.dumps(r))
PY
    done
    unset SDGEN_CUDA_KERNELS SDGEN_CUDA_CONV SDGEN_CUDNN_ALGO
    for n in ${BATCH_DIFFUSERS-1 8}; do
        with_peak "$py" scripts/bench_diffusers.py $model --whole $n --device cuda --dtype f16 \
            >/tmp/diffusers-whole.json 2>>"$out/diffusers.err"
        tail -1 /tmp/diffusers-whole.json | sed "s/}\$/, \"gpu_peak_mib\": $(cat $peak_file)}/" | tee -a "$out/batch.jsonl"
    done
fi
if want profile; then
    echo "== time per operation, 512x512 U-Net steps, f16"
    for v in ${PROFILE_VARIANTS:-1:cudnn}; do
        echo "-- $v, batch ${PROFILE_BATCH:-1}"
        SDGEN_PROFILE_OPS=1 SDGEN_BENCH_MODEL=$model SDGEN_BENCH_DEVICE=cuda SDGEN_BENCH_DTYPE=f16 \
            SDGEN_CUDA_KERNELS=$(field $v 1) SDGEN_CUDA_CONV=$(field $v 2) SDGEN_CUDNN_ALGO=$(field $v 3) \
            SDGEN_BENCH_BATCH=${PROFILE_BATCH:-1} SDGEN_BENCH_PARTS=unet512 /tmp/sdgen-bin/bench --bench 2>&1 >/dev/null \
            | tee -a "$out/profile.txt"
    done
fi
if want diffusers; then
    echo "== diffusers on the same GPU"
    for dtype in ${DIFFUSERS_DTYPES:-f16 bf16 f32}; do
        "$py" scripts/bench_diffusers.py $model --device cuda --dtype $dtype 2>>"$out/diffusers.err" \
            | tail -1 | tee -a "$out/diffusers.jsonl"
    done
fi
exit $status
