use candle_core::{DType, Device, Module, Tensor};
use std::time::Instant;
fn t<F: FnMut()>(name: &str, mut f: F) {
    f();
    let s = Instant::now();
    for _ in 0..3 {
        f();
    }
    println!(
        "{name:30} {:8.1} ms",
        s.elapsed().as_secs_f64() * 1000.0 / 3.0
    );
}
fn main() {
    let dev = Device::Cpu;
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &dev);
    let x = Tensor::randn(0f32, 1.0, (2, 320, 64, 64), &dev).unwrap();
    let conv = candle_nn::conv2d(
        320,
        320,
        3,
        candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("c"),
    )
    .unwrap();
    let conv1 = candle_nn::conv2d(320, 320, 1, Default::default(), vb.pp("c1")).unwrap();
    let gn = candle_nn::group_norm(32, 320, 1e-5, vb.pp("g")).unwrap();
    let w = Tensor::randn(0f32, 1.0, (320, 320, 3, 3), &dev).unwrap();
    t("conv3x3 320 64x64 b2", || {
        conv.forward(&x).unwrap();
    });
    t("conv1x1 320 64x64 b2", || {
        conv1.forward(&x).unwrap();
    });
    t("raw conv2d", || {
        x.conv2d(&w, 1, 1, 1, 1).unwrap();
    });
    let bias = Tensor::zeros(320, DType::F32, &dev).unwrap();
    let g = sdgen::kernels::ConvGeometry {
        stride: 1,
        padding: 1,
    };
    t("sdgen conv2d 3x3", || {
        sdgen::kernels::conv2d(&x, &w, &bias, g).unwrap();
    });
    let a = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    let b2 = sdgen::kernels::conv2d(&x, &w, &bias, g).unwrap();
    println!(
        "max diff {}",
        (a - b2).unwrap().abs().unwrap().max_all().unwrap()
    );
    t("group_norm 32", || {
        gn.forward(&x).unwrap();
    });
    let gw = Tensor::randn(0f32, 1.0, 320, &dev).unwrap();
    let gb = Tensor::randn(0f32, 1.0, 320, &dev).unwrap();
    let gn2 = candle_nn::GroupNorm::new(gw.clone(), gb.clone(), 320, 32, 1e-5).unwrap();
    t("sdgen group_norm+silu", || {
        sdgen::kernels::group_norm(&x, 32, &gw, &gb, 1e-5, true).unwrap();
    });
    let a = candle_nn::ops::silu(&gn2.forward(&x).unwrap()).unwrap();
    let b2 = sdgen::kernels::group_norm(&x, 32, &gw, &gb, 1e-5, true).unwrap();
    println!(
        "gn max diff {}",
        (a - b2).unwrap().abs().unwrap().max_all().unwrap()
    );
    t("silu", || {
        candle_nn::ops::silu(&x).unwrap();
    });
    t("add", || {
        (&x + &x).unwrap();
    });
    t("permute+contig", || {
        x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    });
    let y = Tensor::randn(0f32, 1.0, (2, 4096, 320), &dev).unwrap();
    let ln = candle_nn::layer_norm(320, 1e-5, vb.pp("l")).unwrap();
    let lin = candle_nn::linear(320, 320, vb.pp("lin")).unwrap();
    let lin2 = candle_nn::linear(320, 2560, vb.pp("lin2")).unwrap();
    t("layer_norm", || {
        ln.forward(&y).unwrap();
    });
    t("linear 320->320", || {
        lin.forward(&y).unwrap();
    });
    t("linear 320->2560", || {
        lin2.forward(&y).unwrap();
    });
    let z = Tensor::randn(0f32, 1.0, (2, 4096, 1280), &dev).unwrap();
    t("gelu_erf 2x4096x1280", || {
        z.gelu_erf().unwrap();
    });
    let q = Tensor::randn(0f32, 1.0, (2, 8, 4096, 40), &dev).unwrap();
    t("fused attention 4096", || {
        sdgen::kernels::fused_attention(&q, &q, &q).unwrap();
    });
    let _ = DType::F32;
}
