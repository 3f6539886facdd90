#!/usr/bin/env bash
# Fuzzes sdgen's parsers of untrusted bytes for a fixed time each: the pickle reader, PyTorch
# zip checkpoints, safetensors files and the model's config files (src/fuzz_entry.rs, targets
# in fuzz/). Not part of CI. Needs a nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo +nightly install cargo-fuzz --locked
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET (default 300)] [TARGET...]
# Seeds come from the test fixtures; crashes land in fuzz/artifacts/<target>/ (a finding is
# any panic, abort, out-of-memory past 4 GiB, or an input taking more than 10 s).
# Record: 2026-12-04, commit 1bfcf94 + later src, AMD EPYC Zen 4, 2 cores: pickle 705k + 918k
# executions, torch_checkpoint 523k + 395k, safetensors 532k, config 404k (150/120 s each):
# no finding. Before the pickle reader was ours, the issue's memo bomb, 100k-deep nesting and
# short rebuild calls crashed candle's reader (tests/hostile_pickles.rs keeps those cases).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pickle torch_checkpoint safetensors config)

python3 - <<'PY'
import json, os, struct, zipfile, io
fx = "tests/fixtures"
def seed(target, name, data):
    d = os.path.join("fuzz/corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
# pickles: the fixtures' own data.pkl
for ck in [f"{fx}/single_file/tiny.ckpt", f"{fx}/bin/tiny-unet.bin"]:
    with zipfile.ZipFile(ck) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        seed("pickle", os.path.basename(ck) + ".pkl", z.read(pkl))
# a small torch checkpoint: two views of one float storage, written as torch writes them
def long1(v): return b"\x8a\x08" + struct.pack("<q", v)
def uni(s): return b"X" + struct.pack("<I", len(s)) + s.encode()
def ints(v): return b"(" + b"".join(long1(x) for x in v) + b"t"
def entry(name, off, size, stride):
    return (uni(name) + b"ctorch._utils\n_rebuild_tensor_v2\n((" + uni("storage") + b"ctorch\nFloatStorage\n"
            + uni("0") + uni("cpu") + long1(6) + b"tQ" + long1(off) + ints(size) + ints(stride)
            + b"\x89ccollections\nOrderedDict\n)RtR")
pkl = b"\x80\x02}(" + entry("w", 0, [2, 3], [3, 1]) + entry("t", 0, [3, 2], [1, 3]) + b"u."
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/data/0", struct.pack("<6f", *range(6)))
seed("torch_checkpoint", "small.ckpt", buf.getvalue())
seed("pickle", "small.pkl", pkl)
# safetensors: small valid files
for name, tensors in {"two": {"a": ("F32", [2], 8), "b": ("F16", [2, 2], 8)}, "one": {"x": ("BF16", [3], 6)}}.items():
    header, off = {}, 0
    for k, (dt, shape, n) in tensors.items():
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    seed("safetensors", name, struct.pack("<Q", len(h)) + h + bytes(off))
# configs: the fixtures' files behind their selector byte (and a step count)
for sel, rel in enumerate(["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]):
    for model in ["tiny", "tiny2"]:
        with open(f"{fx}/models/{model}/{rel}", "rb") as f:
            seed("config", f"{model}-{sel}", bytes([sel]) + f.read())
PY

status=0
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s"
    cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -timeout=10 -max_len=65536 -print_final_stats=1 \
        2>&1 | grep -E "^#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss|SUMMARY|ERROR|panicked|Test unit written" || true
    [ -z "$(ls -A "fuzz/artifacts/$t" 2>/dev/null)" ] || { echo "   findings in fuzz/artifacts/$t"; status=1; }
done
exit $status
