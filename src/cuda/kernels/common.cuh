// What the kernels share: their element types to and from f32 (round to nearest even).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sdgen {

__device__ inline float to_f32(float x) { return x; }
__device__ inline float to_f32(__half x) { return __half2float(x); }
__device__ inline float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_f32(float x);
template <> __device__ inline float from_f32(float x) { return x; }
template <> __device__ inline __half from_f32(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }

}  // namespace sdgen
