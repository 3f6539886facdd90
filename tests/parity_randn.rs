//! torch.randn on seeded generators: the CPU one against torch's own draws, the CUDA one against the fixture script's implementation and torch's published values.

mod common;
use common::*;
use sdgen::rng::TorchGenerator;

fn parse_key(key: &str) -> (u64, Vec<usize>) {
    let rest = key.strip_prefix("seed").unwrap();
    let (seed, shape) = rest.split_once('_').unwrap();
    (
        seed.parse().unwrap(),
        shape.split('x').map(|d| d.parse().unwrap()).collect(),
    )
}

#[test]
fn randn_matches_torch_for_every_seed_and_shape() {
    let refs = load_tensors("randn.safetensors");
    let mut checked = 0;
    for (key, want) in &refs {
        if !key.starts_with("seed") {
            continue;
        }
        let (seed, shape) = parse_key(key);
        let n: usize = shape.iter().product();
        let got = TorchGenerator::new(seed).randn(n);
        let d = max_abs_diff(&got, &to_vec(want));
        assert!(d <= 1e-6, "{key}: max abs diff {d:e}");
        checked += 1;
    }
    assert!(checked >= 45, "only {checked} reference draws");
}

#[test]
fn successive_draws_share_one_stream() {
    let refs = load_tensors("randn.safetensors");
    for seed in [0u64, 1, 42, 1234, (1u64 << 32) + 7] {
        let mut g = TorchGenerator::new(seed);
        let mut got = g.randn(3);
        got.extend(g.randn(5));
        got.extend(g.randn(40));
        let want = to_vec(&refs[&format!("seq{seed}")]);
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-6, "seq{seed}: max abs diff {d:e}");
    }
}

/// torch's CUDA generator against the fixture script's own implementation of it (written from
/// the algorithm: Philox4x32-10, curand's Box-Muller, torch's kernel layout; no GPU here), for
/// successive draws from one generator, including draws past one pass of the reference GPU
/// (stored at every 997th element and the last five).
#[test]
fn randn_cuda_matches_the_reference_implementation() {
    use sdgen::rng::CudaGenerator;
    let refs = load_tensors("randn_cuda.safetensors");
    let mut by_seed: std::collections::BTreeMap<u64, Vec<(usize, usize, String)>> =
        Default::default();
    for key in refs.keys().filter(|k| !k.ends_with("_idx")) {
        // seed{S}_draw{K}_n{N}
        let parts: Vec<&str> = key.split('_').collect();
        let seed = parts[0].strip_prefix("seed").unwrap().parse().unwrap();
        let draw = parts[1].strip_prefix("draw").unwrap().parse().unwrap();
        let n = parts[2].strip_prefix("n").unwrap().parse().unwrap();
        by_seed
            .entry(seed)
            .or_default()
            .push((draw, n, key.clone()));
    }
    let mut checked = 0;
    for (seed, mut draws) in by_seed {
        draws.sort();
        let mut g = CudaGenerator::new(seed);
        for (_, n, key) in draws {
            let got = g.randn(n);
            let want = to_vec(&refs[&key]);
            let got: Vec<f32> = match refs.get(&format!("{key}_idx")) {
                Some(idx) => idx
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|&i| got[i as usize])
                    .collect(),
                None => got,
            };
            // within 1e-6 of the value's size (at least 1): f32 here, f64 in the reference
            let d = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
                .fold(0f32, f32::max);
            eprintln!("{key}: max relative diff {d:.2e}");
            assert!(d <= 1e-6, "{key}: max relative diff {d:e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 11);
}

/// The values torch prints for `torch.manual_seed(42); torch.randn(10, device="cuda")` (a
/// widely published output, to four decimals): an anchor outside this project.
#[test]
fn randn_cuda_matches_torch_published_seed_42() {
    let got = sdgen::rng::CudaGenerator::new(42).randn(10);
    let want = [
        0.1940, 2.1614, -0.1721, 0.8491, -1.9244, 0.6530, -0.6494, -0.8175, 0.5280, -1.2753,
    ];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 6e-5, "{got:?}");
    }
}
