"""GPU parity: sdgen's images on a CUDA device against the committed diffusers (CPU, f32)
references, and its f16/bf16 images against its own f32 ones.

    python3 scripts/gpu_parity.py SDGEN_BINARY OUT_DIR [DEVICE (default cuda)]

Runs every scheduler of both tiny models (tests/fixtures/reference/*/e2e.json, seeds 42 and
43) as one prompts file per model and precision, so each is one process. Prints one line per
model and precision (max and mean |difference| in 1/255, images over the bound) and exits 1 when
a bound is broken: f32 within 2/255 of diffusers (the project's rule), f16/bf16 within 8/255 of
f32 and never NaN or black (#20). Needs numpy and Pillow.
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
exe, out = sys.argv[1], pathlib.Path(sys.argv[2])
device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
failed = False


def load(p):
    return np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)


for model in ["tiny", "tiny2"]:
    e2e = json.loads((ROOT / f"tests/fixtures/reference/{model}/e2e.json").read_text())
    lines = [
        json.dumps({
            "prompt": e2e["prompt"], "negative_prompt": e2e["negative_prompt"],
            "steps": e2e["steps"], "seed": e2e["seeds"][0], "num_images": len(e2e["seeds"]),
            "scheduler": run["scheduler"], "guidance": run["guidance"],
            "output": f"{name}-{{seed}}.png",
        })
        for name, run in e2e["runs"].items()
    ]
    prompts = out / f"{model}-prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    for dtype in ["f32", "f16", "bf16"]:
        folder = out / model / dtype
        folder.mkdir(parents=True, exist_ok=True)
        # each line names its own output, relative to the working folder
        cmd = [exe, "--prompts", str(prompts), "-m", str(ROOT / f"tests/fixtures/models/{model}"),
               "--device", device, "--dtype", dtype, "--quiet"]
        r = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{model} {dtype}: sdgen failed ({r.returncode}): {r.stderr.strip()[-500:]}")
            failed = True
            continue
        diffs, over = [], []
        for name in e2e["runs"]:
            for seed in e2e["seeds"]:
                png = f"{name}-{seed}.png"
                got = load(folder / png)
                if dtype == "f32":
                    want, bound = load(ROOT / f"tests/fixtures/reference/{model}/e2e/{png}"), 2
                else:
                    want, bound = load(out / model / "f32" / png), 8
                d = np.abs(got - want)
                diffs.append(d)
                if d.max() > bound or got.max() == 0:
                    over.append(f"{png}: {d.max()}")
        alld = np.concatenate([d.ravel() for d in diffs])
        print(f"{model} {dtype}: {len(diffs)} images, max {alld.max()}/255, mean {alld.mean():.4f}/255"
              + (f", over the bound: {over}" if over else ""))
        failed |= bool(over)
sys.exit(1 if failed else 0)
