// Fused attention, softmax(q k^T * scale) v, for f16 and bf16 on the tensor cores (WMMA).
//
// One block of 4 warps takes 64 query rows of one (batch, head) and walks the keys in tiles of
// 64, keeping a running maximum and sum per row ("online softmax", as flash attention does), so
// the scores are never in device memory. candle's CUDA path materialised them in f32
// (2 x 8 x 4096 x 4096 x 4 bytes = 1 GB per attention at 512x512) and ran both products in f32.
//
// q, k, v and out are (batch, tokens, heads x d), heads side by side, as the projections give
// them and the output projection takes them: no split or merge copies. d is padded to DP (a
// multiple of 16, the fragments' depth) with zeros in shared memory. Scores and the output
// accumulate in f32; the probabilities are rounded to the input type before the second product
// (as flash attention does).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include "common.cuh"

using namespace nvcuda;

namespace {

constexpr int BM = 64;  // query rows per block (16 per warp)
constexpr int BN = 64;  // keys per tile
constexpr int WARPS = 4;

template <int DP>
struct Layout {
    static constexpr int LDT = DP + 8;   // Q, K, V rows (16-bit elements)
    static constexpr int LDS = BN + 4;   // scores (f32)
    static constexpr int LDP = BN + 8;   // probabilities (16-bit)
    static constexpr int LDO = DP + 4;   // output accumulators (f32)
    static constexpr int Q = 0;
    static constexpr int K = Q + BM * LDT * 2;
    static constexpr int V = K + BN * LDT * 2;
    static constexpr int S = V + BN * LDT * 2;
    static constexpr int P = S + BM * LDS * 4;
    static constexpr int O = P + BM * LDP * 2;
    static constexpr int M = O + BM * LDO * 4;
    static constexpr int L = M + BM * 4;
    static constexpr int BYTES = L + BM * 4;
    static_assert(BYTES <= 227 * 1024, "over the shared memory of a block");
};

using sdgen::from_f32;
using sdgen::to_f32;

// rows [row0, row0 + rows) of a (tokens, stride) matrix, columns [col0, col0 + d), into a
// rows x DP shared tile; zeros past d and past `valid` rows
template <typename T, int DP>
__device__ inline void load_tile(T* dst, const T* src, int row0, int valid, int stride, int col0,
                                 int d) {
    constexpr int LDT = Layout<DP>::LDT;
    const T zero = from_f32<T>(0.f);
    for (int i = threadIdx.x; i < BN * DP; i += WARPS * 32) {
        int r = i / DP, c = i % DP;
        T x = zero;
        if (r < valid && c < d) x = src[(size_t)(row0 + r) * stride + col0 + c];
        dst[r * LDT + c] = x;
    }
}

template <typename T, int DP>
__device__ void attention(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ out, int tq, int tk,
                          int heads, int d, float scale_log2) {
    using L = Layout<DP>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* qs = reinterpret_cast<T*>(smem + L::Q);
    T* ks = reinterpret_cast<T*>(smem + L::K);
    T* vs = reinterpret_cast<T*>(smem + L::V);
    float* ss = reinterpret_cast<float*>(smem + L::S);
    T* ps = reinterpret_cast<T*>(smem + L::P);
    float* os = reinterpret_cast<float*>(smem + L::O);
    float* ms = reinterpret_cast<float*>(smem + L::M);
    float* ls = reinterpret_cast<float*>(smem + L::L);

    const int q0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
    const int stride = heads * d;
    const T* qb = q + (size_t)b * tq * stride;
    const T* kb = k + (size_t)b * tk * stride;
    const T* vb = v + (size_t)b * tk * stride;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r0 = warp * 16;

    load_tile<T, DP>(qs, qb, q0, min(BM, tq - q0), stride, h * d, d);
    for (int i = threadIdx.x; i < BM * L::LDO; i += WARPS * 32) os[i] = 0.f;
    for (int i = threadIdx.x; i < BM; i += WARPS * 32) {
        ms[i] = -INFINITY;
        ls[i] = 0.f;
    }

    // the two lanes of a pair share one row, each taking half of the tile's columns
    const int row = r0 + lane / 2, half = lane % 2;
    for (int k0 = 0; k0 < tk; k0 += BN) {
        const int valid = min(BN, tk - k0);
        __syncthreads();  // the last tile's K and V are read by every warp
        load_tile<T, DP>(ks, kb, k0, valid, stride, h * d, d);
        load_tile<T, DP>(vs, vb, k0, valid, stride, h * d, d);
        __syncthreads();

        // S = Q K^T for this warp's 16 rows
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
                wmma::load_matrix_sync(a, qs + r0 * L::LDT + kk * 16, L::LDT);
                wmma::load_matrix_sync(bk, ks + j * 16 * L::LDT + kk * 16, L::LDT);
                wmma::mma_sync(acc, a, bk, acc);
            }
            wmma::store_matrix_sync(ss + r0 * L::LDS + j * 16, acc, L::LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // online softmax over the tile, in log2 units (scale_log2 = scale * log2 e)
        const float* srow = ss + row * L::LDS;
        const int c0 = half * (BN / 2);
        float tile_max = -INFINITY;
        for (int c = c0; c < c0 + BN / 2; ++c)
            if (c < valid) tile_max = fmaxf(tile_max, srow[c] * scale_log2);
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        const float m_old = ms[row];
        const float m_new = fmaxf(m_old, tile_max);
        const float alpha = exp2f(m_old - m_new);
        float sum = 0.f;
        T* prow = ps + row * L::LDP;
        for (int c = c0; c < c0 + BN / 2; ++c) {
            float p = c < valid ? exp2f(srow[c] * scale_log2 - m_new) : 0.f;
            T pt = from_f32<T>(p);
            prow[c] = pt;
            sum += to_f32(pt);
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        float* orow = os + row * L::LDO;
        for (int c = half; c < DP; c += 2) orow[c] *= alpha;
        __syncwarp();
        if (half == 0) {
            ms[row] = m_new;
            ls[row] = ls[row] * alpha + sum;
        }

        // O += P V
#pragma unroll
        for (int j = 0; j < DP / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, os + r0 * L::LDO + j * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
                wmma::load_matrix_sync(a, ps + r0 * L::LDP + kk * 16, L::LDP);
                wmma::load_matrix_sync(bv, vs + kk * 16 * L::LDT + j * 16, L::LDT);
                wmma::mma_sync(acc, a, bv, acc);
            }
            wmma::store_matrix_sync(os + r0 * L::LDO + j * 16, acc, L::LDO, wmma::mem_row_major);
        }
        __syncwarp();
    }

    // out = O / l, this warp's rows
    for (int i = lane; i < 16 * d; i += 32) {
        const int r = r0 + i / d, c = i % d;
        if (q0 + r < tq) {
            const float inv = 1.f / ls[r];
            out[((size_t)b * tq + q0 + r) * stride + h * d + c] = from_f32<T>(os[r * L::LDO + c] * inv);
        }
    }
}

}  // namespace

// sdgen_attention_<type>_<DP>: grid (ceil(tq / 64), heads, batch), 128 threads, dynamic shared
// memory Layout<DP>::BYTES (cuda/attention.rs computes the same)
// (two levels, so that DP is expanded before it is pasted into the name)
#define INSTANCE(NAME, T, DP) INSTANCE_(NAME, T, DP)
#define INSTANCE_(NAME, T, DP)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                   \
        sdgen_attention_##NAME##_##DP(const T* q, const T* k, const T* v, T* out, int tq,    \
                                      int tk, int heads, int d, float scale_log2) {          \
        attention<T, DP>(q, k, v, out, tq, tk, heads, d, scale_log2);                         \
    }

// One head width per module (build.rs compiles this file once per SDGEN_DP): the driver
// compiles a module's PTX whole when it is first loaded, so a model loads only the widths it
// has (SD 1.5: 48, 80 and 160; SD 2 and SDXL: 64).
#ifndef SDGEN_DP
#error "build.rs sets SDGEN_DP, the padded head width of this module"
#endif
INSTANCE(f16, __half, SDGEN_DP)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
INSTANCE(bf16, __nv_bfloat16, SDGEN_DP)
#endif
