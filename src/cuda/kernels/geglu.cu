// diffusers' GEGLU after its projection: h = [hidden | gate] (rows, 2 inner) ->
// hidden * gelu_erf(gate) (rows, inner), one pass. candle's path is a narrow copy of each half,
// the GELU and the product: four kernels and two (rows, inner) temporaries.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

using sdgen::from_f32;
using sdgen::to_f32;

template <typename T>
__device__ void geglu(const T* __restrict__ h, T* __restrict__ out, size_t rows, int inner) {
    const size_t n = rows * inner;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inner, c = i % inner;
        const float hidden = to_f32(h[r * 2 * inner + c]);
        const float gate = to_f32(h[r * 2 * inner + inner + c]);
        // in the type, as candle's gelu_erf then the product round
        const T g = from_f32<T>(0.5f * gate * (1.f + erff(gate * 0.70710678118654752f)));
        out[i] = from_f32<T>(hidden * to_f32(g));
    }
}

}  // namespace

#define GEGLU(NAME, T)                                                                   \
    extern "C" __global__ void sdgen_geglu_##NAME(const T* h, T* out, size_t rows,      \
                                                  int inner) {                          \
        geglu<T>(h, out, rows, inner);                                                   \
    }

GEGLU(f32, float)
GEGLU(f16, __half)
GEGLU(bf16, __nv_bfloat16)
