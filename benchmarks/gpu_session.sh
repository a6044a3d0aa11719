#!/usr/bin/env bash
# Every GPU figure of the project from one machine of two GPUs, in two calls of under 10 minutes:
#
#   bash benchmarks/gpu_session.sh 1   # lane A: iFlame interleaved training, GPU tests, iFlame vs full
#                                      #   (timing + face-acc), iFlame sample/eval, voxelisation speed
#                                      # lane B: iFlame full-attention training, the SS-VAE figures
#   bash benchmarks/gpu_session.sh 2   # train-iflame --gpus 1 vs 2 (both GPUs), then lane A: the
#                                      # Direct3D-S2 recipe; lane B: iFlame vs full timing (face-acc
#                                      # from phase 1's runs, kept in benchmarks/results), SS-VAE figures
#
# Lanes run side by side, one GPU each (CUDA_VISIBLE_DEVICES), so no timing shares a GPU. Every
# command is stopped by SIGINT (trainers checkpoint) at BUDGET_S seconds, so results always get packed.
# Results land in benchmarks/results/ and, with logs and run summaries, in $OUT/results.tgz.
# WORK (default /tmp/mf) holds datasets and checkpoints.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_session.sh 1|2}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
OUT=${OUT:-/tmp/mf-out}
WORK=${WORK:-/tmp/mf}
LOGS=$OUT/logs
mkdir -p "$OUT" "$LOGS" "$WORK" /tmp/site
export PYTHONUNBUFFERED=1 MESHFORGE_NO_PROGRESS=1

# The checkout itself is what runs: the two folders that install under other names are linked
# into place, and the wheel in .whl/ only contributes the entry points (its metadata). Packages the
# image lacks come from .gpu-deps (spconv, fla-core) and .whl (trimesh), each only when missing.
if [ -f .gpu-deps/site.tar.xz ]; then tar -xJf .gpu-deps/site.tar.xz -C /tmp/site || exit 1; fi
ln -sfn ../kernels meshforge/kernels && ln -sfn plugins meshforge_plugins || exit 1
for wheel in .whl/*.whl; do
  module=$(basename "$wheel" | cut -d- -f1)
  [ "$module" = meshforge ] || ! python3 -c "import $module" 2>/dev/null || continue
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" || exit 1
done
export PYTHONPATH=$PWD:/tmp/site
CLI="timed python3 -m meshforge_plugins.cli --seed 0"
python3 -c "import torch, spconv, fla, meshforge.kernels.ssa; print(torch.__version__, torch.cuda.device_count(), 'GPUs:', torch.cuda.get_device_name(0))" || exit 1

timed() {  # COMMAND... stopped at DEADLINE
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -gt 10 ] || { echo "skipped (out of time): $*"; return 124; }
  timeout -k 15 -s INT "$left" "$@"
}

lane() {  # lane NAME GPU COMMAND...: run in the background on one GPU, log to $LOGS/NAME.log
  local name=$1 gpu=$2; shift 2
  ( export CUDA_VISIBLE_DEVICES=$gpu; set -x; "$@" ) >"$LOGS/$name.log" 2>&1 &
}

# iFlame training setup shared by the interleaved/full comparison (same data, order, token budget).
IFLAME_TRAIN=(--steps 400 --batch-size 32 --lr 0.001 --warmup-steps 40 --checkpoint-every 400
  --log-every 10 --eval-every 0 --eval-meshes 0 --max-faces 800)

iflame_data() {
  [ -f "$WORK/tokens/manifest.json" ] && return 0
  $CLI synth --out "$WORK/synth" --n 3000 && $CLI tokenize "$WORK/synth" --out "$WORK/tokens"
}


lane_full() {
  $CLI --device cuda train-iflame --data "$WORK/tokens" --out "$WORK/iflame-full" "${IFLAME_TRAIN[@]}" \
    --set model.attention=full
  touch "$WORK/iflame-full.done"
  timed python3 benchmarks/sparse_vae.py
}

lane_interleaved() {
  $CLI --device cuda train-iflame --data "$WORK/tokens" --out "$WORK/iflame-interleaved" "${IFLAME_TRAIN[@]}"
  timed python3 -m pytest -m gpu -q -p no:cacheprovider tests
  while [ ! -f "$WORK/iflame-full.done" ] && [ "$(date +%s)" -lt "$DEADLINE" ]; do sleep 5; done
  timed python3 benchmarks/iflame_vs_full.py --grad-checkpoint --runs "$WORK/iflame-interleaved" "$WORK/iflame-full" --data "$WORK/tokens"
  $CLI --device cuda sample --checkpoint "$WORK/iflame-interleaved" --out "$WORK/iflame-samples" --n 16 --max-faces 800
  $CLI --device cuda eval --metric face-acc --checkpoint "$WORK/iflame-interleaved" --data "$WORK/tokens" \
    --out "$WORK/iflame-samples/face_acc.json"
  timed python3 benchmarks/sdf_voxelize.py
}

lane_figures() {
  timed python3 benchmarks/iflame_vs_full.py --grad-checkpoint --train-steps 3 \
    --runs benchmarks/results/iflame_vs_full_runs/interleaved benchmarks/results/iflame_vs_full_runs/full
  timed python3 benchmarks/sparse_vae.py
}

iflame_data >"$LOGS/data.log" 2>&1 || { cat "$LOGS/data.log"; exit 1; }
case $phase in
  1)
    lane interleaved 0 lane_interleaved
    lane full 1 lane_full
    ;;
  2)  # after 1: the two runs' summaries are in benchmarks/results/iflame_vs_full_runs/
    ( export CUDA_VISIBLE_DEVICES=0,1
      timed python3 benchmarks/iflame_ddp.py --data "$WORK/tokens" --out "$WORK/ddp" --steps 40 --log-every 5 ) >"$LOGS/ddp.log" 2>&1
    lane direct3d 0 $CLI --device cuda run recipes/direct3d_gpu.yaml --out "$WORK/direct3d"
    lane figures 1 lane_figures
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
wait
for log in "$LOGS"/*.log; do echo "=== $log"; tail -n 25 "$log"; done

# Light run outputs only (no checkpoints): curves, metrics, summaries, sample grids and stats.
tar -czf "$OUT/results.tgz" benchmarks/results "$LOGS" \
  $(cd / && find "$WORK" \( -name '*.png' -o -name '*.csv' -o -name '*.json' -o -name 'config.yaml' \) \
      -not -path '*/latents/*' -not -path '*/tokens/*' -not -path '*/data/*' -not -path '*/synth/*' 2>/dev/null) \
  2>/dev/null
ls -la "$OUT"
