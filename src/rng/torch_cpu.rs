//! torch's CPU generator.
//!
//! Reproduces `torch.Generator("cpu").manual_seed(seed)` followed by `torch.randn(..)` in float32,
//! so that a seed shared by a diffusers user gives the same initial latents (and the same
//! ancestral noise) here. References: ATen `core/MT19937RNGEngine.h`,
//! `native/cpu/DistributionTemplates.h` (`normal_fill_16_AVX2`, `normal_kernel`) and
//! `native/cpu/avx_mathfun.h` (the Cephes `log256_ps` / `sincos256_ps` polynomials, ported here
//! lane by lane in f32 so the results agree with x86-64 torch wheels to within an ulp).

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The MT19937 engine exactly as torch seeds and steps it.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; MT_N],
    next: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: MT_N }
    }

    fn twist(&mut self) {
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mut v = self.state[(i + MT_M) % MT_N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.next = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// A CPU torch generator: the engine plus the cached second normal of the double path.
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    cached_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed),
            cached_normal: None,
        }
    }

    /// `torch.randn(n, generator=self, dtype=torch.float32)` as a flat vector (row-major for any
    /// shape with `n` elements, since torch fills a fresh contiguous tensor).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n >= 16 {
            self.randn_vectorised(n)
        } else {
            (0..n).map(|_| self.normal_f64() as f32).collect()
        }
    }

    /// `at::normal_distribution<double>`: the path torch takes for tensors under 16 elements.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        const MASK53: u64 = (1u64 << 53) - 1;
        let scale = 1.0 / (1u64 << 53) as f64;
        let u1 = (self.engine.next_u64() & MASK53) as f64 * scale;
        let u2 = (self.engine.next_u64() & MASK53) as f64 * scale;
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// `normal_fill` with the AVX2 16-lane kernel (x86-64 wheels take this path).
    fn randn_vectorised(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let mut i = 0;
        while i + 16 <= n {
            normal_fill_16(&mut data[i..i + 16]);
            i += 16;
        }
        if n % 16 != 0 {
            // torch recomputes the last 16 values from fresh uniforms.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }
}

fn normal_fill_16(data: &mut [f32]) {
    const TWO_PI: f32 = std::f32::consts::TAU;
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * log_ps(u1)).sqrt();
        let theta = TWO_PI * u2;
        let (s, c) = sincos_ps(theta);
        data[j] = radius * c;
        data[j + 8] = radius * s;
    }
}

/// One lane of `log256_ps` (Cephes logf polynomial).
fn log_ps(x: f32) -> f32 {
    if x <= 0.0 {
        return f32::NAN;
    }
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    e += 1.0;
    let mask = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if mask { x } else { 0.0 };
    x -= 1.0;
    if mask {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = 7.037_683_6E-2f32;
    for p in [
        -1.151_461_031E-1f32,
        1.167_699_874E-1,
        -1.242_014_084_6E-1,
        1.424_932_278_7E-1,
        -1.666_805_766_5E-1,
        2.000_071_476_5E-1,
        -2.499_999_399_3E-1,
        3.333_333_117_4E-1,
    ] {
        y = y * x + p;
    }
    y *= x;
    y *= z;
    y += e * -2.121_944_40e-4;
    y -= z * 0.5;
    x += y;
    x + e * 0.693_359_375
}

/// One lane of `sincos256_ps` (Cephes sinf/cosf with the extended-precision reduction).
fn sincos_ps(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let x = x.abs();
    let y = x * 1.273_239_544_735_16f32;
    let j = ((y as i32).wrapping_add(1)) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_sin_first = (j & 2) == 0;
    let mut x = x;
    x += y * -0.785_156_25f32;
    x += y * -2.418_756_484_985_351_562_5e-4f32;
    x += y * -3.774_894_977_445_941_08e-8f32;
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let sign_sin = sign_sin ^ swap_sign_sin;
    let z = x * x;
    let mut yc = 2.443_315_711_809_948E-5f32;
    yc = yc * z + -1.388_731_625_493_765E-3;
    yc = yc * z + 4.166_664_568_298_827E-2;
    yc *= z;
    yc *= z;
    yc -= z * 0.5;
    yc += 1.0;
    let mut ys = -1.951_529_589_1E-4f32;
    ys = ys * z + 8.332_160_873_6E-3;
    ys = ys * z + -1.666_665_461_1E-1;
    ys *= z;
    ys *= x;
    ys += x;
    // poly_mask selects the sine polynomial for the sine where (j & 2) == 0.
    let (sin_v, cos_v) = if poly_sin_first { (ys, yc) } else { (yc, ys) };
    (
        f32::from_bits(sin_v.to_bits() ^ sign_sin),
        f32::from_bits(cos_v.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_stream() {
        // std::mt19937(5489) yields 3499211612 first; the 10000th output is 4123659995.
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn log_and_sincos_are_accurate() {
        for i in 1..1000 {
            let x = i as f32 / 1000.0;
            assert!((log_ps(x) - x.ln()).abs() < 1e-6, "log {x}");
            let t = x * std::f32::consts::TAU;
            let (s, c) = sincos_ps(t);
            assert!(
                (s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6,
                "sincos {t}"
            );
        }
    }
}
