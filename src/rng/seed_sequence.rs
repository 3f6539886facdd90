//! numpy's `SeedSequence` (Melissa O'Neill's `seed_seq` hashing, as `numpy/random/
//! bit_generator.pyx` writes it): torchsde seeds each node of its Brownian tree with one, so
//! the SDE scheduler's noise depends on it.

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// A non-negative integer as numpy's `_int_to_uint32_array` splits it: 32-bit words, lowest
/// first, `[0]` for zero.
fn words(mut n: u128) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(n as u32);
        n >>= 32;
    }
    out
}

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

/// `np.random.SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size)`.
pub struct SeedSequence {
    pool: Vec<u32>,
}

impl SeedSequence {
    pub fn new(entropy: u128, spawn_key: &[u128], pool_size: usize) -> Self {
        let mut run = words(entropy);
        let spawn: Vec<u32> = spawn_key.iter().flat_map(|&k| words(k)).collect();
        if !spawn.is_empty() && run.len() < pool_size {
            run.resize(pool_size, 0);
        }
        let entropy: Vec<u32> = run.into_iter().chain(spawn).collect();
        let mut pool = vec![0u32; pool_size];
        let mut hash_const = INIT_A;
        for (i, p) in pool.iter_mut().enumerate() {
            *p = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hash_const);
        }
        for src in 0..pool_size {
            for dst in 0..pool_size {
                if src != dst {
                    let h = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        for &e in entropy.iter().skip(pool_size) {
            for dst in 0..pool_size {
                let h = hashmix(e, &mut hash_const);
                pool[dst] = mix(pool[dst], h);
            }
        }
        Self { pool }
    }

    /// `generate_state(n)` (uint32 words).
    pub fn generate_state(&self, n: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        (0..n)
            .map(|i| {
                let mut v = self.pool[i % self.pool.len()] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy 2.4's `SeedSequence(entropy, spawn_key=..., pool_size=...).generate_state(4)`.
    #[test]
    fn matches_numpy() {
        let cases: [(u128, &[u128], usize, [u32; 4]); 6] = [
            (42, &[], 4, [3444837047, 2669555309, 2046530742, 3581440988]),
            (42, &[], 24, [387750627, 2536650517, 4078839648, 2023786165]),
            (
                0,
                &[0, 0],
                24,
                [245430115, 3436620678, 4120055464, 1627243804],
            ),
            (
                7,
                &[5, 3],
                24,
                [1167487741, 594211726, 3626736891, 2420502566],
            ),
            (
                (1 << 40) + 3,
                &[123456, 17],
                24,
                [3655221505, 2592665169, 1426045155, 2734783157],
            ),
            (
                u64::MAX as u128,
                &[(1 << 33) + 1, 30],
                8,
                [2212757804, 2091185525, 2273882069, 3613395387],
            ),
        ];
        for (entropy, key, pool, want) in cases {
            let got = SeedSequence::new(entropy, key, pool).generate_state(4);
            assert_eq!(got, want, "entropy {entropy} spawn key {key:?} pool {pool}");
        }
    }
}
