//! The engines against each other: each CPU kernel, reached through the dispatch here, against
//! the reference composition on the same inputs; and which kernel each prepared weight names.

use super::*;
use crate::cpu::bf16::layers::tests::{on_each_kernel, rand, rel_diff};

fn f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

fn cpu(bf16: Option<Bf16Kernel>) -> Engine {
    Engine::Cpu(CpuEngine::with_bf16(bf16))
}

/// max |got - want| / max |want| ([`rel_diff`] for results of any type against any reference).
fn rel(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    rel_diff(got, &f32(want))
}

#[test]
fn f32_attention_matches_the_reference() {
    let dev = Device::Cpu;
    // self-attention at 64x64 latents (8 heads of 40 over batch 1... as SD 1.5's first
    // block), an odd token count, and cross-attention over 77 tokens
    for (heads, tq, tk, d) in [(2, 4096, 4096, 40), (3, 81, 81, 8), (4, 256, 77, 16)] {
        let q = Tensor::randn(0f32, 1.0, (1, tq, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, tk, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, tk, heads * d), &dev).unwrap();
        let got = attention(cpu(None), q.clone(), k.clone(), v.clone(), heads).unwrap();
        let want = attention(Engine::Reference, q, k, v, heads).unwrap();
        let r = rel(&got, &want);
        assert!(r <= 1e-5, "fused attention {heads}x{tq}x{tk}x{d}: {r:e}");
    }
}

#[test]
fn bf16_attention_matches_f32_on_the_same_bf16_inputs() {
    on_each_kernel(|kernel| {
        // (b, heads, tq, tk, d, dv): SD's 40 (padded to 64 on the tiles), keys not a multiple
        // of 32 (77), queries not a multiple of 32, one head of 64 (the VAE's shape), keys
        // over three chunks of the kernel's 256
        for &(b, h, tq, tk, d, dv) in &[
            (2usize, 2usize, 70usize, 77usize, 40usize, 40usize),
            (1, 3, 33, 100, 8, 16),
            (1, 1, 200, 200, 64, 64),
            (1, 2, 40, 600, 40, 40),
        ] {
            // scores spread wider than +-0.5 inputs give: q times 8 (exact in bf16)
            let q = (rand(&[b, tq, h * d], 7) * 8.0).unwrap();
            let k = rand(&[b, tk, h * d], 8);
            let v = rand(&[b, tk, h * dv], 9);
            let want = attention(Engine::Reference, f32(&q), f32(&k), f32(&v), h).unwrap();
            let got = attention(cpu(Some(kernel)), q, k, v, h).unwrap();
            assert_eq!(got.dtype(), DType::BF16);
            let d_rel = rel_diff(&got, &want);
            // probabilities and result each rounded to bf16 once
            assert!(
                d_rel < 1.0 / 128.0,
                "{kernel:?} ({b}, {h}, {tq}, {tk}, {d}, {dv}): {d_rel}"
            );
        }
    });
}

/// The layers of the CPU engine against the reference, f32 and bf16 (on every bf16 kernel
/// this CPU has, and widened to f32), through the dispatch.
#[test]
fn cpu_layers_match_the_reference() {
    let mut engines = vec![cpu(None)];
    engines.extend(bf16_kernels().into_iter().map(|k| cpu(Some(k))));
    for engine in engines {
        for dtype in [DType::F32, DType::BF16] {
            let t = |shape: &[usize], seed| rand(shape, seed).to_dtype(dtype).unwrap();
            // bf16 results are rounded once: 2^-8 relative; f32 within the kernels' sums
            let tol = if dtype == DType::BF16 {
                1.0 / 128.0
            } else {
                1e-5
            };
            let case = format!("{engine:?} {dtype:?}");
            let x = t(&[2, 50, 64], 1);
            let (w, b) = (t(&[96, 64], 2), t(&[96], 3));
            let lin = LinearWeights::prepare(engine, w.clone(), Some(b.clone())).unwrap();
            let want = reference::linear(&f32(&x), &f32(&w), Some(&f32(&b))).unwrap();
            assert!(
                rel(&linear(&x, &lin).unwrap(), &want) < tol,
                "{case} linear"
            );
            let gg = LinearWeights::prepare_geglu(engine, w.clone(), Some(b.clone())).unwrap();
            let want = reference::geglu(&want).unwrap();
            assert!(rel(&geglu(&x, &gg).unwrap(), &want) < tol, "{case} geglu");
            let img = t(&[2, 32, 9, 7], 4);
            for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
                let (w, b) = (t(&[40, 32, k, k], 5), t(&[40], 6));
                let g = ConvGeometry { stride, padding };
                let conv = ConvWeights::prepare(engine, w.clone(), b.clone(), g).unwrap();
                let want = reference::conv2d(&f32(&img), &f32(&w), &f32(&b), g).unwrap();
                let got = conv2d(&img, &conv).unwrap();
                assert!(rel(&got, &want) < tol, "{case} conv {k}x{k} s{stride}");
            }
            let (w, b) = (t(&[32], 7), t(&[32], 8));
            let gn = NormWeights::group_norm(engine, w.clone(), b.clone()).unwrap();
            let want =
                reference::group_norm(&f32(&img), &f32(&w), &f32(&b), 8, 1e-6, true).unwrap();
            let got = group_norm(&img, &gn, 8, 1e-6, true).unwrap();
            assert!(rel(&got, &want) < tol, "{case} group norm");
            let (w, b) = (t(&[64], 9), t(&[64], 10));
            let ln = NormWeights::layer_norm(engine, w.clone(), b.clone()).unwrap();
            let want = reference::layer_norm(&f32(&x), &f32(&w), &f32(&b), 1e-5).unwrap();
            let got = layer_norm(&x, &ln, 1e-5).unwrap();
            assert!(rel(&got, &want) < tol, "{case} layer norm");
            let tokens = to_tokens(engine, &img).unwrap();
            assert_eq!(
                rel(&tokens, &reference::to_tokens(&img).unwrap()),
                0.0,
                "{case} to_tokens"
            );
            let back = to_image_add(engine, &tokens, &img).unwrap();
            assert!(
                rel(&back, &(f32(&img) * 2.0).unwrap()) < tol,
                "{case} to_image_add"
            );
        }
    }
}

/// Each prepared weight names the kernel its engine and type call for, so that `forward`
/// needs nothing else to choose.
#[test]
fn prepared_weights_name_their_kernel() {
    let bf16 = |shape: &[usize]| rand(shape, 1);
    let g1 = ConvGeometry {
        stride: 1,
        padding: 1,
    };
    let g2 = ConvGeometry {
        stride: 2,
        padding: 1,
    };
    let conv = |engine, w: Tensor, g| {
        let b = bf16(&[w.dim(0).unwrap()]);
        ConvWeights::prepare(engine, w, b, g).unwrap().weight
    };
    for kernel in bf16_kernels() {
        let e = cpu(Some(kernel));
        let lin = LinearWeights::prepare(e, bf16(&[40, 64]), None).unwrap();
        assert!(
            matches!(lin.weight, LinearWeight::Bf16Panels { kernel: k, out: 40, .. } if k == kernel)
        );
        // input features not a multiple of 32: widened to the f32 kernel
        let lin = LinearWeights::prepare(e, bf16(&[40, 40]), None).unwrap();
        assert!(matches!(lin.weight, LinearWeight::CpuF32(_)));
        let gg = LinearWeights::prepare_geglu(e, bf16(&[64, 64]), None).unwrap();
        assert!(gg.geglu_fused());
        let w = conv(e, bf16(&[40, 32, 3, 3]), g1);
        match kernel {
            Bf16Kernel::Tiles => assert!(matches!(w, ConvWeight::Bf16Taps { cout: 40, .. })),
            Bf16Kernel::Dot => assert!(matches!(w, ConvWeight::Bf16Winograd { cout: 40, .. })),
        }
        assert!(matches!(
            conv(e, bf16(&[40, 32, 3, 3]), g2),
            ConvWeight::Bf16Im2col { .. }
        ));
        // f32 weights on a bf16 engine: the f32 kernels
        let w = conv(e, f32(&bf16(&[40, 32, 3, 3])), g1);
        assert!(matches!(w, ConvWeight::CpuF32 { .. }));
    }
    let lin = LinearWeights::prepare(cpu(None), bf16(&[40, 64]), None).unwrap();
    assert!(matches!(lin.weight, LinearWeight::CpuF32(_)));
    assert!(
        !LinearWeights::prepare_geglu(cpu(None), bf16(&[64, 64]), None)
            .unwrap()
            .geglu_fused()
    );
    let lin = LinearWeights::prepare(Engine::Reference, bf16(&[40, 64]), None).unwrap();
    assert!(matches!(lin.weight, LinearWeight::Reference(_)));
    assert!(matches!(
        conv(Engine::Reference, bf16(&[40, 32, 3, 3]), g1),
        ConvWeight::Reference(_)
    ));
}

/// The CUDA engine against the reference on a GPU (`cargo test --features cuda`; these fail
/// without one): each kernel on the same inputs as candle's composition in f32.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("the CUDA engine's tests need a CUDA GPU")
    }

    /// `rand`'s values (exact in bf16 and f16) on the GPU in `dtype`.
    fn on_gpu(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        rand(shape, seed)
            .to_device(&gpu())
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The bound for a result rounded to `dtype` once or twice from f32 arithmetic.
    fn bound(dtype: DType) -> f32 {
        match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 1.0 / 512.0,
            _ => 1.0 / 128.0,
        }
    }

    #[test]
    fn cuda_attention_matches_the_reference() {
        // (b, heads, tq, tk, d): SD 1.5's three head widths at its token counts (64x64 latents
        // with 8 heads of 40, the prompt's 77 keys), SD 2's and SDXL's 64, widths padded to
        // the fragment (8, 100), query and key counts off the 64-row tiles
        for dtype in [DType::F16, DType::BF16] {
            for &(b, h, tq, tk, d) in &[
                (2usize, 8usize, 4096usize, 4096usize, 40usize),
                (2, 8, 1024, 77, 80),
                (2, 8, 256, 256, 160),
                (2, 5, 300, 77, 64),
                (1, 3, 33, 100, 8),
                (1, 2, 65, 129, 100),
            ] {
                // scores spread wider than +-0.5 inputs give: q times 8 (exact)
                let q = (on_gpu(&[b, tq, h * d], 7, dtype) * 8.0).unwrap();
                let k = on_gpu(&[b, tk, h * d], 8, dtype);
                let v = on_gpu(&[b, tk, h * d], 9, dtype);
                let want = attention(Engine::Reference, f32(&q), f32(&k), f32(&v), h).unwrap();
                let got = attention(Engine::Cuda, q, k, v, h).unwrap();
                assert_eq!((got.dtype(), got.dims()), (dtype, want.dims()));
                let r = rel(&got, &want);
                assert!(
                    r < bound(dtype),
                    "{dtype:?} ({b}, {h}, {tq}, {tk}, {d}): {r}"
                );
            }
        }
    }

    #[test]
    fn cuda_group_norm_matches_the_reference() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // SD's widest GroupNorm at 64x64 latents, an odd pixel count, one group per channel
            for &(b, c, hh, ww, groups) in &[
                (2usize, 320usize, 64usize, 64usize, 32usize),
                (1, 64, 7, 9, 8),
                (2, 16, 5, 5, 16),
            ] {
                for silu in [false, true] {
                    let x = on_gpu(&[b, c, hh, ww], 3, dtype).affine(4.0, 1.0).unwrap();
                    let w = on_gpu(&[c], 4, dtype);
                    let bias = on_gpu(&[c], 5, dtype);
                    let want =
                        reference::group_norm(&f32(&x), &f32(&w), &f32(&bias), groups, 1e-6, silu)
                            .unwrap();
                    let gn = NormWeights::group_norm(Engine::Cuda, w, bias).unwrap();
                    let got = group_norm(&x, &gn, groups, 1e-6, silu).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let r = rel(&got, &want);
                    assert!(
                        r < bound(dtype),
                        "{dtype:?} ({b}, {c}, {hh}, {ww}) / {groups}, silu {silu}: {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn cudnn_conv2d_matches_the_reference() {
        // SD's 3x3 (padding 1), its stride-2 downsampler, a 1x1 skip; f32 in full f32 (no TF32)
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for &(b, cin, cout, hw, k, stride, padding) in &[
                (2usize, 320usize, 320usize, 64usize, 3usize, 1usize, 1usize),
                (2, 64, 32, 17, 3, 2, 1),
                (1, 48, 96, 9, 1, 1, 0),
            ] {
                let x = on_gpu(&[b, cin, hw, hw], 21, dtype);
                let w = on_gpu(&[cout, cin, k, k], 22, dtype);
                let want = reference::conv2d(
                    &f32(&x),
                    &f32(&w),
                    &f32(&on_gpu(&[cout], 23, dtype)),
                    ConvGeometry { stride, padding },
                )
                .unwrap();
                // cuDNN's heuristic algorithm, and the fastest of all when they are timed
                for timed in [false, true] {
                    let got = crate::cuda::conv2d_with(&x, &w, padding, stride, timed)
                        .unwrap()
                        .broadcast_add(&on_gpu(&[cout], 23, dtype).reshape((1, (), 1, 1)).unwrap())
                        .unwrap();
                    assert_eq!((got.dtype(), got.dims()), (dtype, want.dims()));
                    let r = rel(&got, &want);
                    // f32: cuDNN may pick Winograd or FFT, a few ulps more than a plain sum
                    let tol = if dtype == DType::F32 {
                        1e-4
                    } else {
                        2.0 * bound(dtype)
                    };
                    assert!(
                        r < tol,
                        "{dtype:?} ({b}, {cin}->{cout}, {hw}, {k}x{k} / {stride}), timed {timed}: {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn cuda_geglu_matches_the_reference() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let x = on_gpu(&[2, 77, 64], 11, dtype);
            let w = on_gpu(&[2 * 96, 64], 12, dtype);
            let bias = on_gpu(&[2 * 96], 13, dtype);
            let want = reference::geglu(
                &reference::linear(&f32(&x), &f32(&w), Some(&f32(&bias))).unwrap(),
            )
            .unwrap();
            let prepared = LinearWeights::prepare_geglu(Engine::Cuda, w, Some(bias)).unwrap();
            assert!(matches!(prepared.weight, LinearWeight::CudaGeglu(_)));
            let got = geglu(&x, &prepared).unwrap();
            assert_eq!((got.dtype(), got.dims()), (dtype, &[2usize, 77, 96][..]));
            // the projection's product rounds to the type too
            let r = rel(&got, &want);
            assert!(r < 2.0 * bound(dtype), "{dtype:?}: {r}");
        }
    }
}
