//! torchsde's `BrownianInterval` as diffusers' `DPMSolverSDEScheduler` builds it (`tol=1e-6`,
//! `pool_size=24`, `halfway_tree=True`, no Lévy area): the Brownian increment W over any
//! interval [ta, tb] of [t0, t1], a function of the entropy (the seed) alone.
//!
//! The tree: the root holds W(t0, t1) = randn(seed A) x sqrt(t1 - t0); each node splits at its
//! halfway point rounded to 6 decimals (`round(x, 6)`), and the increment of its left half is
//! its own scaled by the halves' lengths plus a Brownian-bridge draw `randn(seed)` (the right
//! half is the rest). A node's seeds come from numpy's `SeedSequence(entropy,
//! spawn_key=(key, depth), pool_size=24)`, the key doubling (plus one on the right) per level;
//! each draw is `torch.randn(size, generator=torch.Generator(device).manual_seed(seed))` on the
//! device's generator. A query is the sum of the tree nodes that cover it, found from the root
//! (torchsde's search from its last query and its caches find the same nodes and values). All
//! tensor arithmetic in f32 with the scalars cast to f32, as torch does it.

use crate::rng::{Generator, RngKind, SeedSequence};

const POOL_SIZE: usize = 24;

/// torchsde's `_round` for `tol=1e-6`: Python's `round(x, 6)` (correctly rounded decimal).
fn round6(x: f64) -> f64 {
    format!("{x:.6}").parse().unwrap_or(x)
}

#[derive(Clone, Copy)]
struct Node {
    start: f64,
    end: f64,
    key: u128,
    depth: u32,
}

pub struct BrownianTree {
    entropy: u64,
    rng: RngKind,
    size: usize,
    root: Node,
    root_w: Vec<f32>,
}

impl BrownianTree {
    /// The tree over [t0, t1] of Brownian motions of `size` elements.
    pub fn new(t0: f64, t1: f64, size: usize, entropy: u64, rng: RngKind) -> Self {
        let seeds = SeedSequence::new(entropy as u128, &[], POOL_SIZE).generate_state(3);
        let mut tree = Self {
            entropy,
            rng,
            size,
            root: Node {
                start: round6(t0),
                end: round6(t1),
                key: 0,
                depth: 0,
            },
            root_w: Vec::new(),
        };
        let scale = (t1 - t0).sqrt() as f32;
        tree.root_w = tree.randn(seeds[0]).iter().map(|v| v * scale).collect();
        tree
    }

    fn randn(&self, seed: u32) -> Vec<f32> {
        Generator::new(self.rng, seed as u64).randn(self.size)
    }

    /// W(tb) - W(ta), for ta <= tb (clipped to [t0, t1] as torchsde clips them).
    pub fn increment(&self, ta: f64, tb: f64) -> Vec<f32> {
        let (start, end) = (self.root.start, self.root.end);
        let clip = |t: f64| {
            if t < start {
                start
            } else if t > end {
                end
            } else {
                t
            }
        };
        let (ta, tb) = (clip(ta), clip(tb));
        if ta == tb {
            return vec![0.0; self.size];
        }
        let mut parts = Vec::new();
        self.cover(self.root, &self.root_w, round6(ta), round6(tb), &mut parts);
        let mut parts = parts.into_iter();
        let mut w = parts.next().unwrap_or_else(|| vec![0.0; self.size]);
        for p in parts {
            for (a, b) in w.iter_mut().zip(p) {
                *a += b;
            }
        }
        w
    }

    /// The increments of the nodes under `node` (whose increment is `w`) that cover [ta, tb],
    /// left to right.
    fn cover(&self, node: Node, w: &[f32], ta: f64, tb: f64, out: &mut Vec<Vec<f32>>) {
        if ta == node.start && tb == node.end {
            out.push(w.to_vec());
            return;
        }
        let mid = round6(0.5 * (node.end + node.start));
        let (left, right) = self.split(node, w, mid);
        let child = |start, end, bit| Node {
            start,
            end,
            key: 2 * node.key + bit,
            depth: node.depth + 1,
        };
        let (l, r) = (child(node.start, mid, 0), child(mid, node.end, 1));
        if tb <= mid {
            self.cover(l, &left, ta, tb, out);
        } else if ta >= mid {
            self.cover(r, &right, ta, tb, out);
        } else {
            self.cover(l, &left, ta, mid, out);
            self.cover(r, &right, mid, tb, out);
        }
    }

    /// The increments of `node`'s halves at `mid`: the left one drawn from the Brownian bridge
    /// with the node's own seed, the right one the rest.
    fn split(&self, node: Node, w: &[f32], mid: f64) -> (Vec<f32>, Vec<f32>) {
        let seed = SeedSequence::new(
            self.entropy as u128,
            &[node.key, node.depth as u128],
            POOL_SIZE,
        )
        .generate_state(1)[0];
        let noise = self.randn(seed);
        let h_reciprocal = 1.0 / (node.end - node.start);
        let left_diff = mid - node.start;
        let right_diff = node.end - mid;
        let var = left_diff * right_diff * h_reciprocal;
        let (ld, hr, sd) = (left_diff as f32, h_reciprocal as f32, var.sqrt() as f32);
        let left: Vec<f32> = w
            .iter()
            .zip(&noise)
            .map(|(&w, &n)| w * ld * hr + sd * n)
            .collect();
        let right = w.iter().zip(&left).map(|(w, l)| w - l).collect();
        (left, right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_as_python_rounds() {
        assert_eq!(round6(0.029167532920837402), 0.029168);
        assert_eq!(round6(14.614641189575195), 14.614641);
        assert_eq!(round6(1.0000005), 1.000001);
    }

    /// Increments add up: W(a, c) = W(a, b) + W(b, c) to rounding, and W(a, a) = 0.
    #[test]
    fn increments_are_additive() {
        let tree = BrownianTree::new(0.03, 14.6, 8, 42, RngKind::TorchCpu);
        let ab = tree.increment(1.0, 2.5);
        let bc = tree.increment(2.5, 7.0);
        let ac = tree.increment(1.0, 7.0);
        for i in 0..8 {
            assert!((ab[i] + bc[i] - ac[i]).abs() < 1e-5, "{ab:?} {bc:?} {ac:?}");
        }
        assert!(tree.increment(3.0, 3.0).iter().all(|&v| v == 0.0));
    }
}
