#!/usr/bin/env bash
# The device checks for one multi-GPU host, under 5 minutes. From the repository root:
#     bash benchmarks/gpu.sh
# Runs, each step logged and timed, going on past a failing one:
#   1. hf-fsdp-loadfix check --device cuda --json     (one rank per GPU, NCCL, with and without the package)
#   2. benchmarks/stream.py at one size (0.49B), 2 ranks, 1 repeat (host RAM of rank 0/1 under bf16 mixed precision)
#   3. examples/train.py under accelerate launch with examples/accelerate_fsdp2.yaml, with and without the package
#      (HF_FSDP_LOADFIX=0): the losses should be equal
# Writes everything under benchmarks/results/gpu/, with summary.tsv (step, exit status, seconds). Installs nothing
# but the package itself (pip install --no-deps -e .) when it is not importable. Exit status: 1 if a step failed.
# Time limits: check 120 s, stream 90 s, each training run 45 s (about 3 minutes in all when nothing hangs).
set -u
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
PY=${PYTHON:-python}
printf 'step\texit_status\tseconds\n' > "$OUT/summary.tsv"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, output to $OUT/NAME.log, record the status
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.log"
    start=$(date +%s)
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >> "$OUT/summary.tsv"
    echo "== $name: exit status $rc ($(($(date +%s) - start)) s)"
    tail -n 5 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
    return 0
}

$PY -c "import hf_fsdp_loadfix" 2>/dev/null || step install 120 $PY -m pip install --no-deps -e .
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
{
    nvidia-smi -L 2>&1
    $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1
    $PY -m hf_fsdp_loadfix status 2>&1
} > "$OUT/environment.txt"
echo "GPUs: $NGPU (details in $OUT/environment.txt)"
NPROC=$((NGPU < 2 ? 2 : NGPU))

# 1. the check; its JSON alone on stdout, so it goes to check.json and the log keeps stderr
echo "== check: hf-fsdp-loadfix check --device cuda --json > $OUT/check.json"
start=$(date +%s)
timeout 120 $PY -m hf_fsdp_loadfix check --device cuda --json > "$OUT/check.json" 2> "$OUT/check.log"
rc=$?
printf 'check\t%s\t%s\n' "$rc" "$(($(date +%s) - start))" >> "$OUT/summary.tsv"
echo "== check: exit status $rc"; tail -n 5 "$OUT/check.log"
[ "$rc" -eq 0 ] || failed=1

# 2. the rank-0 streaming benchmark at one size (CPU gloo ranks: host RAM, as in benchmarks/results/stream-*)
step stream 90 $PY benchmarks/stream.py --sizes 0.5 --repeat 1 --nproc 2 --out "$OUT"

# 3. the example, as the README tells a newcomer to run it
for package in 1 0; do
    step "train-HF_FSDP_LOADFIX=$package" 45 env HF_FSDP_LOADFIX=$package $PY -m accelerate.commands.launch \
        --config_file examples/accelerate_fsdp2.yaml --num_processes "$NPROC" examples/train.py \
        --model "${TMPDIR:-/tmp}/hf_fsdp_loadfix_gpu_tiny_llama" --out "$OUT/train-$package"
done
for package in 1 0; do
    echo "losses, HF_FSDP_LOADFIX=$package: $(grep -ho '"losses": \[[^]]*\]' "$OUT/train-$package"/rank*.json 2>/dev/null \
        | sort -u | tr '\n' ' ')"
done

echo "== summary ($OUT/summary.tsv)"
cat "$OUT/summary.tsv"
exit "$failed"
