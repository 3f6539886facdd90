#!/usr/bin/env python3
"""Builds the tiny random-weight Stable Diffusion models and records diffusers' outputs.

Everything the Rust parity tests compare against comes from here:

  tests/fixtures/models/tiny     SD 1.x-shaped: PNDM config as on the Hub (no timestep_spacing),
                                 quick_gelu text encoder, conv projections, attention_head_dim int,
                                 2-block VAE (scale factor 2)
  tests/fixtures/models/tiny2    SD 2.x-shaped: DDIM v-prediction ('leading', as diffusers writes it),
                                 gelu text encoder, pad token '!', linear projections,
                                 attention_head_dim list, 4-block VAE (factor 8), scaling 0.13025
  tests/fixtures/single_file/    tiny/tiny2 in the original LDM single-file naming (.safetensors,
                                 .ckpt), checked with diffusers' from_single_file; evil.ckpt
  tests/fixtures/reference/      torch randn draws, scheduler traces, token ids, text-encoder,
                                 U-Net and VAE outputs, and end-to-end images for every scheduler

Weights are saved in float16 (to keep the repository small) and every reference is computed by
loading the saved folders back in float32 with diffusers, exactly as a user would.

Usage (versions pinned in scripts/requirements.txt):
    python -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_fixtures.py [--out tests/fixtures]

`--full-size DIR` instead writes a full-size random-weight SD 1.5 (for benchmarks; never commit it).
"""

import argparse
import inspect
import gzip
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# The `--scheduler` names and the diffusers classes (with from_config overrides) they stand for.
SCHEDULERS = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {}),
    # its Brownian tree seeded as sdgen seeds it: with the image's seed (the traces' generator
    # seed is 7; images get theirs in record_sde_images)
    "dpmpp_sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": 7}),
    "deis": (DEISMultistepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

# The scheduler_config.json of stable-diffusion-v1-5 as first written (diffusers 0.6.0): no
# timestep_spacing key, so every class takes its own default.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(dirname, pad_token):
    """vocab.json + merges.txt derived from OpenAI's bpe_simple_vocab_16e6.txt.gz (PyPI openai-clip),
    as the Hub's CLIP tokenizers are, plus the two small JSON files SD repos ship."""
    import importlib.util

    spec = importlib.util.find_spec("clip")
    bpe = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(dirname, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")
    special = {
        "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": pad_token,
        "unk_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    with open(os.path.join(dirname, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = {
        "add_prefix_space": False,
        "bos_token": special["bos_token"],
        "do_lower_case": True,
        "eos_token": special["eos_token"],
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special["unk_token"],
    }
    with open(os.path.join(dirname, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


MODELS = {
    "tiny": dict(
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        vae=dict(
            block_out_channels=(16, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=32,
        ),
        text=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu"),
        scheduler=SD15_SCHEDULER,
        pad="<|endoftext|>",
    ),
    "tiny2": dict(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 24, 24),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=[2, 4, 4],
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=8,
        ),
        vae=dict(
            block_out_channels=(16, 16, 32, 32),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
            scaling_factor=0.13025,
        ),
        text=dict(hidden_size=8, intermediate_size=29, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
        scheduler=SD21_SCHEDULER,
        pad="!",
    ),
}


def build_model(name, spec, out_dir):
    torch.manual_seed({"tiny": 1, "tiny2": 2}[name])
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            layer_norm_eps=1e-5,
            projection_dim=spec["text"]["hidden_size"],
            **spec["text"],
        )
    )
    # Random weights with a little more spread than the default init, so that every layer
    # matters in the outputs; stored in float16.
    with torch.no_grad():
        for module in (unet, vae, text):
            for p in module.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn_like(p) * 0.02)
    tok_dir = os.path.join(out_dir, "_tokenizer_tmp")
    write_clip_tokenizer(tok_dir, spec["pad"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[spec["scheduler"]["_class_name"]]
    scheduler = scheduler_cls.from_config({k: v for k, v in spec["scheduler"].items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model_dir = os.path.join(out_dir, "models", name)
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # The Hub's SD repos carry vocab.json + merges.txt (no tokenizer.json), and the original
    # scheduler_config.json as the model's authors wrote it.
    shutil.rmtree(os.path.join(model_dir, "tokenizer"))
    write_clip_tokenizer(os.path.join(model_dir, "tokenizer"), spec["pad"])
    shutil.rmtree(tok_dir)
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(spec["scheduler"], f, indent=2)
    return model_dir


def load_pipe(model_dir):
    return StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, safety_checker=None)


PROMPTS = [
    "a photo of a cat on a beach",
    "A Photo Of A CAT",
    "",
    " ",
    "hello world",
    "a    lot   of\tspaces\n and newlines",
    "astronaut riding a horse, digital art, trending on artstation",
    "Café crème brûlée à la mode",
    "naïve résumé façade",
    "Zürich Straße",
    "東京の夜景",
    "猫が好きです",
    "한국어 문장입니다",
    "Привет, мир!",
    "Ελληνικά γράμματα",
    "emoji 😀🐱🚀 party",
    "🎉🎉🎉",
    "numbers 1234567890 and 3.14159",
    "2024-01-01 at 12:30pm",
    "punctuation!!! ??? ... ,,, ;;;",
    "(masterpiece:1.2), best quality, ((detailed))",
    "[[[brackets]]] {{{braces}}} <<<angles>>>",
    "it's a dog's life, they're here, we've gone, I'm ok, you'll see, he'd go",
    "IT'S LOUD",
    "a--b__c~~d",
    "user@example.com http://example.com/path?x=1",
    "#hashtag @mention $dollar %percent ^caret &amp *star",
    "tab\tseparated\tvalues",
    "mixed日本English한국",
    "a" * 100,
    "word " * 100,
    "a very long prompt " * 20,
    "oil painting of a lighthouse at dusk, by greg rutkowski, highly detailed, 8k",
    "portrait of a woman, 85mm, f/1.8, bokeh",
    "low poly 3d render of a fox",
    "pixel art castle",
    "<|startoftext|> inside text",
    "text with <|endoftext|> inside",
    "ends with endoftext<|endoftext|>",
    "ALL CAPS SHOUTING PROMPT",
    "MiXeD cAsE",
    "hyphen-ated words and under_scores",
    "quotes \"double\" and 'single'",
    "back\\slash and /forward/slash",
    "a!b!c!",
    "!!!",
    "wow! amazing!",
    "tilde ~ and backtick `",
    "ſ long s and ß sharp s",
    "ﬁ ligature ﬂ",
    "Ωmega and µ micro",
    "x",
    "12",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism is long",
]


def tensor_dict_to_contig(d):
    return {k: v.detach().to(torch.float32).contiguous() for k, v in d.items()}


def record_randn(ref_dir):
    out = {}
    for seed in [0, 1, 42, 1234, 2**32 + 7]:
        shapes = [(1,), (3,), (15,), (16,), (17,), (31,), (2, 3), (4, 8, 8), (1, 4, 16, 16)]
        if seed in (0, 42):
            shapes.append((1, 4, 65, 65))  # 16900 elements: the recomputed tail of 16
        for shape in shapes:
            g = torch.Generator("cpu").manual_seed(seed)
            key = f"seed{seed}_" + "x".join(map(str, shape))
            out[key] = torch.randn(shape, generator=g)
        # successive draws from one generator: small (double path, caches a normal), then large
        g = torch.Generator("cpu").manual_seed(seed)
        a = torch.randn((3,), generator=g)
        b = torch.randn((5,), generator=g)
        c = torch.randn((40,), generator=g)
        out[f"seq{seed}"] = torch.cat([a, b, c])
    save_file(out, os.path.join(ref_dir, "randn.safetensors"))


# ---- torch's CUDA generator, written here from the algorithm (no GPU on the machines) ----
#
# torch.randn(..., generator=torch.Generator("cuda").manual_seed(seed), device="cuda"):
# blocks of 256 threads (at most SMs x 2048 / 256 of them: 132 SMs, the H100/H200, for
# tensors past one pass), thread idx = curand_init(seed, subsequence idx, offset), each
# curand_normal4 call = Philox4x32-10 of the counter (offset / 4 + call, idx) -> Box-Muller on
# word pairs (sin, cos); call j of thread idx fills elements idx + stride * (4j + k); the
# offset then advances by 4 per call per thread. Box-Muller's uniforms in float32 as curand
# has them, its log, sqrt, sin and cos in float64 (the GPU's are fast approximations), so
# sdgen's float32 is checked to ~1e-6, not bit for bit.

CUDA_SMS = 132


class CudaRandn:
    def __init__(self, seed):
        self.seed = seed
        self.offset = 0

    @staticmethod
    def philox(c0, c1, c2, c3, k0, k1):
        mask = np.uint64(0xFFFFFFFF)
        c0, c1, c2, c3 = (np.asarray(x, dtype=np.uint64) for x in (c0, c1, c2, c3))
        k0, k1 = np.uint64(k0), np.uint64(k1)
        for r in range(10):
            if r:
                k0 = (k0 + np.uint64(0x9E3779B9)) & mask
                k1 = (k1 + np.uint64(0xBB67AE85)) & mask
            p0 = c0 * np.uint64(0xD2511F53)
            p1 = c2 * np.uint64(0xCD9E8D57)
            c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        return c0, c1, c2, c3

    @staticmethod
    def box_muller(x, y):
        # u and v are float32 on the GPU (the words converted to float, then one fused
        # multiply-add: computed exactly here and rounded once); log, sqrt, sin, cos in float64
        inv = np.float64(np.float32(2.3283064e-10))
        inv_2pi = np.float64(np.float32(2.3283064e-10) * np.float32(6.2831855))
        u = (x.astype(np.float32).astype(np.float64) * inv + inv / 2).astype(np.float32).astype(np.float64)
        v = (y.astype(np.float32).astype(np.float64) * inv_2pi + inv_2pi / 2).astype(np.float32).astype(np.float64)
        s = np.sqrt(-2.0 * np.log(u))
        return s * np.sin(v), s * np.cos(v)

    def randn(self, n):
        if n == 0:
            return np.zeros(0)
        blocks = min(-(-n // 256), CUDA_SMS * 2048 // 256)
        stride = 256 * blocks
        calls = (n - 1) // (stride * 4) + 1
        out = np.zeros(n)
        idx = np.arange(stride, dtype=np.uint64)
        for j in range(calls):
            low = self.offset // 4 + j
            words = self.philox(np.uint64(low & 0xFFFFFFFF), np.uint64(low >> 32), idx & np.uint64(0xFFFFFFFF), idx >> np.uint64(32),
                                self.seed & 0xFFFFFFFF, self.seed >> 32)
            a, b = self.box_muller(words[0], words[1])
            c, d = self.box_muller(words[2], words[3])
            for k, vals in enumerate((a, b, c, d)):
                at = idx.astype(np.int64) + stride * (4 * j + k)
                keep = at < n
                out[at[keep]] = vals[keep]
        self.offset += calls * 4
        return out


# (seed, successive draw sizes); draws past SAMPLE_ABOVE elements are stored at every 997th
# element and the last 5
CUDA_RANDN_CASES = [(42, [16384, 16384, 7]), (0, [1, 3, 16]), (2**32 + 5, [1000]), (2**64 - 1, [65536]),
                    (7, [300000, 1081345, 10])]
SAMPLE_ABOVE = 20000


def record_randn_cuda(ref_dir):
    out = {}
    for seed, sizes in CUDA_RANDN_CASES:
        g = CudaRandn(seed)
        for k, n in enumerate(sizes):
            v = g.randn(n)
            key = f"seed{seed}_draw{k}_n{n}"
            if n > SAMPLE_ABOVE:
                idx = np.unique(np.concatenate([np.arange(0, n, 997), np.arange(n - 5, n)]))
                out[key + "_idx"] = torch.tensor(idx, dtype=torch.int64)
                v = v[idx]
            out[key] = torch.tensor(v, dtype=torch.float32)
    save_file(out, os.path.join(ref_dir, "randn_cuda.safetensors"))


def cuda_rng_image(pipe, scheduler, path):
    """The pipeline's seed-42 image (e2e prompts, E2E_STEPS) with torch's CUDA generator in
    place of the CPU one: diffusers' randn_tensor (latents, ancestral noise) draws from
    CudaRandn(42) instead."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as sd_module
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_module

    cls, extra = SCHEDULERS[scheduler]
    pipe.scheduler = cls.from_config(dict(pipe.scheduler.config), **extra)
    gen = CudaRandn(42)

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        n = int(np.prod(shape))
        return torch.tensor(gen.randn(n), dtype=torch.float32).reshape(shape).to(dtype or torch.float32)

    saved = (sd_module.randn_tensor, ea_module.randn_tensor)
    sd_module.randn_tensor = ea_module.randn_tensor = randn_tensor
    try:
        save_seed42_image(pipe, path, prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE)
    finally:
        sd_module.randn_tensor, ea_module.randn_tensor = saved


def record_vae_encoder(name, model_dir, ref_dir):
    """vae.encode on a random image in [-1, 1] at the model's default size: the latent
    distribution's mean and std, and latent_dist.sample(generator=manual_seed(5))."""
    pipe = load_pipe(model_dir)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(9)
    with torch.no_grad():
        x = torch.rand((2, 3, size, size), generator=g) * 2 - 1
        dist = pipe.vae.encode(x).latent_dist
        sample = dist.sample(generator=torch.Generator("cpu").manual_seed(5))
    save_file(tensor_dict_to_contig({"image": x, "mean": dist.mean, "std": dist.std, "sample_seed5": sample}),
              os.path.join(ref_dir, name, "vae_encoder.safetensors"))


# ---- image to image: StableDiffusionImg2ImgPipeline from a committed picture ----

IMG2IMG_CASES = [("tiny", name, 0.6) for name in SCHEDULERS] + [
    ("tiny", "euler_a", 0.3),
    ("tiny", "pndm", 0.3),
    ("tiny", "dpmpp_2m", 1.0),
    ("tiny", "heun", 0.5),
    ("tiny2", "ddim", 0.6),
    ("tiny2", "euler_a", 0.6),
]


def img2img_picture(path, size, seed):
    """A smooth picture with a few shapes, deterministic, as an 8-bit PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    Image.fromarray((img * 255).round().astype("uint8")).save(path)


def record_img2img(out):
    """diffusers' img2img image for each case (seed 42, the e2e prompts, E2E_STEPS, guidance
    7.5) from the committed pictures img2img/{model}.png, at their own size."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pics = os.path.join(out, "img2img")
    os.makedirs(pics, exist_ok=True)
    ref = os.path.join(out, "reference", "img2img")
    os.makedirs(ref, exist_ok=True)
    for model, size in (("tiny", 32), ("tiny2", 64)):
        img2img_picture(os.path.join(pics, f"{model}.png"), size, {"tiny": 3, "tiny2": 4}[model])
    cases = []
    for model, name, strength in IMG2IMG_CASES:
        base = load_pipe(os.path.join(out, "models", model))
        pipe = StableDiffusionImg2ImgPipeline(**base.components, requires_safety_checker=False)
        cls, extra = SCHEDULERS[name]
        if name == "dpmpp_sde":
            extra = {"noise_sampler_seed": 42}
        pipe.scheduler = cls.from_config(dict(base.scheduler.config), **extra)
        png = f"{model}-{name}-{strength}.png"
        save_seed42_image(pipe, os.path.join(ref, png), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                          image=Image.open(os.path.join(pics, f"{model}.png")), strength=strength)
        cases.append({"model": model, "scheduler": name, "strength": strength, "png": png})
    # a picture whose sides are no multiple of the VAE factor: diffusers resizes it (PIL's
    # Lanczos) to 44x36
    img2img_picture(os.path.join(pics, "odd.png"), 45, 5)
    Image.open(os.path.join(pics, "odd.png")).resize((45, 37)).save(os.path.join(pics, "odd.png"))
    Image.open(os.path.join(pics, "odd.png")).resize((44, 36), resample=Image.LANCZOS).save(os.path.join(ref, "odd-pil-44x36.png"))
    Image.open(os.path.join(pics, "odd.png")).resize((64, 80), resample=Image.LANCZOS).save(os.path.join(ref, "odd-pil-64x80.png"))
    pipe = StableDiffusionImg2ImgPipeline(**load_pipe(os.path.join(out, "models", "tiny")).components, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config))
    save_seed42_image(pipe, os.path.join(ref, "tiny-odd-euler-0.6.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                      image=Image.open(os.path.join(pics, "odd.png")), strength=0.6)
    with open(os.path.join(ref, "cases.json"), "w") as f:
        json.dump({"prompt": E2E_PROMPT, "negative_prompt": E2E_NEGATIVE, "steps": E2E_STEPS, "seed": 42, "cases": cases}, f, indent=1)


# ---- inpainting: StableDiffusionInpaintPipeline with a 9-channel U-Net, and on tiny ----

INPAINT_CASES = [
    ("tiny_inpaint", "euler_a", 1.0),
    ("tiny_inpaint", "pndm", 1.0),
    ("tiny_inpaint", "ddim", 0.75),
    ("tiny", "euler", 1.0),
    ("tiny", "euler_a", 0.6),
    ("tiny", "dpmpp_2m", 1.0),
    ("tiny", "heun", 0.8),
]


def random_unet(unet_dir, config, seed):
    """A U-Net of `config` with random weights (diffusers' initialisation, every matrix and
    kernel moved by N(0, 0.02)) saved in f16 to unet_dir, unless one is there (committed)."""
    if os.path.exists(unet_dir):
        return
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * 0.02)
    unet.half().save_pretrained(unet_dir, safe_serialization=True)


def with_unet(model_dir, unet_dir, dest, index_edits):
    """A copy of model_dir at dest with the U-Net of unet_dir and model_index.json edited: how
    the fixtures compose variants from a committed U-Net (the Rust tests do the same)."""
    shutil.copytree(model_dir, dest)
    shutil.rmtree(os.path.join(dest, "unet"))
    shutil.copytree(unet_dir, os.path.join(dest, "unet"))
    apply_config_edits(dest, {"model_index.json": index_edits})
    return dest


def tiny_inpaint(out, tmp):
    """tiny with a random 9-channel U-Net (latents, mask, masked-picture latents), its folder
    in tmp; the U-Net is committed as models/tiny_inpaint_unet and the Rust tests compose the
    model the same way."""
    unet_dir = os.path.join(out, "models", "tiny_inpaint_unet")
    random_unet(unet_dir, {**MODELS["tiny"]["unet"], "in_channels": 9}, 6)
    return with_unet(os.path.join(out, "models", "tiny"), unet_dir, os.path.join(tmp, "tiny_inpaint"),
                     {"_class_name": "StableDiffusionInpaintPipeline"})


def record_inpaint(out):
    """diffusers' inpainting images (seed 42, the e2e prompts, E2E_STEPS, guidance 7.5) from
    img2img/tiny.png and the mask img2img/tiny-mask.png (white = repaint)."""
    import tempfile
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pics = os.path.join(out, "img2img")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    mask[2:6, 26:31] = 200  # light gray: repainted (binarized at half)
    mask[26:30, 26:31] = 100  # dark gray: kept
    Image.fromarray(mask).save(os.path.join(pics, "tiny-mask.png"))
    ref = os.path.join(out, "reference", "inpaint")
    os.makedirs(ref, exist_ok=True)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {"tiny": os.path.join(out, "models", "tiny"), "tiny_inpaint": tiny_inpaint(out, tmp)}
        for model, name, strength in INPAINT_CASES:
            base = load_pipe(dirs[model]) if model == "tiny" else StableDiffusionInpaintPipeline.from_pretrained(
                dirs[model], torch_dtype=torch.float32, safety_checker=None)
            pipe = StableDiffusionInpaintPipeline(**{k: v for k, v in base.components.items()}, requires_safety_checker=False)
            cls, extra = SCHEDULERS[name]
            pipe.scheduler = cls.from_config(dict(base.scheduler.config), **extra)
            png = f"{model}-{name}-{strength}.png"
            save_seed42_image(pipe, os.path.join(ref, png), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                              image=Image.open(os.path.join(pics, "tiny.png")),
                              mask_image=Image.open(os.path.join(pics, "tiny-mask.png")), strength=strength)
            cases.append({"model": model, "scheduler": name, "strength": strength, "png": png})
    # the picture pasted back where the mask keeps it, with the mask as given (gray levels blend)
    from diffusers.image_processor import VaeImageProcessor

    overlaid = VaeImageProcessor().apply_overlay(Image.open(os.path.join(pics, "tiny-mask.png")), Image.open(os.path.join(pics, "tiny.png")),
                                                 Image.open(os.path.join(ref, "tiny-euler-1.0.png")))
    overlaid.save(os.path.join(ref, "overlay-tiny-euler-1.0.png"))
    # a 40x40 mask for the 32x32 picture: resized by PIL's Lanczos, then binarized
    Image.open(os.path.join(pics, "tiny-mask.png")).resize((40, 40), resample=Image.NEAREST).save(os.path.join(pics, "tiny-mask-40.png"))
    pipe = StableDiffusionInpaintPipeline(**load_pipe(os.path.join(out, "models", "tiny")).components, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config))
    save_seed42_image(pipe, os.path.join(ref, "mask40-tiny-euler-1.0.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                      image=Image.open(os.path.join(pics, "tiny.png")), mask_image=Image.open(os.path.join(pics, "tiny-mask-40.png")),
                      strength=1.0)
    # --mask-blur 4: the mask blurred by diffusers' mask_processor.blur (PIL's GaussianBlur),
    # binarized by the pipeline, soft in the overlay
    pipe = StableDiffusionInpaintPipeline(**load_pipe(os.path.join(out, "models", "tiny")).components, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config))
    blurred = pipe.mask_processor.blur(Image.open(os.path.join(pics, "tiny-mask.png")), blur_factor=4)
    save_seed42_image(pipe, os.path.join(ref, "blur4-tiny-euler-1.0.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                      image=Image.open(os.path.join(pics, "tiny.png")), mask_image=blurred, strength=1.0)
    VaeImageProcessor().apply_overlay(blurred, Image.open(os.path.join(pics, "tiny.png")),
                                      Image.open(os.path.join(ref, "blur4-tiny-euler-1.0.png"))).save(
        os.path.join(ref, "blur4-overlay-tiny-euler-1.0.png"))
    with open(os.path.join(ref, "cases.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=1)


def record_vae_tiling(out):
    """With pipe.enable_vae_tiling() on tiny (tiles of 32 pixels, 16 latents): a 64x64
    text-to-image (tiled decode) and a 64x64 image-to-image from img2img/tiny2.png (tiled
    encode and decode), seed 42, euler, the e2e prompts."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    ref = os.path.join(out, "reference", "vae_tiling")
    os.makedirs(ref, exist_ok=True)
    pipe = load_pipe(os.path.join(out, "models", "tiny"))
    pipe.scheduler = EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config))
    pipe.vae.enable_tiling()
    save_seed42_image(pipe, os.path.join(ref, "txt2img-64.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                      width=64, height=64)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    save_seed42_image(i2i, os.path.join(ref, "img2img-64.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                      image=Image.open(os.path.join(out, "img2img", "tiny2.png")), strength=0.6)
    # the same two untiled, to show the tiling matters
    pipe.vae.disable_tiling()
    save_seed42_image(pipe, os.path.join(ref, "txt2img-64-untiled.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                      width=64, height=64)


def record_sde_images(out):
    """dpmpp_sde's seed-42 image on tiny, its Brownian tree seeded with the image's seed
    (noise_sampler_seed=42), with and without Karras sigmas."""
    ref = os.path.join(out, "reference", "tiny", "sde")
    os.makedirs(ref, exist_ok=True)
    for name, extra in {"dpmpp_sde": {}, "dpmpp_sde_karras": {"use_karras_sigmas": True}}.items():
        pipe = load_pipe(os.path.join(out, "models", "tiny"))
        pipe.scheduler = DPMSolverSDEScheduler.from_config(dict(pipe.scheduler.config), noise_sampler_seed=42, **extra)
        save_seed42_image(pipe, os.path.join(ref, f"{name}-42.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE)


def record_cuda_rng(out):
    ref = os.path.join(out, "reference")
    record_randn_cuda(ref)
    os.makedirs(os.path.join(ref, "tiny", "rng_cuda"), exist_ok=True)
    for scheduler in ["pndm", "euler_a"]:
        pipe = load_pipe(os.path.join(out, "models", "tiny"))
        cuda_rng_image(pipe, scheduler, os.path.join(ref, "tiny", "rng_cuda", f"{scheduler}.png"))


SCHED_SHAPE = (1, 4, 4, 4)

SCHED_CASES = [
    # (case name, base config, overrides, steps)
    ("sd15", SD15_SCHEDULER, {}, 10),
    ("sd21", SD21_SCHEDULER, {}, 10),
    ("sd15_karras", SD15_SCHEDULER, {"use_karras_sigmas": True}, 10),
    ("sd15_trailing", SD15_SCHEDULER, {"timestep_spacing": "trailing"}, 7),
    ("sd15_prk", {**SD15_SCHEDULER, "skip_prk_steps": False}, {}, 10),
    # third order (DPM++ 3M and its SDE form, DEIS, UniPC), 20 steps so that lower_order_final leaves the
    # third-order update in use (below 15 steps diffusers drops the last two steps' order)
    ("sd15_order3", SD15_SCHEDULER, {"solver_order": 3}, 20),
    ("sd15_order3_short", SD15_SCHEDULER, {"solver_order": 3}, 10),
]

# the schedulers each case applies to (all when absent)
SCHED_CASE_ONLY = {
    "sd15_order3": {"dpmpp_2m", "dpmpp_2m_sde", "deis", "unipc"},
    "sd15_order3_short": {"dpmpp_2m", "dpmpp_2m_sde", "deis", "unipc"},
}


def record_schedulers(ref_dir, only_cases=None, only_names=None):
    """Every case's trace; with only_cases (and only_names), just those, merged into the
    existing files (the other cases stay as recorded: their last bits depend on the
    numpy/scipy of the machine)."""
    tensors = {}
    meta = {}
    if only_cases:
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(ref_dir, "schedulers.safetensors"))
        with open(os.path.join(ref_dir, "schedulers.json")) as f:
            meta = json.load(f)
    for case, base, overrides, steps in SCHED_CASES:
        if only_cases and case not in only_cases:
            continue
        for name, (cls, extra) in SCHEDULERS.items():
            if name not in SCHED_CASE_ONLY.get(case, SCHEDULERS):
                continue
            if only_names and name not in only_names:
                continue
            kwargs = {**extra, **overrides}
            if "use_karras_sigmas" in kwargs and "use_karras_sigmas" not in inspect.signature(cls.__init__).parameters:
                continue
            try:
                s = cls.from_config({k: v for k, v in base.items() if not k.startswith("_")}, **kwargs)
            except Exception as e:  # a class that does not take an option
                print(f"skip {case}/{name}: {e}", file=sys.stderr)
                continue
            s.set_timesteps(steps)
            key = f"{case}/{name}"
            g = torch.Generator("cpu").manual_seed(7)
            sample = torch.randn(SCHED_SHAPE, generator=torch.Generator("cpu").manual_seed(0)) * float(s.init_noise_sigma)
            tensors[f"{key}/sample0"] = sample.clone()
            ts = s.timesteps
            for i, t in enumerate(ts):
                scaled = s.scale_model_input(sample, t)
                # the Rust tests draw the same model outputs with their torch-compatible generator
                model_output = torch.randn(SCHED_SHAPE, generator=torch.Generator("cpu").manual_seed(1000 + i))
                kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
                sample = s.step(model_output, t, sample, **kw).prev_sample
                tensors[f"{key}/scaled{i}"] = scaled.clone()
                tensors[f"{key}/prev{i}"] = sample.clone()
            sigmas = getattr(s, "sigmas", None)
            meta[key] = {
                "steps": steps,
                "config": {**{k: v for k, v in base.items()}, **kwargs},
                "timesteps": [float(t) for t in ts],
                "init_noise_sigma": float(s.init_noise_sigma),
                "sigmas": [float(x) for x in sigmas] if sigmas is not None else None,
            }
    save_file(tensor_dict_to_contig(tensors), os.path.join(ref_dir, "schedulers.safetensors"))
    with open(os.path.join(ref_dir, "schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1)


E2E_PROMPT = "a photo of a cat on a beach"
E2E_NEGATIVE = "blurry, lowres"
E2E_STEPS = 6


def record_model(name, model_dir, ref_dir):
    pipe = load_pipe(model_dir)
    out = os.path.join(ref_dir, name)
    os.makedirs(out, exist_ok=True)
    tok = pipe.tokenizer
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "ids": ids}, f, ensure_ascii=False)

    tensors = {}
    with torch.no_grad():
        text_prompts = ["a photo of a cat on a beach", "", "emoji 😀🐱🚀 party", "word " * 100]
        for i, p in enumerate(text_prompts):
            t = tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            tensors[f"text{i}"] = pipe.text_encoder(t)[0]
        unet = pipe.unet
        cfg = unet.config
        f = pipe.vae_scale_factor
        h = cfg.sample_size
        g = torch.Generator("cpu").manual_seed(3)
        sample = torch.randn((2, 4, h, h), generator=g)
        context = torch.randn((2, 77, cfg.cross_attention_dim), generator=g)
        tensors["unet_sample"] = sample
        tensors["unet_context"] = context
        for t in [1, 500, 999]:
            tensors[f"unet_out_t{t}"] = unet(sample, torch.tensor(t), encoder_hidden_states=context).sample
        tensors["unet_out_t37.5"] = unet(sample, torch.tensor(37.5), encoder_hidden_states=context).sample
        # odd latent size: forward_upsample_size path
        odd = torch.randn((1, 4, h + 2, h - 2), generator=g)
        tensors["unet_odd_sample"] = odd
        tensors["unet_odd_out"] = unet(odd, torch.tensor(250), encoder_hidden_states=context[:1]).sample
        latents = torch.randn((1, 4, h, h), generator=g)
        tensors["vae_latents"] = latents
        tensors["vae_decoded"] = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    save_file(tensor_dict_to_contig(tensors), os.path.join(out, "tensors.safetensors"))

    e2e = os.path.join(out, "e2e")
    os.makedirs(e2e, exist_ok=True)
    base_config = dict(pipe.scheduler.config)
    # (dpmpp_sde: one Brownian tree for the whole batch here, one per image in sdgen; its
    # images are record_sde_images')
    runs = [(n, 7.5) for n in SCHEDULERS if n != "dpmpp_sde"] + [("euler_nocfg", 1.0)]
    meta = {"prompt": E2E_PROMPT, "negative_prompt": E2E_NEGATIVE, "steps": E2E_STEPS, "seeds": [42, 43], "runs": {}}
    for run_name, guidance in runs:
        sched_name = run_name.replace("_nocfg", "")
        cls, extra = SCHEDULERS[sched_name]
        pipe.scheduler = cls.from_config(base_config, **extra)
        gens = [torch.Generator("cpu").manual_seed(s) for s in meta["seeds"]]
        images = pipe(
            E2E_PROMPT,
            negative_prompt=E2E_NEGATIVE,
            num_inference_steps=E2E_STEPS,
            guidance_scale=guidance,
            num_images_per_prompt=2,
            generator=gens,
            output_type="np",
        ).images
        u8 = (images * 255).round().astype("uint8")
        from PIL import Image

        for i, s in enumerate(meta["seeds"]):
            Image.fromarray(u8[i]).save(os.path.join(e2e, f"{run_name}-{s}.png"))
        meta["runs"][run_name] = {"scheduler": sched_name, "guidance": guidance}
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump(meta, f, indent=1)


# ---- single-file checkpoints in the original LDM naming (what most fine-tunes ship) ----

UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
               ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def ldm_unet_key(k, layers, up_has_attn):
    per = layers + 1
    rr = lambda r: next((l + r[len(d):] for d, l in UNET_RESNET if r.startswith(d)), r)
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for d, l in fixed.items():
        if k.startswith(d):
            return l + k[len(d):]
    parts = k.split(".")
    if parts[0] == "down_blocks":
        b = int(parts[1])
        if parts[2] == "resnets":
            return f"input_blocks.{1 + b * per + int(parts[3])}.0." + rr(".".join(parts[4:]))
        if parts[2] == "attentions":
            return f"input_blocks.{1 + b * per + int(parts[3])}.1." + ".".join(parts[4:])
        return f"input_blocks.{1 + b * per + layers}.0.op." + ".".join(parts[5:])
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return "middle_block.1." + ".".join(parts[3:])
        return f"middle_block.{0 if parts[2] == '0' else 2}." + rr(".".join(parts[3:]))
    if parts[0] == "up_blocks":
        b = int(parts[1])
        if parts[2] == "resnets":
            return f"output_blocks.{b * per + int(parts[3])}.0." + rr(".".join(parts[4:]))
        if parts[2] == "attentions":
            return f"output_blocks.{b * per + int(parts[3])}.1." + ".".join(parts[4:])
        slot = 2 if up_has_attn[b] else 1
        return f"output_blocks.{b * per + layers}.{slot}.conv." + ".".join(parts[5:])
    raise KeyError(k)


def ldm_vae_key(k, n):
    res = lambda r: r.replace("conv_shortcut.", "nin_shortcut.")
    if k.startswith(("quant_conv.", "post_quant_conv.")):
        return k
    part, rest = k.split(".", 1)
    if rest.startswith("mid_block."):
        r = rest[len("mid_block."):]
        if r.startswith("resnets.0."):
            return f"{part}.mid.block_1." + res(r[len("resnets.0."):])
        if r.startswith("resnets.1."):
            return f"{part}.mid.block_2." + res(r[len("resnets.1."):])
        r = r[len("attentions.0."):]
        for d, l in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]:
            if r.startswith(d):
                return f"{part}.mid.attn_1.{l}" + r[len(d):]
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out." + rest[len("conv_norm_out."):]
    if rest.startswith(("conv_in.", "conv_out.")):
        return k
    p = rest.split(".")
    if p[0] == "down_blocks":
        if p[2] == "resnets":
            return f"encoder.down.{p[1]}.block.{p[3]}." + res(".".join(p[4:]))
        return f"encoder.down.{p[1]}.downsample.conv." + ".".join(p[5:])
    kk = n - 1 - int(p[1])
    if p[2] == "resnets":
        return f"decoder.up.{kk}.block.{p[3]}." + res(".".join(p[4:]))
    return f"decoder.up.{kk}.upsample.conv." + ".".join(p[5:])


def to_ldm_state_dict(pipe):
    """The pipeline's weights under the original LDM key names (fp16 as stored)."""
    sd = {}
    unet = pipe.unet
    layers = unet.config.layers_per_block
    up_has_attn = [t == "CrossAttnUpBlock2D" for t in unet.config.up_block_types]
    for k, v in unet.state_dict().items():
        sd["model.diffusion_model." + ldm_unet_key(k, layers, up_has_attn)] = v
    n = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        lk = ldm_vae_key(k, n)
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM keeps these as 1x1 convolutions
        sd["first_stage_model." + lk] = v
    text = pipe.text_encoder.state_dict()
    if pipe.text_encoder.config.hidden_act == "quick_gelu":
        for k, v in text.items():
            sd["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
    else:  # SD 2.x: OpenCLIP layout (SD 2's files hold an unused identity text_projection)
        d = pipe.text_encoder.config.hidden_size
        projection = torch.eye(d, dtype=pipe.text_encoder.dtype)
        sd.update(open_clip_state_dict(pipe.text_encoder, "cond_stage_model.model.", projection))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def open_clip_state_dict(text_encoder, p, projection):
    """A transformers CLIP text model's weights in OpenCLIP's layout under prefix `p`: q, k, v
    stacked in `in_proj`, and `projection` stored as OpenCLIP keeps it ([hidden, projection])."""
    t = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    sd = {}
    sd[p + "token_embedding.weight"] = t["embeddings.token_embedding.weight"]
    sd[p + "positional_embedding"] = t["embeddings.position_embedding.weight"]
    sd[p + "ln_final.weight"] = t["final_layer_norm.weight"]
    sd[p + "ln_final.bias"] = t["final_layer_norm.bias"]
    sd[p + "text_projection"] = projection
    for i in range(text_encoder.config.num_hidden_layers):
        b, l = f"{p}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for w in ["weight", "bias"]:
            sd[b + f"attn.in_proj_{w}"] = torch.cat([t[l + f"self_attn.{q}_proj.{w}"] for q in "qkv"])
            sd[b + f"attn.out_proj.{w}"] = t[l + f"self_attn.out_proj.{w}"]
            sd[b + f"ln_1.{w}"] = t[l + f"layer_norm1.{w}"]
            sd[b + f"ln_2.{w}"] = t[l + f"layer_norm2.{w}"]
            sd[b + f"mlp.c_fc.{w}"] = t[l + f"mlp.fc1.{w}"]
            sd[b + f"mlp.c_proj.{w}"] = t[l + f"mlp.fc2.{w}"]
    return sd


def to_ldm_state_dict_xl(pipe):
    """An SDXL pipeline's weights in the original naming (what SDXL fine-tunes ship):
    `model.diffusion_model.*` with the added embedding as `label_emb.0.{0,2}`,
    `first_stage_model.*`, CLIP-L under `conditioner.embedders.0.transformer.`, OpenCLIP
    under `conditioner.embedders.1.model.`."""
    sd = {}
    unet = pipe.unet
    layers = unet.config.layers_per_block
    up_has_attn = [t == "CrossAttnUpBlock2D" for t in unet.config.up_block_types]
    for k, v in unet.state_dict().items():
        if k.startswith("add_embedding."):
            key = k.replace("add_embedding.linear_1.", "label_emb.0.0.").replace("add_embedding.linear_2.", "label_emb.0.2.")
        else:
            key = ldm_unet_key(k, layers, up_has_attn)
        sd["model.diffusion_model." + key] = v
    n = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        lk = ldm_vae_key(k, n)
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]
        sd["first_stage_model." + lk] = v
    for k, v in pipe.text_encoder.state_dict().items():
        sd["conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model.")] = v
    projection = pipe.text_encoder_2.text_projection.weight.T
    sd.update(open_clip_state_dict(pipe.text_encoder_2, "conditioner.embedders.1.model.", projection))
    return {k: v.detach().contiguous() for k, v in sd.items()}


# (scheduler, strength) of the SDXL image-to-image references; 0.3 is diffusers' default there
SDXL_IMG2IMG_CASES = [("euler", 0.6), ("dpmpp_2m", 0.6), ("euler_a", 0.3), ("ddim", 0.8)]


def record_sdxl_picture_cases(out, pipe, kind, cases, mask=False):
    """diffusers' seed-42 images of `pipe` (the e2e prompts) from the 64x64 picture
    img2img/tiny2.png (and the mask img2img/tiny2-mask.png when `mask`), one per case
    (scheduler, strength[, extra pipeline arguments]), in reference/tiny_xl/{kind}/ with the
    cases.json the Rust tests read (tests/sdxl.rs, check_picture_cases)."""
    from PIL import Image

    ref = os.path.join(out, "reference", "tiny_xl", kind)
    os.makedirs(ref, exist_ok=True)
    inputs = {"picture": "img2img/tiny2.png", **({"mask": "img2img/tiny2-mask.png"} if mask else {})}
    images = {"image": "picture", "mask_image": "mask"}
    base_config = dict(pipe.scheduler.config)
    recorded = []
    for name, strength, *rest in cases:
        extra_args = rest[0] if rest else {}
        cls, extra = SCHEDULERS[name]
        pipe.scheduler = cls.from_config(base_config, **extra)
        png = f"{name}-{strength}{'-scores' if extra_args else ''}.png"
        pictures = {arg: Image.open(os.path.join(out, inputs[key])) for arg, key in images.items() if key in inputs}
        save_seed42_image(pipe, os.path.join(ref, png), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE,
                          strength=strength, **pictures, **extra_args)
        recorded.append({"scheduler": name, "strength": strength, "png": png, **extra_args})
    with open(os.path.join(ref, "cases.json"), "w") as f:
        json.dump({**inputs, "cases": recorded}, f, indent=1)


def record_sdxl_img2img(out):
    """diffusers' StableDiffusionXLImg2ImgPipeline (the base model's: no aesthetic score) on
    tiny_xl from the committed 64x64 picture img2img/tiny2.png, seed 42, the e2e prompts."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    model_dir = os.path.join(out, "models", "tiny_xl")
    base = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, add_watermarker=False)
    pipe = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False,
                                            force_zeros_for_empty_prompt=True, add_watermarker=False)
    record_sdxl_picture_cases(out, pipe, "img2img", SDXL_IMG2IMG_CASES)


# (scheduler, strength) of the SDXL inpainting references; 0.9999 is diffusers' default there
SDXL_INPAINT_CASES = [("euler", 1.0), ("euler_a", 0.6), ("dpmpp_2m", 0.9999)]


def record_sdxl_inpaint(out):
    """diffusers' StableDiffusionXLInpaintPipeline with tiny_xl's 4-channel U-Net (its masked
    blending) from img2img/tiny2.png and the 64x64 mask img2img/tiny2-mask.png (tiny's mask,
    nearest-resized), seed 42, the e2e prompts."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from PIL import Image

    pics = os.path.join(out, "img2img")
    Image.open(os.path.join(pics, "tiny-mask.png")).resize((64, 64), resample=Image.NEAREST).save(
        os.path.join(pics, "tiny2-mask.png"))
    model_dir = os.path.join(out, "models", "tiny_xl")
    base = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, add_watermarker=False)
    pipe = StableDiffusionXLInpaintPipeline(**base.components, requires_aesthetics_score=False,
                                            force_zeros_for_empty_prompt=True, add_watermarker=False)
    record_sdxl_picture_cases(out, pipe, "inpaint", SDXL_INPAINT_CASES, mask=True)


def tiny_xl_inpaint(out, tmp):
    """tiny_xl with a random 9-channel U-Net (latents, mask, masked-picture latents), as the
    Hub's SDXL inpainting model (its model_index: StableDiffusionXLInpaintPipeline,
    requires_aesthetics_score false), its folder in tmp; the U-Net is committed as
    models/tiny_xl_inpaint_unet and the Rust tests compose the model the same way."""
    unet_dir = os.path.join(out, "models", "tiny_xl_inpaint_unet")
    config = dict(UNet2DConditionModel.load_config(os.path.join(out, "models", "tiny_xl", "unet")))
    random_unet(unet_dir, {**config, "in_channels": 9}, 8)
    return with_unet(os.path.join(out, "models", "tiny_xl"), unet_dir, os.path.join(tmp, "tiny_xl_inpaint"),
                     {"_class_name": "StableDiffusionXLInpaintPipeline", "requires_aesthetics_score": False})


def record_sdxl_asymmetric(out):
    """A U-Net with tiny_xl's structure but per-layer transformer counts and the up blocks'
    own counts (reverse_transformer_layers_per_block), as the distilled SDXL U-Nets (SSD-1B)
    configure them: models/tiny_xl_asym_unet, and its output for tiny_xl's U-Net inputs
    (reference/tiny_xl/tensors.safetensors) in reference/tiny_xl/asym_unet.safetensors."""
    from safetensors.torch import load_file

    unet_dir = os.path.join(out, "models", "tiny_xl_asym_unet")
    config = dict(UNet2DConditionModel.load_config(os.path.join(out, "models", "tiny_xl", "unet")))
    config.update(transformer_layers_per_block=[1, [2, 1], [3, 1]],
                  reverse_transformer_layers_per_block=[[1, 3, 2], [2, 1, 1], 1])
    random_unet(unet_dir, config, 9)
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
    depths = [len(a.transformer_blocks) for b in unet.down_blocks for a in getattr(b, "attentions", [])]
    depths += [len(a.transformer_blocks) for a in unet.mid_block.attentions]
    depths += [len(a.transformer_blocks) for b in unet.up_blocks for a in getattr(b, "attentions", [])]
    assert depths == [2, 1, 3, 1, 3, 1, 3, 2, 2, 1, 1], depths
    t = load_file(os.path.join(out, "reference", "tiny_xl", "tensors.safetensors"))
    with torch.no_grad():
        got = unet(t["unet_sample"], torch.tensor(500), encoder_hidden_states=t["unet_context"],
                   added_cond_kwargs={"text_embeds": t["unet_text_embeds"], "time_ids": t["unet_time_ids"]}).sample
    save_file({"out_t500": got.contiguous()}, os.path.join(out, "reference", "tiny_xl", "asym_unet.safetensors"))


def tiny_xl_refiner(out, tmp):
    """SDXL's refiner at toy size, as the Hub's stable-diffusion-xl-refiner-1.0 is laid out:
    StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score, no text_encoder or
    tokenizer (null in model_index.json), tiny_xl's OpenCLIP-like text_encoder_2 (its width is
    the U-Net's cross_attention_dim), and a U-Net whose add_embedding takes the pooled
    embedding and 5 numbers (original size, crop, aesthetic score). Only the U-Net is committed
    (models/tiny_xl_refiner_unet); the rest is tiny_xl's, composed in tmp as the Rust tests
    compose it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    unet_dir = os.path.join(out, "models", "tiny_xl_refiner_unet")
    base = StableDiffusionXLPipeline.from_pretrained(os.path.join(out, "models", "tiny_xl"), torch_dtype=torch.float32,
                                                     add_watermarker=False)
    config = dict(base.unet.config)
    config.update(cross_attention_dim=base.text_encoder_2.config.hidden_size,
                  projection_class_embeddings_input_dim=5 * config["addition_time_embed_dim"]
                  + base.text_encoder_2.config.projection_dim)
    random_unet(unet_dir, config, 10)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=UNet2DConditionModel.from_pretrained(unet_dir), scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)
    model_dir = os.path.join(tmp, "tiny_xl_refiner")
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


# (scheduler, strength, aesthetic scores other than diffusers' defaults)
SDXL_REFINER_CASES = [("euler", 0.3, {}), ("dpmpp_2m", 0.6, {}),
                      ("euler", 0.5, {"aesthetic_score": 8.5, "negative_aesthetic_score": 1.0})]


def record_sdxl_refiner(out):
    """diffusers' StableDiffusionXLImg2ImgPipeline with the tiny refiner (tiny_xl_refiner) from
    img2img/tiny2.png, seed 42, the e2e prompts: reference/tiny_xl/refiner/."""
    import tempfile
    from diffusers import StableDiffusionXLImg2ImgPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_xl_refiner(out, tmp)
        with open(os.path.join(model_dir, "model_index.json")) as f:
            index = json.load(f)
        assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"], index
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                                add_watermarker=False)
        record_sdxl_picture_cases(out, pipe, "refiner", SDXL_REFINER_CASES)


SDXL_INPAINT9_CASES = [("euler", 0.9999), ("euler_a", 1.0), ("dpmpp_2m", 0.6)]


def record_sdxl_inpaint9(out):
    """diffusers' StableDiffusionXLInpaintPipeline with a 9-channel U-Net (tiny_xl_inpaint), as
    record_sdxl_inpaint: reference/tiny_xl/inpaint9/."""
    import tempfile
    from diffusers import StableDiffusionXLInpaintPipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_xl_inpaint(out, tmp), torch_dtype=torch.float32,
                                                                add_watermarker=False)
        record_sdxl_picture_cases(out, pipe, "inpaint9", SDXL_INPAINT9_CASES, mask=True)


def record_sdxl_single_file(out):
    """tiny_xl as one .safetensors in the original naming, checked with diffusers' own
    from_single_file against the diffusers folder."""
    from diffusers import StableDiffusionXLPipeline

    model_dir = os.path.join(out, "models", "tiny_xl")
    half = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float16, add_watermarker=False)
    path = os.path.join(out, "single_file", "tiny_xl.safetensors")
    save_file(to_ldm_state_dict_xl(half), path)
    ref = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, add_watermarker=False)
    single = StableDiffusionXLPipeline.from_single_file(path, config=model_dir, torch_dtype=torch.float32,
                                                        add_watermarker=False)
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        a, b = getattr(ref, comp).state_dict(), getattr(single, comp).state_dict()
        assert set(a) - {k for k in a if k.endswith("position_ids")} <= set(b), f"{comp}: keys missing"
        for k in a:
            if k.endswith("position_ids"):
                continue
            assert torch.equal(a[k], b[k].reshape(a[k].shape)), f"tiny_xl: {comp} {k} differs"
    print(f"{path}: diffusers' from_single_file gives the folder's weights")


class _Evil:
    """A pickle that asks for os.system when loaded by Python: sdgen must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo sdgen-fixture-should-never-run > /tmp/sdgen-pwned",))


def record_single_files(out):
    """tiny as .safetensors and .ckpt, tiny2 (OpenCLIP text encoder) as .safetensors, each
    checked with diffusers' own from_single_file against the diffusers folder; and a .ckpt
    whose pickle calls os.system."""
    sf_dir = os.path.join(out, "single_file")
    os.makedirs(sf_dir, exist_ok=True)
    targets = [("tiny", ["safetensors", "ckpt"]), ("tiny2", ["safetensors"])]
    for name, kinds in targets:
        model_dir = os.path.join(out, "models", name)
        half = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float16, safety_checker=None)
        sd = to_ldm_state_dict(half)
        for kind in kinds:
            path = os.path.join(sf_dir, f"{name}.{kind}")
            if kind == "safetensors":
                save_file(sd, path)
            else:
                torch.save({"state_dict": sd, "global_step": 142, "epoch": 0}, path)
            ref = load_pipe(model_dir)
            single = StableDiffusionPipeline.from_single_file(path, config=model_dir, torch_dtype=torch.float32, safety_checker=None)
            for comp in ["unet", "vae", "text_encoder"]:
                a, b = getattr(ref, comp).state_dict(), getattr(single, comp).state_dict()
                for k in a:
                    if k.endswith("position_ids"):
                        continue
                    assert torch.equal(a[k], b[k].reshape(a[k].shape)), f"{name}.{kind}: {comp} {k} differs"
            print(f"{path}: diffusers' from_single_file gives the folder's weights")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, os.path.join(sf_dir, "evil.ckpt"))


def record_bin(out):
    """tiny's U-Net as a PyTorch .bin (what repos such as lambdalabs/sd-pokemon-diffusers ship),
    checked by loading it with diffusers in place of the safetensors file."""
    bin_dir = os.path.join(out, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    model_dir = os.path.join(out, "models", "tiny")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"), torch_dtype=torch.float16)
    path = os.path.join(bin_dir, "tiny-unet.bin")
    torch.save(unet.state_dict(), path)
    tmp = os.path.join(out, "_bin_check")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(os.path.join(model_dir, "unet", "config.json"), tmp)
    shutil.copy(path, os.path.join(tmp, "diffusion_pytorch_model.bin"))
    again = UNet2DConditionModel.from_pretrained(tmp, use_safetensors=False, torch_dtype=torch.float32)
    ref = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet"), torch_dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    shutil.rmtree(tmp)
    print(f"{path}: diffusers loads it as the same U-Net")


def full_size(out_dir):
    """A full-size SD 1.5 architecture with random weights, for benchmarks (never committed)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    tok_dir = os.path.join(out_dir, "_tok")
    write_clip_tokenizer(tok_dir, "<|endoftext|>")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.rmtree(os.path.join(out_dir, "tokenizer"))
    write_clip_tokenizer(os.path.join(out_dir, "tokenizer"), "<|endoftext|>")
    shutil.rmtree(tok_dir)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)


def full_size_xl(out_dir):
    """A full-size SDXL base architecture with random weights, from the Hub configs in
    tests/fixtures/configs/sdxl-base-1.0, for benchmarks (about 14 GB in float32; never
    committed)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    cfg = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "configs", "sdxl-base-1.0")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(cfg, "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(cfg, "vae")))
    text = CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(cfg, "text_encoder", "config.json")))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(os.path.join(cfg, "text_encoder_2", "config.json")))
    tok_dir = os.path.join(out_dir, "_tok")
    write_clip_tokenizer(tok_dir, "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    write_clip_tokenizer(tok_dir, "!")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    # all in float32, as the f32 benchmark reads it (the configs' "torch_dtype": "float16" made
    # transformers build the second encoder in float16)
    vae, text, text_2, unet = vae.float(), text.float(), text_2.float(), unet.float()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     add_watermarker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for sub, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
        shutil.rmtree(os.path.join(out_dir, sub))
        write_clip_tokenizer(os.path.join(out_dir, sub), pad)
    for rel in ["model_index.json", "scheduler/scheduler_config.json"]:
        shutil.copy(os.path.join(cfg, rel), os.path.join(out_dir, rel))


def save_seed42_image(pipe, path, **prompt):
    """The pipeline's seed-42 image at its default size and scheduler, E2E_STEPS steps, guidance
    7.5, as an 8-bit PNG (what tests/common's assert_seed42_image compares with); `prompt`
    also carries the other inputs (prompt embeddings, width/height, image, mask_image,
    strength)."""
    from PIL import Image

    image = pipe(
        **prompt,
        num_inference_steps=E2E_STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="np",
    ).images[0]
    Image.fromarray((image * 255).round().astype("uint8")).save(path)


# ---- clip skip, counted as the web UI counts it, applied to both prompts ----

def encode_skipping(pipe, text, skip, ids=None):
    """diffusers' encode_prompt(clip_skip=skip) for one prompt (or its ids): the hidden state
    skip layers before the last, through the final layer norm."""
    if ids is None:
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
    # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5 no
    # longer has (its own clip_skip raises AttributeError there); the layer norm is the same
    text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    return text_model.final_layer_norm(hidden)


def record_clip_skip(name, model_dir, ref_dir):
    """Images with the web UI's "Clip skip: N" (diffusers clip_skip=N-1) for the prompt and the
    negative prompt alike (diffusers 0.42 skips in the positive prompt only, so the embeddings
    are made here and passed in), for every N the text encoder allows above 1."""
    pipe = load_pipe(model_dir)
    out = os.path.join(ref_dir, name, "clip_skip")
    os.makedirs(out, exist_ok=True)
    layers = pipe.text_encoder.config.num_hidden_layers
    with torch.no_grad():
        for n in range(2, layers + 1):
            pe = encode_skipping(pipe, E2E_PROMPT, n - 1)
            ne = encode_skipping(pipe, E2E_NEGATIVE, n - 1)
            save_seed42_image(pipe, os.path.join(out, f"{n}.png"), prompt_embeds=pe, negative_prompt_embeds=ne)


# ---- real-world config shapes (nulls, -Infinity, 2022 configs, BK-SDM) on the tiny model ----

def apply_config_edits(model_dir, edits):
    """Merges each file's edits into model_dir (null sets null, "$delete" removes keys), written
    as Python's json writes them (-Infinity as a bare literal)."""
    for rel, change in edits.items():
        path = os.path.join(model_dir, rel)
        with open(path) as f:
            cfg = json.load(f)
        change = dict(change)
        for k in change.pop("$delete", []):
            cfg.pop(k, None)
        cfg.update(change)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def record_real_world(out):
    """diffusers' image for each variant of tests/fixtures/configs/real_world.json: the
    pipeline's own scheduler and default size, seed 42."""
    with open(os.path.join(out, "configs", "real_world.json")) as f:
        variants = json.load(f)["variants"]
    ref = os.path.join(out, "reference", "real_world")
    os.makedirs(ref, exist_ok=True)
    import tempfile

    for name, edits in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = os.path.join(tmp, "model")
            shutil.copytree(os.path.join(out, "models", "tiny"), model_dir)
            apply_config_edits(model_dir, edits)
            pipe = load_pipe(model_dir)
            save_seed42_image(pipe, os.path.join(ref, f"{name}.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE)
            print(f"{name}: {type(pipe.scheduler).__name__} {dict(steps_offset=pipe.scheduler.config.get('steps_offset'), clip_sample=pipe.scheduler.config.get('clip_sample'))}")


# ---- add-ons: LoRAs, textual-inversion embeddings, the web UI's prompt syntax ----
#
# tests/fixtures/addons/ holds tiny LoRAs in both formats, tiny embeddings in the three
# formats, the text-encoder norms of the "tiny_ln" variant (tiny with LayerNorms that are not
# the identity, which the web UI's mean restoration needs), and addons.json: the web UI's
# chunks (ids and weights) for prompts in its syntax. reference/addons/ holds the images.

ADDON_LORA_RANK = 2


def add_lora_layer(out, key, weight, g):
    """A random kohya layer `key` of rank ADDON_LORA_RANK for `weight` (a LoCon pair for a
    convolution) into out: lora_down, lora_up (N(0, 0.3), f16) and an alpha of 1, 2 or 3."""
    r = ADDON_LORA_RANK
    if weight.dim() == 4:
        down = torch.randn((r, weight.shape[1], weight.shape[2], weight.shape[3]), generator=g) * 0.3
        up = torch.randn((weight.shape[0], r, 1, 1), generator=g) * 0.3
    else:
        down = torch.randn((r, weight.shape[1]), generator=g) * 0.3
        up = torch.randn((weight.shape[0], r), generator=g) * 0.3
    out[f"{key}.lora_down.weight"] = down.half()
    out[f"{key}.lora_up.weight"] = up.half()
    out[f"{key}.alpha"] = torch.tensor(float(len(out) % 3 + 1)).half()


def kohya_lora(pipe, seed):
    """A kohya / web UI LoRA for every attention, projection and feed-forward layer of the
    U-Net, the resnets' convolutions (LoCon) and the text encoder's layers, random, with alphas."""
    g = torch.Generator().manual_seed(seed)
    out = {}

    def add(prefix, name, weight):
        add_lora_layer(out, f"{prefix}_{name.replace('.', '_')}", weight, g)

    for name, mod in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")) or (
            "resnets" in name and name.endswith(("conv1", "conv2"))
        ):
            add("lora_unet", name, mod.weight)
    for name, mod in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
            name = name if name.startswith("text_model.") else "text_model." + name
            add("lora_te", name, mod.weight)
    return out


def peft_lora(pipe, path):
    """A diffusers / PEFT LoRA (lora_A/lora_B, rank 4, alpha 8 recorded in the file's
    lora_adapter_metadata), random, saved as diffusers saves one."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(11)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    pipe.unet.add_adapter(unet_cfg)
    # (transformers' add_adapter wants a newer peft than PyPI has: peft's own injection)
    inject_adapter_in_model(te_cfg, pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        os.path.dirname(path),
        unet_lora_layers={k: v.half() for k, v in get_peft_model_state_dict(pipe.unet).items()},
        text_encoder_lora_layers={k: v.half() for k, v in get_peft_model_state_dict(pipe.text_encoder).items()},
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        weight_name=os.path.basename(path),
    )


def webui_parse(text):
    """The web UI's parse_prompt_attention, from its documented behaviour (prompt_parser.py)."""
    import re

    lexer = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
    res, round_b, square_b = [], [], []

    def mul(start, m):
        for p in range(start, len(res)):
            res[p][1] *= m

    for m in lexer.finditer(text):
        t, w = m.group(0), m.group(1)
        if t.startswith("\\"):
            res.append([t[1:], 1.0])
        elif t == "(":
            round_b.append(len(res))
        elif t == "[":
            square_b.append(len(res))
        elif w is not None and round_b:
            mul(round_b.pop(), float(w))
        elif t == ")" and round_b:
            mul(round_b.pop(), 1.1)
        elif t == "]" and square_b:
            mul(square_b.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", t)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_b:
        mul(pos, 1.1)
    for pos in square_b:
        mul(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def webui_chunks(tok, prompt, embeddings):
    """The web UI's tokenize_line: (ids, weights) per 77-token chunk. `embeddings` maps an
    embedding's first token id to the ids of its vectors (they stay in one chunk)."""
    import re

    prompt = re.sub(r"<(\w+):([^>]+)>", "", prompt)
    parsed = webui_parse(prompt)
    start, end = tok.bos_token_id, tok.eos_token_id
    pad = tok.pad_token_id
    comma = tok.get_vocab().get(",</w>")
    chunks, chunk, chunk_w = [], [], []
    last_comma = -1

    def next_chunk():
        nonlocal chunk, chunk_w, last_comma
        ids = [start] + chunk + [end] * (75 - len(chunk)) + [end]
        ws = [1.0] + chunk_w + [1.0] * (75 - len(chunk)) + [1.0]
        chunks.append((ids, ws))
        chunk, chunk_w, last_comma = [], [], -1

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tok(text, add_special_tokens=False, truncation=False).input_ids:
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == 75 and last_comma != -1 and len(chunk) - last_comma <= 20:
                moved, moved_w = chunk[last_comma + 1:], chunk_w[last_comma + 1:]
                chunk, chunk_w = chunk[:last_comma + 1], chunk_w[:last_comma + 1]
                next_chunk()
                chunk, chunk_w = moved, moved_w
            if len(chunk) == 75:
                next_chunk()
            vec_ids = embeddings.get(token)
            if vec_ids is None:
                chunk.append(token)
                chunk_w.append(weight)
            else:
                if len(chunk) + len(vec_ids) > 75:
                    next_chunk()
                chunk += vec_ids
                chunk_w += [weight] * len(vec_ids)
    if chunk or not chunks:
        next_chunk()
    if pad != end:
        for ids, _ in chunks:
            first = ids.index(end)
            ids[first + 1:] = [pad] * (len(ids) - first - 1)
    return chunks


def webui_encode(pipe, chunks, skip=0):
    """Each chunk through the text encoder, weighted with the mean restored ("Original")."""
    zs = []
    for ids, ws in chunks:
        z = encode_skipping(pipe, None, skip, ids=torch.tensor([ids]))
        original_mean = z.mean()
        z = z * torch.tensor(ws).reshape(1, -1, 1).expand(z.shape)
        z = z * (original_mean / z.mean())
        zs.append(z)
    return torch.hstack(zs)


def seed42_loop(pipe, cond, uncond, path):
    """The pipeline's seed-42 image (default scheduler, E2E_STEPS, guidance 7.5) for contexts
    of different lengths, which StableDiffusionPipeline refuses: its loop, with the U-Net run
    on each half apart, as the web UI does then."""
    from PIL import Image

    g = torch.Generator("cpu").manual_seed(42)
    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(1, unet.config.in_channels, size, size, torch.float32, "cpu", g)
    sched.set_timesteps(E2E_STEPS)
    extra = pipe.prepare_extra_step_kwargs(g, 0.0)
    # (prepare_latents has scaled by init_noise_sigma)
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        u = unet(x, t, encoder_hidden_states=uncond).sample
        c = unet(x, t, encoder_hidden_states=cond).sample
        latents = sched.step(u + 7.5 * (c - u), t, latents, **extra).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    Image.fromarray((image * 255).round().astype("uint8")).save(path)


A1111_CASES = [
    "a (red fox:1.3), [blurry], snow BREAK lake",
    "((masterpiece)), a [cat] on a (beach:0.7)",
    "BREAK BREAK start",
    r"((a)) [[b]] (c:0.5) \(d\) \[e\] x\\y (open [close",
    "(a BREAK b) BREAKfast, time: 12:30 :1.5)",
    "word, " * 40 + "tail words after the chunk",
    "one two three four five six seven eight nine ten " * 9,
    "comma, " + "longword " * 73 + "after",
    "x " * 73 + "glowcat then more",
    "a shinyfox and (glowcat:1.2) with <lora:kohya:0.5> <dotty>",
    "",
    "Café (東京:1.1) 😀 [[émoji]]",
]


def addon_embeddings(addons):
    """The three embedding files (A1111 .pt of 2 vectors, A1111 .safetensors of 3, diffusers
    learned_embeds of 1, as a 1-D tensor) for tiny's 16-wide text encoder."""
    g = torch.Generator().manual_seed(21)
    emb = os.path.join(addons, "emb")
    os.makedirs(emb, exist_ok=True)
    pt = os.path.join(emb, "shinyfox.pt")
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": (torch.randn((2, 16), generator=g) * 0.5)},
            "name": "shinyfox-trained",
            "step": 1000,
            "sd_checkpoint": "0123abcd",
            "sd_checkpoint_name": "tiny",
        },
        pt,
    )
    st = os.path.join(emb, "glowcat.safetensors")
    save_file({"emb_params": (torch.randn((3, 16), generator=g) * 0.5).half()}, st)
    learned = os.path.join(emb, "learned_embeds.safetensors")
    save_file({"<dotty>": (torch.randn((16,), generator=g) * 0.5)}, learned)
    return [(pt, "shinyfox"), (st, "glowcat"), (learned, None)]


def load_embeddings(pipe, files):
    for path, token in files:
        pipe.load_textual_inversion(path, token=token)


def tiny_ln(out, tmp):
    """tiny with random text-encoder LayerNorms: the overrides are written to addons/ (the
    Rust tests rebuild the model the same way); returns the model's folder."""
    model_dir = os.path.join(tmp, "tiny_ln")
    shutil.copytree(os.path.join(out, "models", "tiny"), model_dir)
    te_file = os.path.join(model_dir, "text_encoder", "model.safetensors")
    from safetensors.torch import load_file

    sd = load_file(te_file)
    g = torch.Generator().manual_seed(5)
    norms = {}
    for k in sorted(sd):
        if "layer_norm" in k:
            base = 1.0 if k.endswith("weight") else 0.0
            norms[k] = (base + torch.randn(sd[k].shape, generator=g) * 0.5).half()
    save_file(norms, os.path.join(out, "addons", "tiny_ln_norms.safetensors"))
    sd.update(norms)
    save_file(sd, te_file, metadata={"format": "pt"})
    return model_dir


def record_addons(out):
    """LoRA, embedding and web UI syntax references on the tiny models."""
    import tempfile

    addons = os.path.join(out, "addons")
    os.makedirs(addons, exist_ok=True)
    ref = os.path.join(out, "reference", "addons")
    os.makedirs(ref, exist_ok=True)
    tiny = os.path.join(out, "models", "tiny")
    kohya = os.path.join(addons, "kohya.safetensors")
    save_file(kohya_lora(load_pipe(tiny), 7), kohya)
    peft = os.path.join(addons, "peft.safetensors")
    peft_lora(load_pipe(tiny), peft)
    embeddings = addon_embeddings(addons)
    tiny2 = os.path.join(out, "models", "tiny2")
    kohya2 = os.path.join(addons, "kohya_tiny2.safetensors")
    save_file(kohya_lora(load_pipe(tiny2), 9), kohya2)
    with torch.no_grad():
        # SD 2.x-shaped: linear projections, the gelu text encoder
        pipe = load_pipe(tiny2)
        pipe.load_lora_weights(kohya2)
        pipe.fuse_lora(lora_scale=0.7)
        save_seed42_image(pipe, os.path.join(ref, "lora-tiny2-kohya-0.7.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE)
        # LoRAs, fused as diffusers fuses them; two LoRAs: fuse, unload, fuse the next
        for name, loras in {
            "kohya-0.8": [(kohya, 0.8)],
            "peft-1.0": [(peft, 1.0)],
            "kohya-0.8+peft-0.5": [(kohya, 0.8), (peft, 0.5)],
        }.items():
            pipe = load_pipe(tiny)
            for path, scale in loras:
                pipe.load_lora_weights(path)
                pipe.fuse_lora(lora_scale=scale)
                pipe.unload_lora_weights()
            save_seed42_image(pipe, os.path.join(ref, f"lora-{name}.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE)
        # textual inversion, diffusers' way
        pipe = load_pipe(tiny)
        load_embeddings(pipe, embeddings)
        ti_prompt, ti_negative = "a shinyfox and a glowcat, <dotty>", "glowcat"
        save_seed42_image(pipe, os.path.join(ref, "embeddings.png"), prompt=ti_prompt, negative_prompt=ti_negative)
        tok = pipe.tokenizer
        expand = {}
        for _, token in embeddings:
            token = token or "<dotty>"
            ids = [tok.convert_tokens_to_ids(token)]
            i = 1
            while f"{token}_{i}" in tok.get_vocab():
                ids.append(tok.convert_tokens_to_ids(f"{token}_{i}"))
                i += 1
            expand[ids[0]] = ids
        plain_ids = pipe.tokenizer(pipe.maybe_convert_prompt(ti_prompt, tok), padding="max_length", max_length=77, truncation=True).input_ids
        cases = {}
        for model in MODELS:
            t = CLIPTokenizer.from_pretrained(os.path.join(out, "models", model, "tokenizer"))
            if model == "tiny":
                t = tok
            cases[model] = [
                {"prompt": p, "chunks": [{"ids": ids, "weights": ws} for ids, ws in webui_chunks(t, p, expand if model == "tiny" else {})]}
                for p in A1111_CASES
            ]
        # the web UI's syntax on tiny_ln: equal chunk counts through the pipeline, unequal
        # ones through its loop with the halves apart
        with tempfile.TemporaryDirectory() as tmp:
            pipe = load_pipe(tiny_ln(out, tmp))
            images = {
                "emphasis": ("((masterpiece)), a [cat] on a (beach:0.7)", "blurry"),
                # most of the chunk weighed 1.6: the mean restoration scales it by about 0.7
                "heavy": ("(" + "masterpiece, a red fox in the deep snow, " * 6 + ":1.6)", "[lowres]"),
                "break": ("a (red fox:1.3), [blurry], snow BREAK lake", "(ugly:1.2), lowres"),
                "long": ("one, two, three four five six seven eight nine ten " * 9, ""),
            }
            for name, (p, n) in images.items():
                pe = webui_encode(pipe, webui_chunks(pipe.tokenizer, p, {}))
                ne = webui_encode(pipe, webui_chunks(pipe.tokenizer, n, {}))
                path = os.path.join(ref, f"a1111-{name}.png")
                if pe.shape == ne.shape:
                    save_seed42_image(pipe, path, prompt_embeds=pe, negative_prompt_embeds=ne)
                else:
                    seed42_loop(pipe, pe, ne, path)
                print(f"a1111 {name}: {pe.shape[1] // 77} and {ne.shape[1] // 77} chunks")
    with open(os.path.join(addons, "addons.json"), "w") as f:
        json.dump(
            {
                "embeddings": {"prompt": ti_prompt, "negative_prompt": ti_negative, "plain_ids": plain_ids},
                "a1111_images": images,
                "a1111": cases,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )


# ---- SDXL: a tiny random StableDiffusionXLPipeline in the Hub layout ----

# The scheduler_config.json of stable-diffusion-xl-base-1.0 as the Hub has it.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def tiny_xl(out):
    """SDXL's structure at toy size: a DownBlock2D first, non-uniform transformer_layers_per_block
    (the mid block takes the last entry), attention_head_dim as head counts, linear projections,
    the text_time added conditioning, two text encoders (CLIP-L-like with quick_gelu and the
    end-of-text pad, OpenCLIP-like with gelu, a projection and the "!" pad) and a 4-block VAE
    with SDXL's scaling factor and force_upcast."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 24, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=8 + 16,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 12,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, pad_token_id=1, layer_norm_eps=1e-5)
    # the Hub's SDXL text encoder configs say eos_token_id 2 (transformers then pools at the
    # largest id, the end-of-text token)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=29, num_hidden_layers=3, num_attention_heads=2,
                                        hidden_act="quick_gelu", projection_dim=8, eos_token_id=2, **common))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=3,
                                                        num_attention_heads=4, hidden_act="gelu", projection_dim=12,
                                                        eos_token_id=2, **common))
    with torch.no_grad():
        for module in (unet, vae, text, text_2):
            for p in module.parameters():
                if p.dim() > 1:
                    p.add_(torch.randn_like(p) * 0.02)
            # non-identity LayerNorms, so that leaving the final one out shows
            for name, p in module.named_parameters():
                if "layer_norm" in name or name.split(".")[-2] == "norm":
                    p.add_(torch.randn_like(p) * 0.1)
    tmp = os.path.join(out, "_tokenizer_tmp")
    write_clip_tokenizer(tmp, "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(tmp)
    shutil.rmtree(tmp)
    write_clip_tokenizer(tmp, "!")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tmp)
    shutil.rmtree(tmp)
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in SDXL_SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionXLPipeline(
        vae=vae.half(), text_encoder=text.half(), text_encoder_2=text_2.half(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.half(), scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    model_dir = os.path.join(out, "models", "tiny_xl")
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for sub, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
        shutil.rmtree(os.path.join(model_dir, sub))
        write_clip_tokenizer(os.path.join(model_dir, sub), pad)
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_SCHEDULER, f, indent=2)
    return model_dir


def record_sdxl(out):
    from diffusers import StableDiffusionXLPipeline

    model_dir = tiny_xl(out)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, add_watermarker=False)
    ref = os.path.join(out, "reference", "tiny_xl")
    os.makedirs(os.path.join(ref, "e2e"), exist_ok=True)
    tensors = {}
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(E2E_PROMPT, negative_prompt=E2E_NEGATIVE, device="cpu",
                                               do_classifier_free_guidance=True)
        tensors.update(prompt_embeds=pe, negative_prompt_embeds=ne, pooled=pp, negative_pooled=npool)
        g = torch.Generator("cpu").manual_seed(3)
        sample = torch.randn((2, 4, 8, 8), generator=g)
        context = torch.randn((2, 77, 24), generator=g)
        text_embeds = torch.randn((2, 12), generator=g)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48.0, 80, 4, 8, 64, 32]])
        tensors.update(unet_sample=sample, unet_context=context, unet_text_embeds=text_embeds, unet_time_ids=time_ids)
        tensors["unet_out_t500"] = pipe.unet(sample, torch.tensor(500), encoder_hidden_states=context,
                                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    save_file(tensor_dict_to_contig(tensors), os.path.join(ref, "tensors.safetensors"))
    base_config = dict(pipe.scheduler.config)
    seeds = [42, 43]
    # name: (scheduler, guidance, extra pipeline arguments); "negative_prompt": None is
    # diffusers' default (zeros, force_zeros_for_empty_prompt)
    runs = {
        "euler": ("euler", 7.5, {}),
        "dpmpp_2m": ("dpmpp_2m", 7.5, {}),
        "euler_a": ("euler_a", 7.5, {}),
        "unipc": ("unipc", 7.5, {}),
        "euler_no_negative": ("euler", 7.5, {"negative_prompt": None}),
        "euler_nocfg": ("euler", 1.0, {}),
        "euler_size_conditioning": ("euler", 7.5, {"original_size": (48, 80), "crops_coords_top_left": (4, 8),
                                                    "target_size": (64, 32)}),
        "euler_48x80": ("euler", 7.5, {"height": 48, "width": 80}),
        # SDXL-Turbo's way: one step, no guidance, "trailing" timesteps (its scheduler config)
        "turbo_1_step": ("euler_a", 0.0, {"num_inference_steps": 1, "scheduler_config": {"timestep_spacing": "trailing"}}),
    }
    meta = {"prompt": E2E_PROMPT, "negative_prompt": E2E_NEGATIVE, "steps": E2E_STEPS, "seeds": seeds, "runs": {}}
    from PIL import Image

    for run_name, (sched, guidance, extra) in runs.items():
        cls, over = SCHEDULERS[sched]
        pipe.scheduler = cls.from_config(base_config, **over, **extra.get("scheduler_config", {}))
        args = dict(negative_prompt=E2E_NEGATIVE, num_inference_steps=E2E_STEPS)
        args.update({k: v for k, v in extra.items() if k != "scheduler_config"})
        images = pipe(E2E_PROMPT, guidance_scale=guidance, num_images_per_prompt=2,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np",
                      **args).images
        u8 = (images * 255).round().astype("uint8")
        for i, s in enumerate(seeds):
            Image.fromarray(u8[i]).save(os.path.join(ref, "e2e", f"{run_name}-{s}.png"))
        meta["runs"][run_name] = {"scheduler": sched, "guidance": guidance,
                                  **{k: v for k, v in extra.items()}}
    with open(os.path.join(ref, "e2e.json"), "w") as f:
        json.dump(meta, f, indent=1)


def sgm_unet_name(name, layers_per_block):
    """The original (SGM / LDM) name of a diffusers SDXL U-Net module, as kohya's sd-scripts
    train SDXL on that U-Net: input_blocks / middle_block / output_blocks numbering, resnet
    layers as in_layers.2, out_layers.3, emb_layers.1, skip_connection, the downsampler's op."""
    parts = name.split(".")
    step = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}

    def inner(kind, rest):
        if kind == "resnets":
            return [resnet[rest[0]]] + rest[1:]
        return rest

    if parts[0] == "down_blocks":
        b, kind, l, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * step + layers_per_block}.0.op"
        j = 0 if kind == "resnets" else 1
        return ".".join([f"input_blocks.{1 + b * step + l}.{j}"] + inner(kind, rest))
    if parts[0] == "mid_block":
        kind, l, rest = parts[1], int(parts[2]), parts[3:]
        i = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, l)]
        return ".".join([f"middle_block.{i}"] + inner(kind, rest))
    if parts[0] == "up_blocks":
        b, kind, l, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            # (SDXL's up blocks with an upsampler all have attentions: it is module 2)
            return f"output_blocks.{b * step + layers_per_block}.2.conv"
        j = 0 if kind == "resnets" else 1
        return ".".join([f"output_blocks.{b * step + l}.{j}"] + inner(kind, rest))
    raise ValueError(name)


def kohya_xl_lora(pipe, seed):
    """A kohya SDXL LoRA in sd-scripts' naming: the U-Net's layers by their original (SGM)
    names (attention, projections, feed-forward, and as LoCon the resnets' convolutions, time
    projections, shortcuts and the resamplers), both text encoders as lora_te1_ / lora_te2_."""
    g = torch.Generator().manual_seed(seed)
    out = {}

    def add(key, weight):
        add_lora_layer(out, key, weight, g)

    lpb = pipe.unet.config.layers_per_block
    count = 0
    for name, mod in pipe.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")) or (
            "resnets" in name and name.endswith(("conv1", "conv2", "time_emb_proj", "conv_shortcut"))
        ) or name.endswith(("downsamplers.0.conv", "upsamplers.0.conv")):
            add("lora_unet_" + sgm_unet_name(name, lpb).replace(".", "_"), mod.weight)
            count += 1
    for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
        for name, mod in encoder.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                name = name if name.startswith("text_model.") else "text_model." + name
                add(f"{prefix}_{name.replace('.', '_')}", mod.weight)
                count += 1
    return out, count


def peft_xl_lora(pipe, path):
    """A diffusers / PEFT SDXL LoRA (rank 4, alpha 8 in the metadata) on the U-Net's attention
    and both text encoders, saved as StableDiffusionXLPipeline saves one."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(12)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    te2_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["k_proj", "fc1"])
    pipe.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, pipe.text_encoder)
    inject_adapter_in_model(te2_cfg, pipe.text_encoder_2)
    type(pipe).save_lora_weights(
        os.path.dirname(path),
        unet_lora_layers={k: v.half() for k, v in get_peft_model_state_dict(pipe.unet).items()},
        text_encoder_lora_layers={k: v.half() for k, v in get_peft_model_state_dict(pipe.text_encoder).items()},
        text_encoder_2_lora_layers={k: v.half() for k, v in get_peft_model_state_dict(pipe.text_encoder_2).items()},
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=te2_cfg.to_dict(),
        weight_name=os.path.basename(path),
    )


def record_sdxl_addons(out):
    """SDXL LoRAs (kohya's SGM naming and PEFT) on tiny_xl, fused as diffusers fuses them:
    addons/kohya_xl.safetensors, addons/peft_xl.safetensors, reference/tiny_xl/lora-*.png;
    then the embeddings and clip skip."""
    from diffusers import StableDiffusionXLPipeline

    model_dir = os.path.join(out, "models", "tiny_xl")

    def load():
        return StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, add_watermarker=False)

    addons = os.path.join(out, "addons")
    ref = os.path.join(out, "reference", "tiny_xl")
    kohya = os.path.join(addons, "kohya_xl.safetensors")
    lora, layers = kohya_xl_lora(load(), 21)
    save_file(lora, kohya)
    peft = os.path.join(addons, "peft_xl.safetensors")
    peft_xl_lora(load(), peft)
    with torch.no_grad():
        for name, loras in {"kohya-0.8": [(kohya, 0.8)], "peft-1.0": [(peft, 1.0)],
                            "kohya-0.8+peft-0.5": [(kohya, 0.8), (peft, 0.5)]}.items():
            pipe = load()
            before = {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder", "text_encoder_2")
                      for k, v in getattr(pipe, part).state_dict().items()}
            for path, scale in loras:
                pipe.load_lora_weights(path)
                pipe.fuse_lora(lora_scale=scale)
                pipe.unload_lora_weights()
            if name == "kohya-0.8":
                # every layer of the file reached its module (diffusers drops keys it cannot
                # place only with a warning)
                changed = sum(1 for part in ("unet", "text_encoder", "text_encoder_2")
                              for k, v in getattr(pipe, part).state_dict().items()
                              if not torch.equal(v, before[f"{part}.{k}"]))
                assert changed == layers, (changed, layers)
            save_seed42_image(pipe, os.path.join(ref, f"lora-{name}.png"), prompt=E2E_PROMPT, negative_prompt=E2E_NEGATIVE)
    record_sdxl_embeddings(out, load)
    record_sdxl_clip_skip(out, load)
    record_sdxl_webui(out, load)


# the SDXL embeddings' words and the prompts that use them
SDXL_EMBEDDINGS = {"shinyxl": 1, "dullxl": 2}
SDXL_EMBEDDING_PROMPT = "a shinyxl cat on a beach"
SDXL_EMBEDDING_NEGATIVE = "blurry, dullxl"


def record_sdxl_embeddings(out, load):
    """SDXL embeddings as the web UI's SDXL files hold them (clip_l and clip_g vectors, the
    word the file's stem; one of 1 vector, one of 2) in addons/xl_emb/, and the image diffusers
    makes after load_textual_inversion into each encoder and tokenizer under that word."""
    emb_dir = os.path.join(out, "addons", "xl_emb")
    os.makedirs(emb_dir, exist_ok=True)
    pipe = load()
    g = torch.Generator().manual_seed(31)
    for word, n in SDXL_EMBEDDINGS.items():
        vectors = {"clip_l": torch.randn((n, pipe.text_encoder.config.hidden_size), generator=g),
                   "clip_g": torch.randn((n, pipe.text_encoder_2.config.hidden_size), generator=g)}
        save_file(vectors, os.path.join(emb_dir, f"{word}.safetensors"))
        pipe.load_textual_inversion(vectors["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(vectors["clip_g"], token=word, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        save_seed42_image(pipe, os.path.join(out, "reference", "tiny_xl", "embeddings.png"),
                          prompt=SDXL_EMBEDDING_PROMPT, negative_prompt=SDXL_EMBEDDING_NEGATIVE)


def webui_encode_xl(pipe, prompt):
    """The web UI's SDXL conditioning of a prompt in its syntax: each embedder (CLIP-L, then
    OpenCLIP-G) chunks the prompt with its own tokenizer and takes each chunk's second-to-last
    hidden state, weighted with the mean restored ("Original") per embedder and chunk; the
    chunks' two states side by side, the chunks one after the other; the pooled embedding is
    the first chunk's, unweighted."""
    chunks = [webui_chunks(pipe.tokenizer, prompt, {}), webui_chunks(pipe.tokenizer_2, prompt, {})]
    assert len(chunks[0]) == len(chunks[1])
    zs, pooled = [], None
    for c1, c2 in zip(*chunks):
        parts = []
        for (ids, ws), encoder in ((c1, pipe.text_encoder), (c2, pipe.text_encoder_2)):
            o = encoder(torch.tensor([ids]), output_hidden_states=True)
            if pooled is None and encoder is pipe.text_encoder_2:
                pooled = o.text_embeds
            z = o.hidden_states[-2]
            original_mean = z.mean()
            z = z * torch.tensor(ws).reshape(1, -1, 1).expand(z.shape)
            parts.append(z * (original_mean / z.mean()))
        zs.append(torch.cat(parts, dim=-1))
    return torch.hstack(zs), pooled


def seed42_loop_xl(pipe, cond, uncond, path):
    """seed42_loop for SDXL, each half (context, pooled) with the default size conditioning."""
    from PIL import Image

    g = torch.Generator("cpu").manual_seed(42)
    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(1, unet.config.in_channels, size, size, torch.float32, "cpu", g)
    sched.set_timesteps(E2E_STEPS)
    extra = pipe.prepare_extra_step_kwargs(g, 0.0)
    # (prepare_latents has scaled by init_noise_sigma)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        u, c = (unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                for ctx, pooled in (uncond, cond))
        latents = sched.step(u + 7.5 * (c - u), t, latents, **extra).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    Image.fromarray((image * 255).round().astype("uint8")).save(path)


def record_sdxl_webui(out, load):
    """SDXL images for prompts in the web UI's syntax (webui_encode_xl): equal chunk counts
    through the pipeline, unequal ones through seed42_loop_xl with the halves apart (checked
    against the pipeline on an equal case): reference/tiny_xl/a1111-*.png, the prompts in
    reference/tiny_xl/a1111.json."""
    import numpy as np
    from PIL import Image

    pipe = load()
    ref = os.path.join(out, "reference", "tiny_xl")
    cases = {
        "emphasis": ("((masterpiece)), a [cat] on a (beach:0.7)", "(blurry:1.4)"),
        "break": ("a (red fox:1.3), [blurry], snow BREAK lake", "(ugly:1.2), lowres BREAK (noise:0.8)"),
        "long": ("one, two, three four five six seven eight nine ten " * 9, "[lowres]"),
    }
    with torch.no_grad():
        for name, (p, n) in cases.items():
            (pe, pp), (ne, npool) = webui_encode_xl(pipe, p), webui_encode_xl(pipe, n)
            path = os.path.join(ref, f"a1111-{name}.png")
            if pe.shape == ne.shape:
                save_seed42_image(pipe, path, prompt_embeds=pe, negative_prompt_embeds=ne,
                                  pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npool)
                # the loop gives the pipeline's image
                seed42_loop_xl(pipe, (pe, pp), (ne, npool), path + ".loop.png")
                a, b = (np.asarray(Image.open(f), dtype=np.int16) for f in (path, path + ".loop.png"))
                os.remove(path + ".loop.png")
                assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
            else:
                seed42_loop_xl(pipe, (pe, pp), (ne, npool), path)
            print(f"SDXL a1111 {name}: {pe.shape[1] // 77} and {ne.shape[1] // 77} chunks")
    with open(os.path.join(ref, "a1111.json"), "w") as f:
        json.dump(cases, f, indent=1)


def record_sdxl_clip_skip(out, load):
    """SDXL with the web UI's "Clip skip: N" (diffusers clip_skip=N-1: each encoder's hidden
    state N layers before its last, the pooled embedding unchanged) for the prompt and the
    negative prompt alike (diffusers 0.42 skips in the positive prompt only, so the embeddings
    are made here and passed in): reference/tiny_xl/clip_skip/N.png."""
    pipe = load()
    ref = os.path.join(out, "reference", "tiny_xl", "clip_skip")
    os.makedirs(ref, exist_ok=True)
    layers = min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers)
    with torch.no_grad():
        for n in range(2, layers + 1):
            pe, _, pp, _ = pipe.encode_prompt(E2E_PROMPT, device="cpu", do_classifier_free_guidance=False, clip_skip=n - 1)
            ne, _, npool, _ = pipe.encode_prompt(E2E_NEGATIVE, device="cpu", do_classifier_free_guidance=False, clip_skip=n - 1)
            save_seed42_image(pipe, os.path.join(ref, f"{n}.png"), prompt_embeds=pe, negative_prompt_embeds=ne,
                              pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npool)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--full-size", metavar="DIR", help="write a full-size random SD 1.5 to DIR and exit")
    ap.add_argument("--full-size-xl", metavar="DIR", help="write a full-size random SDXL base to DIR and exit")
    ap.add_argument("--only-real-world", action="store_true", help="only record the real-world config variants (reference/real_world)")
    ap.add_argument("--only-clip-skip", action="store_true", help="only record the clip skip images (reference/*/clip_skip)")
    ap.add_argument("--only-cuda-rng", action="store_true", help="only record torch's CUDA generator references (reference/randn_cuda.safetensors, reference/tiny/rng_cuda)")
    ap.add_argument("--only-addons", action="store_true", help="only record the LoRA, embedding and web UI syntax fixtures (addons/, reference/addons)")
    ap.add_argument("--only-schedulers", nargs="+", metavar="CASE", help="only record these scheduler cases, merged into reference/schedulers.*")
    ap.add_argument("--scheduler-names", nargs="+", metavar="NAME", help="with --only-schedulers: only these schedulers")
    ap.add_argument("--only-vae-encoder", action="store_true", help="only record the VAE encoder references (reference/*/vae_encoder.safetensors)")
    ap.add_argument("--only-vae-tiling", action="store_true", help="only record the VAE tiling references (reference/vae_tiling)")
    ap.add_argument("--only-inpaint", action="store_true", help="only record the inpainting references (models/tiny_inpaint_unet, reference/inpaint)")
    ap.add_argument("--only-img2img", action="store_true", help="only record the image-to-image references (img2img/, reference/img2img)")
    ap.add_argument("--only-sdxl", action="store_true", help="only build the tiny SDXL and record its references (models/tiny_xl, reference/tiny_xl)")
    ap.add_argument("--only-sdxl-asymmetric", action="store_true", help="only record the asymmetric SDXL U-Net (models/tiny_xl_asym_unet, reference/tiny_xl/asym_unet.safetensors)")
    ap.add_argument("--only-sdxl-refiner", action="store_true", help="only record the SDXL refiner references (models/tiny_xl_refiner_unet, reference/tiny_xl/refiner)")
    ap.add_argument("--only-sdxl-inpaint9", action="store_true", help="only record the 9-channel SDXL inpainting references (models/tiny_xl_inpaint_unet, reference/tiny_xl/inpaint9)")
    ap.add_argument("--only-sdxl-addons", action="store_true", help="only record the SDXL add-on fixtures: LoRAs, embeddings, clip skip, the web UI syntax (addons/*_xl*, reference/tiny_xl/{lora-*,embeddings.png,clip_skip,a1111*})")
    ap.add_argument("--only-sde-images", action="store_true", help="only record the dpmpp_sde images (reference/tiny/sde)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.full_size:
        full_size(args.full_size)
        return
    if args.full_size_xl:
        full_size_xl(args.full_size_xl)
        return
    out = os.path.abspath(args.out)
    if args.only_real_world:
        record_real_world(out)
        return
    if args.only_cuda_rng:
        record_cuda_rng(out)
        return
    if args.only_addons:
        record_addons(out)
        return
    if args.only_schedulers:
        names = set(args.scheduler_names) if args.scheduler_names else None
        record_schedulers(os.path.join(out, "reference"), set(args.only_schedulers), names)
        return
    if args.only_vae_encoder:
        for name in MODELS:
            record_vae_encoder(name, os.path.join(out, "models", name), os.path.join(out, "reference"))
        return
    if args.only_vae_tiling:
        record_vae_tiling(out)
        return
    if args.only_inpaint:
        record_inpaint(out)
        return
    if args.only_img2img:
        record_img2img(out)
        return
    if args.only_sde_images:
        record_sde_images(out)
        return
    if args.only_sdxl:
        record_sdxl(out)
        record_sdxl_single_file(out)
        record_sdxl_img2img(out)
        record_sdxl_inpaint(out)
        record_sdxl_inpaint9(out)
        record_sdxl_asymmetric(out)
        record_sdxl_refiner(out)
        return
    if args.only_sdxl_asymmetric:
        record_sdxl_asymmetric(out)
        return
    if args.only_sdxl_refiner:
        record_sdxl_refiner(out)
        return
    if args.only_sdxl_inpaint9:
        record_sdxl_inpaint9(out)
        return
    if args.only_sdxl_addons:
        record_sdxl_addons(out)
        return
    if args.only_clip_skip:
        for name in MODELS:
            record_clip_skip(name, os.path.join(out, "models", name), os.path.join(out, "reference"))
        return
    ref = os.path.join(out, "reference")
    os.makedirs(ref, exist_ok=True)
    print(f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    record_randn(ref)
    record_schedulers(ref)
    for name, spec in MODELS.items():
        model_dir = build_model(name, spec, out)
        record_model(name, model_dir, ref)
        record_clip_skip(name, model_dir, ref)
        record_vae_encoder(name, model_dir, ref)
    record_single_files(out)
    record_bin(out)
    record_real_world(out)
    record_addons(out)
    record_cuda_rng(out)
    record_sde_images(out)
    record_img2img(out)
    record_inpaint(out)
    record_vae_tiling(out)
    record_sdxl(out)
    record_sdxl_single_file(out)
    record_sdxl_img2img(out)
    record_sdxl_inpaint(out)
    record_sdxl_inpaint9(out)
    record_sdxl_asymmetric(out)
    record_sdxl_refiner(out)
    record_sdxl_addons(out)
    with open(os.path.join(ref, "versions.json"), "w") as f:
        json.dump(
            {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
