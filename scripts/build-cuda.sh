#!/usr/bin/env bash
# Builds sdgen with `--features cuda` on a machine that has no CUDA toolkit and no GPU.
#
#   scripts/build-cuda.sh                 # -> target/release/sdgen (CUDA 13.0, sm_90: H100/H200)
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh --bins --tests   # other GPUs, other cargo targets
#
# The toolkit comes from NVIDIA's wheels on PyPI (nvcc, the headers with CCCL, cudart, nvrtc,
# cuBLAS, cuRAND), all of the CUDA 13.0 series: a newer nvcc writes PTX that a CUDA 13.0 driver
# cannot load. They are unpacked once into $SDGEN_CUDA_TOOLKIT (default target/cuda-toolkit).
# No wheel has the driver library, libcuda, and cuDNN's is large, so stubs that only define the
# functions cudarc declares are made for the linker (sonames libcuda.so.1, libcudnn.so.9); they
# live in the toolkit's `stub/` folder and must never be put on a run-time library path: at
# run time the real driver and the CUDA 13 libraries and cuDNN 9 of the GPU machine are used
# (a CUDA 13 PyTorch has them in its `nvidia/*/lib` folders). Needs: python3 with pip, a C compiler, cargo. ~6 min on 2 cores.
# Extra arguments go to `cargo build` (default `--release --bin sdgen`).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
tk="${SDGEN_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}"
root="$tk/py/nvidia/cu13"
python="${PYTHON:-python3}"

if [ ! -x "$root/bin/nvcc" ]; then
    echo "unpacking the CUDA 13.0 toolkit wheels into $tk" >&2
    "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$tk/py" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
fi

# the linker looks for unversioned names
for lib in "$root"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

# link stubs for the libraries no wheel here provides: the driver (libcuda.so.1) and cuDNN
# (libcudnn.so.9, ~800 MB as a wheel), each defining every function cudarc's bindings name
cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)"
if [ -z "$cudarc" ]; then
    cargo fetch --locked
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)"
fi
stub() { # library soname bindings prefix
    [ -e "$tk/stub/$1.so" ] && return
    mkdir -p "$tk/stub"
    grep -hoE "^ +fn $4[A-Za-z0-9_]+\(" "$cudarc/src/$3/sys/mod.rs" \
        | sed -E 's/^ +fn ([A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u \
        >"$tk/stub/$1.c"
    cc -shared -fPIC -Wl,-soname,"$2" -o "$tk/stub/$1.so" "$tk/stub/$1.c"
}
stub libcuda libcuda.so.1 driver cu
stub libcudnn libcudnn.so.9 cudnn cudnn

export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export PATH="$root/bin:$PATH"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$tk/stub -L native=$root/lib"
[ $# -gt 0 ] || set -- --release --bin sdgen
# CARGO_COMMAND=test with `--release --lib --no-run`: only the library's test binary (the
# kernel tests), without the integration tests' binaries
cargo "${CARGO_COMMAND:-build}" --locked --features cuda "$@"
