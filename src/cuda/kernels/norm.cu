// GroupNorm (+ SiLU) in one kernel. candle_nn's GroupNorm is eleven kernels (to f32, sum,
// divide, subtract, square, sum, add, sqrt, divide, to the type, multiply, add), each a pass
// over the tensor; here one block per (batch, group) reads its group twice from L2 (mean, then
// the centred variance: the two passes the reference computes) and writes it once.
//
// x and out are (batch, channels, pixels) contiguous; weight and bias are f32 (channels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

constexpr int THREADS = 1024;

using sdgen::from_f32;
using sdgen::to_f32;

// the sum of `v` over the block, given to every thread
__device__ inline float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read from the last call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? scratch[lane] : 0.f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

template <typename T>
__device__ void group_norm(const T* __restrict__ x, T* __restrict__ out,
                           const float* __restrict__ weight, const float* __restrict__ bias,
                           int channels, int pixels, int groups, float eps, int silu) {
    __shared__ float scratch[THREADS / 32];
    const int per_group = channels / groups;
    const size_t n = (size_t)per_group * pixels;
    const size_t base = (size_t)blockIdx.x * n;  // blockIdx.x = batch * groups + group
    const int c0 = (blockIdx.x % groups) * per_group;
    const T* xg = x + base;

    float s = 0.f;
    for (size_t i = threadIdx.x; i < n; i += THREADS) s += to_f32(xg[i]);
    const float mean = block_sum(s, scratch) / (float)n;
    float v = 0.f;
    for (size_t i = threadIdx.x; i < n; i += THREADS) {
        const float d = to_f32(xg[i]) - mean;
        v += d * d;
    }
    const float rstd = rsqrtf(block_sum(v, scratch) / (float)n + eps);

    T* og = out + base;
    for (size_t i = threadIdx.x; i < n; i += THREADS) {
        const int c = c0 + (int)(i / pixels);
        float y = (to_f32(xg[i]) - mean) * rstd * weight[c] + bias[c];
        if (silu) y = y / (1.f + __expf(-y));
        og[i] = from_f32<T>(y);
    }
}

}  // namespace

// grid: batch x groups blocks of 1024 threads
#define GROUP_NORM(NAME, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) sdgen_group_norm_##NAME(           \
        const T* x, T* out, const float* weight, const float* bias, int channels, int pixels, \
        int groups, float eps, int silu) {                                                   \
        group_norm<T>(x, out, weight, bias, channels, pixels, groups, eps, silu);            \
    }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
