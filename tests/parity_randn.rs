//! torch.randn on a seeded CPU generator, against torch's own draws.

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
