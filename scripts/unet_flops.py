#!/usr/bin/env python3
"""The multiply-add work of one U-Net call, counted by torch's FlopCounterMode on the meta
device (no weights, no time): the products of the linear layers, the convolutions (and of
those the 3x3 stride-1 ones, which sdgen's bf16 dot-product engine runs as Winograd F(2x2,
3x3) with 2.25x fewer products), and the attention's two batched products. With a measured
peak rate (`cargo bench --bench bf16_peak`) this gives the least time a step can take.

    python3 scripts/unet_flops.py /work/bench/sdxl-random/unet --size 1024 --batch 2

Prints one JSON object, in TFLOP (2 flops per multiply-add, as torch counts)."""
import argparse
import json

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("unet", help="a diffusers unet folder (its config.json is read)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (latents are 1/8)")
    ap.add_argument("--batch", type=int, default=2, help="rows per call (2: one image with CFG)")
    args = ap.parse_args()
    cfg = UNet2DConditionModel.load_config(args.unet)
    side = args.size // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        x = torch.randn(args.batch, cfg["in_channels"], side, side)
        t = torch.full((args.batch,), 500.0)
        ctx = torch.randn(args.batch, 77, cfg["cross_attention_dim"])
        kwargs = {}
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(args.batch, pooled),
                                           "time_ids": torch.randn(args.batch, 6)}
        conv3 = [0]

        def hook(m, _inputs, out):
            if m.kernel_size == (3, 3) and m.stride == (1, 1):
                conv3[0] += 2 * out.numel() * m.in_channels // m.groups * 9

        for m in unet.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(hook)
        counter = FlopCounterMode(display=False)
        with counter:
            unet(x, t, ctx, **kwargs)
    ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    linear = ops.get("aten.addmm", 0) + ops.get("aten.mm", 0)
    conv = ops.get("aten.convolution", 0)
    attention = ops.get("aten.bmm", 0) + ops.get("aten._scaled_dot_product_flash_attention_for_cpu", 0)
    winograd = conv - conv3[0] + conv3[0] / 2.25
    t = 1e12
    print(json.dumps({
        "size": args.size, "batch": args.batch, "total_tflop": counter.get_total_flops() / t,
        "linear_tflop": linear / t, "conv_tflop": conv / t, "conv3x3_stride1_tflop": conv3[0] / t,
        "attention_tflop": attention / t, "products_with_winograd_tflop": (linear + attention + winograd) / t,
    }))


if __name__ == "__main__":
    main()
