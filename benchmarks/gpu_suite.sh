#!/usr/bin/env bash
# One command for a lent GPU (one H200): the anchor's "ref" step and ours in the same call, memory measured,
# precompute against a bare VAE encode; then ONE table of ratios against the reference. About 8 minutes.
#
#   bash benchmarks/gpu_suite.sh --prepare     # here, once, with pip and the checkout's ../shared: fills
#                                              #   .gpu_suite/ (git-ignored) with gpu_anchor.py and the wheels
#                                              #   the GPU machine lacks (diffusers, datasets and their needs)
#   bash benchmarks/gpu_suite.sh               # there: carry .gpu_suite with the working tree
#   bash benchmarks/gpu_suite.sh --cpu_smoke   # here: every step at toy size on the CPU (a plumbing check)
#
# Logs and JSON lines go to $OUT (the device tool's folder that comes back) or to a temporary folder.
# Every step runs under its own time limit, so one slow part cannot eat the others; the compiled step goes
# last and gets what is left of the budget (SUITE_BUDGET_S, default 480 s). On a fresh machine the compile
# alone took about 4 minutes in the anchor's call: SUITE_BUDGET_S=540 gives it more room and stays inside
# the device tool's 10 minutes per command.
set -u -o pipefail

MODE=gpu
case "${1:-}" in
--prepare) MODE=prepare ;;
--cpu_smoke) MODE=smoke ;;
"") ;;
*) echo "usage: bash benchmarks/gpu_suite.sh [--prepare | --cpu_smoke]" >&2 && exit 2 ;;
esac

cd "$(dirname "$0")/.."
SUITE=.gpu_suite
# Wheels the GPU machine's image lacks (its python is 3.12; torch, transformers, accelerate, peft are there).
WHEELS="diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0"

if [ "$MODE" = prepare ]; then
	mkdir -p "$SUITE/wheels"
	exclude="$(git rev-parse --git-path info/exclude)"
	if ! grep -qx "/$SUITE/" "$exclude" 2>/dev/null; then
		[ -s "$exclude" ] && [ -n "$(tail -c1 "$exclude")" ] && echo >>"$exclude"
		echo "/$SUITE/" >>"$exclude"
	fi
	install -m 644 ../shared/bench/gpu_anchor.py "$SUITE/gpu_anchor.py" || exit 1
	platforms=""
	for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
		platforms="$platforms --platform $tag"
	done
	# shellcheck disable=SC2086 # word splitting intended
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$platforms -d "$SUITE/wheels" $WHEELS || exit 1
	du -sh "$SUITE"
	echo "ready: run 'bash benchmarks/gpu_suite.sh' on the GPU machine with carry [\"$SUITE\"]"
	exit 0
fi

OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/suite.log"
BUDGET="${SUITE_BUDGET_S:-480}"
# The anchors (validation), the lowest-memory full fine-tune, Adafactor without the fused pass, LoRA.
MEMORY_CONFIGS="${SUITE_MEMORY_CONFIGS:-ref,ref+gc,bf16+adafactor,lowest,lora,lora+gc}"
START=$SECONDS
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE

if [ "$MODE" = gpu ] && ls "$SUITE"/wheels/*.whl >/dev/null 2>&1; then
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
		"$SUITE"/wheels/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see suite.log)"
	export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-python3}"
ANCHOR=""
for candidate in "${GPU_ANCHOR:-}" shared/bench/gpu_anchor.py "$SUITE/gpu_anchor.py" ../shared/bench/gpu_anchor.py; do
	if [ -n "$candidate" ] && [ -f "$candidate" ]; then ANCHOR="$candidate" && break; fi
done

# run NAME SECONDS COMMAND...: one step under its own limit; output to the log, status to the terminal.
run() {
	local name="$1" limit="$2"
	shift 2
	local begin=$SECONDS
	echo "=== $name (limit ${limit}s): $*" >>"$LOG"
	timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
	local rc=$?
	local took=$((SECONDS - begin))
	local state=ok
	[ $rc -eq 124 ] || [ $rc -eq 137 ] && state="timed out"
	[ $rc -ne 0 ] && [ "$state" = ok ] && state="failed (rc $rc)"
	echo "$name: $state in ${took}s" | tee -a "$LOG" >>"$OUT_DIR/steps.txt"
	echo "$name: $state in ${took}s"
}
left() { echo $((BUDGET - (SECONDS - START))); }

: >"$OUT_DIR/steps.txt"
rm -f "$OUT_DIR"/anchor.jsonl "$OUT_DIR"/train_step*.jsonl "$OUT_DIR"/memory.jsonl
if [ "$MODE" = gpu ]; then
	"$PY" -c "import torch, diffusers, datasets; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 |
		tee -a "$LOG" || exit 1
	TS=(--sdxl_architecture --sdpa_backend cudnn)
	[ -n "$ANCHOR" ] && run "anchor ref" 120 env OUT="$OUT_DIR" "$PY" "$ANCHOR" --variants ref --no_vae
	# gpu_anchor.py's ref is the reference; train_step's copy of its method is left out to save time.
	run "train_step eager" 150 "$PY" benchmarks/train_step.py "${TS[@]}" --variants bare,step,loop \
		--json "$OUT_DIR/train_step.jsonl"
	run "memory measured" 150 "$PY" benchmarks/memory.py --no_estimate --configs "$MEMORY_CONFIGS" \
		--estimates benchmarks/memory_estimates.jsonl --json "$OUT_DIR/memory.jsonl"
	run "precompute" 90 "$PY" benchmarks/precompute.py --sdxl_architecture --images 96
	[ -f benchmarks/vae.py ] && run "vae" 60 "$PY" benchmarks/vae.py --sdxl_architecture
	[ -f benchmarks/upscale.py ] && run "upscale" 60 "$PY" benchmarks/upscale.py --sdxl_architecture
	remaining=$(left)
	if [ "$remaining" -gt 60 ]; then
		run "train_step compiled" "$remaining" "$PY" benchmarks/train_step.py "${TS[@]}" --compile --variants loop \
			--json "$OUT_DIR/train_step_compiled.jsonl"
	else
		echo "train_step compiled: skipped (${remaining}s of the budget left)" | tee -a "$OUT_DIR/steps.txt"
	fi
else
	TS=(--tiny_unet_config --device cpu --resolution 128 --batch_size 2 --warmup 1 --steps 2 --num_workers 0)
	[ -n "$ANCHOR" ] && run "anchor ref" 300 env OUT="$OUT_DIR" "$PY" "$ANCHOR" --tiny --variants ref --no_vae --steps 2
	run "train_step eager" 300 "$PY" benchmarks/train_step.py "${TS[@]}" --variants ref,bare,step,loop \
		--json "$OUT_DIR/train_step.jsonl"
	run "memory estimated" 600 "$PY" benchmarks/memory.py --tiny --configs ref,lowest,lora --json "$OUT_DIR/memory.jsonl"
	run "precompute" 300 "$PY" benchmarks/precompute.py --images 8
	[ -f benchmarks/vae.py ] && run "vae" 300 "$PY" benchmarks/vae.py
	[ -f benchmarks/upscale.py ] && run "upscale" 300 "$PY" benchmarks/upscale.py
	# Inductor's CPU compile of even the toy UNet outlasts ten minutes on a small shared machine: the smoke
	# runs the --compile path with dynamo switched off (flags, records); the GPU run compiles for real.
	run "train_step compiled (dynamo off)" 300 env TORCHDYNAMO_DISABLE=1 "$PY" benchmarks/train_step.py "${TS[@]}" \
		--compile --variants loop --json "$OUT_DIR/train_step_compiled.jsonl"
fi
[ -z "$ANCHOR" ] && echo "anchor ref: skipped (no gpu_anchor.py: run --prepare, or set GPU_ANCHOR)" | tee -a "$OUT_DIR/steps.txt"

# One table: every throughput against the anchor's ref from this call (or train_step's own ref without it).
"$PY" - "$OUT_DIR" "$LOG" "$MODE" <<'PYTHON' | tee "$OUT_DIR/summary.txt"
import json, re, sys
from pathlib import Path

out, log, mode = Path(sys.argv[1]), Path(sys.argv[2]).read_text(errors="replace"), sys.argv[3]
sdpa = ", cuDNN SDPA" if mode == "gpu" else ""


def lines(name):
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


anchor = lines("anchor.jsonl")
ref = next((r["samples_per_s"] for r in anchor if r.get("what") == "unet_step" and "samples_per_s" in r), None)
flops = next((r["train_flops_per_sample_T"] for r in anchor if r.get("what") == "unet_flops"), None)
peak = next((r["tflops"] for r in anchor if r.get("what") == "bf16_matmul_8192"), None)
rows = [("gpu_anchor.py ref (the reference)", ref)] if ref else []
names = {"ref": "train_step ref (same method)", "bare": f"bare step, fused AdamW{sdpa}",
         "step": f"trainer step{sdpa}", "loop": f"trainer loop (data + logging){sdpa}"}
compiled = "compiled" if mode == "gpu" else "--compile path, dynamo off"
for name, how in (("train_step.jsonl", "eager"), ("train_step_compiled.jsonl", compiled)):
    for r in lines(name):
        rows.append((f"{names.get(r['path'], r['path'])}, {how}", r["batch"] / r["s_per_step"]))
if ref is None:  # no anchor in this call: train_step's copy of its method stands in
    ref = next((rate for label, rate in rows if label.startswith("train_step ref")), None)
print("\n| step | samples/s | x ref | MFU |\n|---|---|---|---|")
for label, rate in rows:
    ratio = f"{rate / ref:.2f}" if ref else "-"
    mfu = f"{100 * rate * flops / peak:.0f}%" if flops and peak else "-"
    print(f"| {label} | {rate:.2f} | {ratio} | {mfu} |")
memory = lines("memory.jsonl")
for r in memory:  # measured on the GPU; the smoke estimates the toy UNet (MiB)
    if r.get("measured_GiB") is not None:
        estimate = f", estimate {r['estimate_GiB']:.1f}" if r.get("estimate_GiB") else ""
        print(f"| memory {r['key']} ({r['description']}), measured{estimate} | {r['measured_GiB']:.1f} GiB | | |")
    elif r.get("estimate_GiB") is not None:
        print(f"| memory {r['key']} ({r['description']}), toy UNet, estimated | {1024 * r['estimate_GiB']:.1f} MiB | | |")
match = re.search(r"precompute / bare\s*\|\s*\|\s*([\d.]+)%", log)
if match:
    print(f"| precompute / bare VAE encode | {match.group(1)}% | | |")
print()
print((out / "steps.txt").read_text())
PYTHON
echo "total ${SECONDS}s; logs in $OUT_DIR"
