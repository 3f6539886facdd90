#!/usr/bin/env python3
"""The diffusers side of scripts/bench.sh: the same measurements as benches/pipeline.rs.

    python scripts/bench_diffusers.py MODEL_DIR [--threads N] [--dtype f32|bf16|f16] [--device cpu|cuda]
    python scripts/bench_diffusers.py MODEL_DIR --whole N --device cuda --dtype f16

An SDXL model (model_index.json says StableDiffusionXLPipeline) is timed at 1024x1024 as
benches/pipeline.rs times it: both text encoders, a U-Net step with CFG and the added
conditioning, a VAE decode, a whole 2-step generation; everything in the one type.

`--whole N` times one 50-step 512x512 call of the pipeline (PNDM, CFG) making N images in one
batch, after a 2-step warm-up of the same batch, for scripts/gpu-check.sh's batch part.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from diffusers import StableDiffusionPipeline


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(runs, f, device="cpu"):
    f()
    sync(device)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def generate(args, dtype):
    # the whole pipeline in the one type, as `sdgen --dtype` runs it (a bf16 U-Net fed by an
    # f32 text encoder stops with a dtype mismatch)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe("bench", num_inference_steps=2, height=512, width=512, generator=torch.Generator().manual_seed(1))


def whole(args, dtype):
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    n = args.whole

    def run(steps):
        pipe("a cat on a beach", num_inference_steps=steps, height=512, width=512,
             num_images_per_prompt=n, generator=torch.Generator().manual_seed(1))
        sync(args.device)

    run(2)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run(50)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_reserved() / 2**20 if args.device.startswith("cuda") else None
    print(json.dumps({"impl": "diffusers", "dtype": args.dtype, "device": args.device, "images": n,
                      "steps": 50, "seconds": seconds, "torch_max_reserved_mb": peak}))


def is_sdxl(model):
    with open(os.path.join(model, "model_index.json")) as f:
        return json.load(f)["_class_name"] == "StableDiffusionXLPipeline"


def load_xl(args, dtype):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype, add_watermarker=False).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_xl(args, dtype):
    load_xl(args, dtype)("bench", num_inference_steps=2, height=1024, width=1024,
                         generator=torch.Generator().manual_seed(1))


def bench_xl(args, dtype, wall, rss):
    dev = args.device
    t = time.perf_counter()
    pipe = load_xl(args, dtype)
    sync(dev)
    load = time.perf_counter() - t
    with torch.inference_mode():
        text = timed(3, lambda: pipe.encode_prompt("a photo of a cat on a beach", device=dev,
                                                   do_classifier_free_guidance=True), dev)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, dtype=dtype, device=dev)
        cond = pipe.unet.config
        pooled = cond.projection_class_embeddings_input_dim - 6 * cond.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, dtype=dtype, device=dev),
                 "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, dtype=dtype, device=dev)}
        x = torch.randn(2, 4, 128, 128, dtype=dtype, device=dev)
        unet = timed(1, lambda: pipe.unet(x, torch.tensor(500, device=dev), encoder_hidden_states=ctx,
                                          added_cond_kwargs=added), dev)
        lat = torch.randn(1, 4, 128, 128, dtype=dtype, device=dev)
        vae = timed(1, lambda: pipe.vae.decode(lat), dev)
    print(json.dumps({
        "impl": "diffusers",
        "family": "sdxl",
        "dtype": args.dtype,
        "device": dev,
        "threads": args.threads,
        "load_s": load,
        "text_encoder_s": text,
        "unet_step_1024_s": unet,
        "vae_decode_1024_s": vae,
        "generation_1024_2steps_s": wall,
        "peak_rss_mb": rss,
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--whole", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.dtype, torch.float32)
    dev = args.device
    xl = is_sdxl(args.model)
    if args.generate_only:
        (generate_xl if xl else generate)(args, dtype)
        return
    if args.whole:
        whole(args, dtype)
        return
    # the whole generation first, while this process is small: Linux carries the parent's RSS
    # at the fork into the child's peak (ru_maxrss)
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, args.model, "--threads", str(args.threads), "--dtype", args.dtype, "--device", dev, "--generate-only"], check=True)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    if xl:
        bench_xl(args, dtype, wall, rss)
        return
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None)
    pipe.unet.to(dtype)
    pipe.to(dev)
    sync(dev)
    load = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ids = pipe.tokenizer("a photo of a cat on a beach", padding="max_length", max_length=77, return_tensors="pt").input_ids.to(dev)
        text = timed(3, lambda: pipe.text_encoder(ids), dev)
        ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, dtype=dtype, device=dev)
        more = 1 if dev == "cpu" else 10

        def unet(size, runs):
            x = torch.randn(2, 4, size // 8, size // 8, dtype=dtype, device=dev)
            return timed(runs, lambda: pipe.unet(x, torch.tensor(500, device=dev), encoder_hidden_states=ctx), dev)

        u256 = unet(256, 3 * more)
        u512 = unet(512, 2 * more)
        lat = torch.randn(1, 4, 64, 64, device=dev)
        vae = timed(more, lambda: pipe.vae.decode(lat), dev)
    print(json.dumps({
        "impl": "diffusers",
        "dtype": args.dtype,
        "device": dev,
        "threads": args.threads,
        "load_s": load,
        "text_encoder_s": text,
        "unet_step_256_s": u256,
        "unet_step_512_s": u512,
        "vae_decode_512_s": vae,
        "generation_512_2steps_s": wall,
        "peak_rss_mb": rss,
    }))


if __name__ == "__main__":
    main()
