//! torch's CUDA generator, computed on the host: `torch.randn(shape,
//! generator=torch.Generator("cuda").manual_seed(seed), device="cuda")` in float32.
//!
//! What torch does (ATen `cuda/DistributionTemplates.h`, curand's `curand_kernel.h` and
//! `curand_philox4x32_x.h`):
//! - `normal_kernel` launches blocks of 256 threads, as many as the tensor needs, at most
//!   (SMs x 2048 / 256); thread `idx` calls `curand_init(seed, idx, offset)`: Philox4x32-10 keyed
//!   by the seed, its 128-bit counter starting at subsequence `idx` (high 64 bits) plus
//!   `offset / 4` (low 64 bits);
//! - each `curand_normal4` call takes one counter value (then the next) and turns its four
//!   32-bit words into four normals by Box-Muller (`sin` of the first pair's angle, its `cos`,
//!   then the same for the second pair); call `j` of thread `idx` writes elements
//!   `idx + stride x (4j + k)`, k = 0..4, that exist (`stride` = the launch's threads);
//! - the generator's offset then advances by 4 x (calls per thread).
//!
//! Tensors of up to one pass (270336 x 4 elements on the reference GPU) do not depend on the
//! GPU; beyond that the layout follows the SM count, here that of the H100 / H200 (132 SMs,
//! 2048 threads each). Box-Muller runs in f32 as curand writes it (`x * 2^-32 + 2^-33` fused
//! as nvcc fuses it, `logf`, `sqrtf`, sine and cosine), so values agree with a GPU's to about
//! 1e-6: the GPU's `__sincosf` is an approximation no host library reproduces bit for bit.

/// Threads per block of torch's distribution kernels.
const BLOCK: u64 = 256;
/// The reference GPU: streaming multiprocessors, and threads each can hold (H100/H200 SXM).
const SMS: u64 = 132;
const THREADS_PER_SM: u64 = 2048;
/// Normals per `curand_normal4` call.
const UNROLL: u64 = 4;

/// `torch.Generator("cuda").manual_seed(seed)`: the seed and the Philox offset.
#[derive(Clone, Debug)]
pub struct CudaGenerator {
    seed: u64,
    offset: u64,
}

impl CudaGenerator {
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// `torch.randn(n, generator=self, device="cuda")`, flat.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n == 0 {
            return Vec::new();
        }
        let n64 = n as u64;
        let blocks = n64.div_ceil(BLOCK).min(SMS * (THREADS_PER_SM / BLOCK));
        let stride = BLOCK * blocks;
        let calls = (n64 - 1) / (stride * UNROLL) + 1;
        let offset = self.offset;
        self.offset += calls * 4;
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let mut out = vec![0f32; n];
        for idx in 0..stride {
            for j in 0..calls {
                let counter = ((idx as u128) << 64).wrapping_add((offset / 4 + j) as u128);
                let words = philox4x32_10(counter, key);
                let (a, b) = box_muller(words[0], words[1]);
                let (c, d) = box_muller(words[2], words[3]);
                for (k, v) in [a, b, c, d].into_iter().enumerate() {
                    let at = idx + stride * (UNROLL * j + k as u64);
                    if at < n64 {
                        out[at as usize] = v;
                    }
                }
            }
        }
        out
    }
}

/// Philox4x32 with 10 rounds on a 128-bit counter (word 0 the lowest).
fn philox4x32_10(counter: u128, key: [u32; 2]) -> [u32; 4] {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let mut c = [
        counter as u32,
        (counter >> 32) as u32,
        (counter >> 64) as u32,
        (counter >> 96) as u32,
    ];
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// curand's `_curand_box_muller`: two uniform words to two normals (sine first).
fn box_muller(x: u32, y: u32) -> (f32, f32) {
    const INV: f32 = 2.328_306_4e-10;
    const INV_2PI: f32 = 2.328_306_4e-10 * 6.283_185_5;
    let u = (x as f32).mul_add(INV, INV / 2.0);
    let v = (y as f32).mul_add(INV_2PI, INV_2PI / 2.0);
    let s = (-2.0 * u.ln()).sqrt();
    let (sin, cos) = v.sin_cos();
    (sin * s, cos * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known-answer vectors of the Random123 suite (kat_vectors, philox4x32 10 rounds).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10(0, [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        let ones = u128::MAX;
        assert_eq!(
            philox4x32_10(ones, [u32::MAX, u32::MAX]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        let pi =
            0x243f6a88u128 | 0x85a308d3u128 << 32 | 0x13198a2eu128 << 64 | 0x03707344u128 << 96;
        assert_eq!(
            philox4x32_10(pi, [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn the_offset_advances_by_four_per_call_per_thread() {
        let mut g = CudaGenerator::new(1);
        g.randn(10);
        assert_eq!(g.offset, 4);
        // more than one pass on the reference GPU: two calls per thread
        g.randn(4 * 270_336 + 1);
        assert_eq!(g.offset, 12);
        g.randn(0);
        assert_eq!(g.offset, 12);
    }
}
