#!/usr/bin/env bash
# The GPU check: unizoo end to end on one CUDA GPU in at most 8 minutes, results committed under
# benchmarks/results/cuda-<gpu>/ (README, "On a GPU").
#
#   bash benchmarks/gpu_check.sh            # from the repository root, with unizoo installed (pip install -e .)
#   OUT=/somewhere bash benchmarks/gpu_check.sh   # write the results elsewhere (default benchmarks/results)
#
# Steps, each under its own time limit, each logged to <results>/gpu_check/<step>.log; a step that fails
# or runs out of time is recorded as such and the next one runs. The last step writes gpu_check.md and
# gpu_check.json: every step's status and time, every row of the benchmark tables that did not run (a
# benchmark records a failed row and goes on, exit 0), and the numbers the GPU lines of the issue ask for
# (generation images/s, first-run seconds, MFU and the ratio to diffusers at DiT-XL/2).
#   1. the cuda-marked tests, all but the benchmarks' quick run               (60 s)
#   2. the default `unizoo train` on the GPU from an empty cache, timed       (120 s)
#   3. the default recipe's bare step against the whole Lightning step, and
#      what the host pays per step (operators, the step on one image, each
#      part's share), eager: step 2 trains compiled (`compile: auto`)        (40 s)
#   4. the attention backends                                                 (30 s)
#   5. unizoo vs diffusers' DiT at DiT-S/2, batch 256, bf16, every switch     (65 s)
#   6. the same at DiT-XL/2                                                   (120 s)
#   7. the design-space variants at sizes S and XL (VAE vs CLIP, two cells)   (45 s)
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is visible to torch ($(python -c 'import torch; print(torch.__version__)')); nothing to check" >&2
    exit 2
fi
OUT_ROOT="${OUT:-benchmarks/results}"
MACHINE="$(python -c 'import torch; from benchmarks.report import machine_slug; print(machine_slug(torch.device("cuda")))')"
RESULTS="$OUT_ROOT/$MACHINE"
LOGS="$RESULTS/gpu_check"
# This check's own folder starts empty, and the summary reads only the tables written after this moment: a step
# that fails leaves an earlier check's files in place (committed ones among them), never to be read as this one's.
rm -rf "$LOGS"
mkdir -p "$LOGS"
date +%s > "$LOGS/started"
STATUS="$LOGS/steps.tsv"
printf 'step\tstatus\tms\tlimit_s\n' > "$STATUS"
echo "gpu_check: $MACHINE, results in $RESULTS" >&2

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "gpu_check: $name (at most ${limit} s): $*" >&2
    local started ended rc status
    started=$(date +%s%N)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    ended=$(date +%s%N)
    case $rc in
        0) status=ok ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( (ended - started) / 1000000 ))" "$limit" >> "$STATUS"
    echo "gpu_check: $name: $status" >&2
}

# Not the benchmarks' quick run (`test_quick_run_on_cuda`, for `pytest -m cuda` by hand): the steps below run the same
# benchmarks on CUDA at their real sizes, and the summary lists every row of theirs that did not run, as that test
# asserts. Its compiles alone could take this step's minute, and with it the other tests' status.
step tests 60 python -m pytest -q -m cuda -p no:cacheprovider tests --deselect tests/test_benchmarks.py::test_quick_run_on_cuda

SCRATCH="$(mktemp -d)"  # an empty cache, and a run directory whose checkpoints stay out of the repository
step first_run 120 env UNIZOO_CACHE="$SCRATCH/cache" unizoo train trainer.accelerator=gpu "run_dir=$SCRATCH/run" progress_interval=10
mkdir -p "$LOGS/first_run"
for kept in metrics.json train.log recipe.yaml samples_generation.png; do
    [ -f "$SCRATCH/run/$kept" ] && cp "$SCRATCH/run/$kept" "$LOGS/first_run/"
done
rm -rf "$SCRATCH"

# Whether the generation stage's images/s is bound by the loop, the model's kernels or the host's dispatching.
# 300 whole steps, not the benchmark's 500, to fit its limit: the window then holds no validation (every 500
# steps), and its one checkpoint (every min(500, the stage's 320 steps): at its last step) is written after the
# last block is timed (Lightning runs checkpoint callbacks last), so its overhead is the per-step loop's alone,
# a little below what the CPU tables (500 steps, one checkpoint and one validation in the window) include. The generator and the language model run eager here
# (compile=false): the first run above trained them compiled (`compile: auto` on CUDA), so the check holds both, and this step
# has no compile time to fit in its limit. 50 bare steps, not 100, for the same limit: the benchmark times
# them beside the one-image step and again between the whole steps' blocks.
step loop 40 python -m benchmarks.run loop --device cuda --loop-steps 300 --repeats 50 --loop-override compile=false --out "$OUT_ROOT"
step attention 30 python -m benchmarks.run attention --device cuda --out "$OUT_ROOT" --repeats 5
# The peer and variants benchmarks write their table after each group of rows, so a step stopped at its limit still
# leaves the rows it measured (the summary says which did not run). One "why" profile at S (the best-vs-best pair if
# unizoo is slower), none at XL, where each would rebuild two models of 750M and 830M parameters. At XL, batch 256,
# the fp32 rows fit no single GPU (about 145 GiB by the estimate; the bf16 ones about 79 GiB, which an H200 holds
# and an H100 does not): they are skipped for memory, and the bf16 rows are checked against the family's bf16 one.
step peer_s 65 python -m benchmarks.run peer --device cuda --peer-parts dit --peer-size S --batch 256 \
    --repeats 5 --warmup 2 --loss-steps 5 --row-time-limit 20 --max-profiles 1 --out "$OUT_ROOT"
step peer_xl 120 python -m benchmarks.run peer --device cuda --peer-parts dit --peer-size XL --batch 256 \
    --repeats 5 --warmup 2 --loss-steps 5 --row-time-limit 30 --max-profiles 0 --out "$OUT_ROOT"
# Two cells, VAE and CLIP targets under flow matching and joint training (BLIP3-o's efficiency comparison), at each
# size, not the whole grid (24 rows): each XL row builds, FLOP-counts, warms up and times a model of 1.65B parameters
# (with its EMA copy), built on the GPU itself.
step variants 45 python -m benchmarks.run variants --device cuda --sizes S XL --select objective=flow_matching strategy=joint \
    --batch 64 --repeats 3 --warmup 1 --out "$OUT_ROOT"

python -m benchmarks.gpu_summary "$RESULTS"
