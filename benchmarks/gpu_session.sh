#!/usr/bin/env bash
# Every GPU figure of the project, on a machine of two GPUs, in calls of under 10 minutes each:
#
#   bash benchmarks/gpu_session.sh training  # the iFlame pair: interleaved (GPU 0) and full attention
#                                            # (GPU 1), same steps/batch/data; their summaries go to
#                                            # benchmarks/results/iflame_vs_full_runs/; the GPU tests
#                                            # beside the longer run, then the ddp phase (~9 min)
#   bash benchmarks/gpu_session.sh figures   # lane A: decoding's GPU tests, iFlame vs full (face-acc
#                                            # from those runs), SS-VAE figures, recipes/iflame_gpu.yaml;
#                                            # lane B: recipes/direct3d_gpu.yaml, voxelisation speed (~8 min)
#   bash benchmarks/gpu_session.sh ddp       # train-iflame --gpus 2 vs 1 (and 1 again) on both GPUs (~3 min)
#   bash benchmarks/gpu_session.sh iflame    # iFlame vs full beside all GPU tests, then ddp (6.5 min)
#   bash benchmarks/gpu_session.sh ddp-large # ddp at a global batch of 256 with gradient checkpointing, where a
#                                            # step is GPU-bound (3.5 min on a fresh machine, fla's ~100 s of
#                                            # compiling included)
#   bash benchmarks/gpu_session.sh retrain-interleaved  # the interleaved run of the face-acc pair alone (~1 min
#                                            # after another iFlame phase)
#   bash benchmarks/gpu_session.sh iflame-recipe        # recipes/iflame_gpu.yaml alone
#   bash benchmarks/gpu_session.sh linear-attention     # linear attention's GPU tests, then which form wins
#                                            # at which length (benchmarks/linear_attention_forms.py, ~1.5 min)
#   bash benchmarks/gpu_session.sh decode    # decoding's GPU tests, then iflame_vs_full --only decode
#                                            # (batches 1, 16, 64) on one GPU (~3 min)
#   bash benchmarks/gpu_session.sh direct3d-ddp  # train-vae and train-dit --gpus 2 vs 1 at the reference sizes on
#                                            # 1024^3 synth data (benchmarks/direct3d_ddp.py, ~6 min)
#   bash benchmarks/gpu_session.sh decode-profile     # kernels, their GPU time and the gaps between them per decoding
#                                            # step at batch 1, CUDA graphs, both kinds (benchmarks/decode_profile.py, ~1 min)
#   bash benchmarks/gpu_session.sh decode-linear      # the fused decoding GEMM's tilings at the reference model's
#                                            # projections, batch 1/4/16, in CUDA graphs (benchmarks/decode_linear.py, ~2 min)
#   bash benchmarks/gpu_session.sh long      # iflame_vs_full --only long: both training steps at 4,000
#                                            # faces, merged into iflame_vs_full.json (~2 min on a fresh machine)
#   bash benchmarks/gpu_session.sh direct3d-r256      # recipes/direct3d_r256.yaml, its figures (direct3d_scale.json
#                                            # recipe_r256, benchmarks/results/direct3d_r256/) and the
#                                            # selection study on its trained DiT (~9 min on one H200)
#   bash benchmarks/gpu_session.sh ssa-tile-ab        # after direct3d-r256 on the same machine: its DiT trained
#                                            # again at query tiles 64 and 16 for the same 500 steps,
#                                            # ssa_selection.py --ab (~4 min)
#   bash benchmarks/gpu_session.sh parity    # iFlame's parity pair on one GPU: interleaved and full attention, 2,000
#                                            # steps each at batch 32 (same data, seed, token budget), both at once
#                                            # on GPU 0; a call that runs out of time leaves checkpoints and the
#                                            # next call of the phase resumes them (~2 calls); then their face-acc
#                                            # into iflame_vs_full.json (runs in benchmarks/results/iflame_parity_runs/; not yet timed)
#   bash benchmarks/gpu_session.sh parity-time        # the same pair at equal wall time: each alone on the GPU
#                                            # for PARITY_TIME_MIN (2.5) min of training, torch.compile'd (the
#                                            # fastest setting of iflame_step_variants.json; ~7 min, estimated)
#   bash benchmarks/gpu_session.sh short-profile      # where the time of a train-iflame step goes at the synth data's
#                                            # lengths: both attention kinds, eager and compiled, 40 steps each
#                                            # with 10 profiled, then benchmarks/profile_diff.py of each pair
#                                            # (benchmarks/results/iflame_short_profile/; ~5 min, estimated)
#   bash benchmarks/gpu_session.sh short-throughput   # the same four runs unprofiled, 200 steps each: steady-state
#                                            # samples/s (benchmarks/results/iflame_short_throughput/), collected into
#                                            # iflame_vs_full.json (~4 min, estimated)
#   bash benchmarks/gpu_session.sh launch-overhead    # host time per call of the ops of a short training step
#                                            # (benchmarks/launch_overhead.py, ~1 min)
#   bash benchmarks/gpu_session.sh gpu-tests          # the GPU tests alone (GPU_TESTS: which paths; default all)
#   bash benchmarks/gpu_session.sh direct3d-scale     # direct3d_scale.py's vae rows (the SS-VAE's gradient
#                                            # checkpointing at R 1024 included) and dit rows (SSA vs FA2 vs cuDNN
#                                            # after the SSA kernel work), into direct3d_scale.json (~6 min, estimated)
#   bash benchmarks/gpu_session.sh step-variants      # the iFlame training step at 48 x 800 with checkpointing
#                                            # on/off x torch.compile off/on, both attention kinds, and the
#                                            # attention-free bound (benchmarks/iflame_step_variants.py, ~6 min, estimated)
#   bash benchmarks/gpu_session.sh first-step         # fla's kernel configs recorded for this GPU
#                                            # (kernels/linear_attention/fla_configs/), then the first training step
#                                            # in fresh processes with them, without them, and for full attention
#                                            # (benchmarks/first_step.py, ~6 min, estimated)
#   bash benchmarks/gpu_session.sh direct3d-reference # recipes/direct3d_reference.yaml shortened: 16 shapes at
#                                            # 1024^3, multi-resolution SS-VAE, the 24-block SS-DiT, one
#                                            # 1024^3 sample (~7 min); direct3d-reference-resume runs it
#                                            # again with a longer DiT limit: train-dit resumes (~5 min)
#
# Several phases run one after the other in one call: gpu_session.sh ddp-large retrain-interleaved.
#
# Lanes run side by side, one GPU each (CUDA_VISIBLE_DEVICES). Every command is stopped by SIGINT
# (trainers checkpoint) at BUDGET_S seconds, so results always get packed: benchmarks/results/ and,
# with logs and run summaries, $OUT/results.tgz. WORK (default /tmp/mf) holds data and checkpoints.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: gpu_session.sh PHASE... (training figures iflame ddp ddp-large direct3d-ddp decode-profile decode-linear parity parity-time short-profile short-throughput launch-overhead gpu-tests direct3d-scale step-variants first-step retrain-interleaved iflame-recipe linear-attention decode long direct3d-r256 ssa-tile-ab direct3d-reference direct3d-reference-resume)"; exit 2; }
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
OUT=${OUT:-/tmp/mf-out}
WORK=${WORK:-/tmp/mf}
LOGS=$OUT/logs
mkdir -p "$OUT" "$LOGS" "$WORK" /tmp/site
export PYTHONUNBUFFERED=1 MESHFORGE_NO_PROGRESS=1 COLUMNS=160  # wide rich tables in the logs

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

# The parity pairs: matched steps, and matched training time (the first step, compiling, is not counted).
PARITY_TRAIN=(--batch-size 32 --lr 0.001 --warmup-steps 100 --checkpoint-every 250 --log-every 20
  --eval-every 0 --eval-meshes 0 --max-faces 800)
PARITY_TIME_MIN=${PARITY_TIME_MIN:-2.5}
PARITY_RUNS=benchmarks/results/iflame_parity_runs

iflame_data() {
  [ -f "$WORK/tokens/manifest.json" ] && return 0
  $CLI synth --out "$WORK/synth" --n 3000 && $CLI tokenize "$WORK/synth" --out "$WORK/tokens"
}


lane_train() {  # lane_train ATTENTION: one of the matched iFlame runs, kept in benchmarks/results
  $CLI --device cuda train-iflame --data "$WORK/tokens" --out "$WORK/iflame-$1" "${IFLAME_TRAIN[@]}" \
    --set model.attention="$1" || return
  mkdir -p "benchmarks/results/iflame_vs_full_runs/$1"
  cp "$WORK/iflame-$1"/{summary.json,metrics.csv,curves.png,config.yaml} "benchmarks/results/iflame_vs_full_runs/$1/"
}

lane_train_then_gpu_tests() {
  lane_train "$1"
  timed python3 -m pytest -m gpu -q -p no:cacheprovider tests
}

decoding_tests() {
  timed python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
    tests/kernels/test_decode_step.py tests/kernels/test_decode_linear.py tests/sample/test_decoding.py
}

iflame_vs_full() {  # the 4,000-face setting is its own phase (long): with it this would pass the deadline
  timed python3 benchmarks/iflame_vs_full.py --grad-checkpoint --decode-batches 1 16 64 --long-faces 0 \
    --runs benchmarks/results/iflame_vs_full_runs/interleaved benchmarks/results/iflame_vs_full_runs/full
}

lane_iflame_figures() {  # decoding's GPU tests first: the benchmark times the same decoders
  decoding_tests
  iflame_vs_full
  timed python3 benchmarks/sparse_vae.py
  iflame_recipe
}

iflame_recipe() {
  $CLI --device cuda run recipes/iflame_gpu.yaml --out "$WORK/iflame-cli"
}

lane_direct3d() {
  $CLI --device cuda run recipes/direct3d_gpu.yaml --out "$WORK/direct3d"
  timed python3 benchmarks/sdf_voxelize.py
}

parity_run() {  # parity_run NAME ATTENTION ARGS...: a train-iflame run of a parity pair, kept in $PARITY_RUNS/NAME
  local name=$1 attention=$2; shift 2
  $CLI --device cuda train-iflame --data "$WORK/tokens" --out "$WORK/parity-$name" "${PARITY_TRAIN[@]}" "$@" \
    --set model.attention="$attention" || return
  mkdir -p "$PARITY_RUNS/$name"
  cp "$WORK/parity-$name"/{summary.json,metrics.csv,curves.png,config.yaml} "$PARITY_RUNS/$name/"
}

short_runs() {  # short_runs RESULTS ARGS...: train-iflame for both kinds (SHORT_KINDS), eager and compiled (SHORT_MODES),
  # on the parity runs' data and settings (plus ARGS); summaries, metrics and any profile kept in RESULTS/KIND-MODE.
  # A mode's two kinds run back to back: an eager step at these lengths is host-bound, and the host's speed
  # drifts (an eager pair split by a compiled run measured 0.85, an adjacent one 1.03, on one H200).
  # Each run starts afresh: one resumed from an earlier call's checkpoint would time a few steps.
  local results=$1 attention mode flag run; shift
  for mode in ${SHORT_MODES:-eager compiled}; do
    for attention in ${SHORT_KINDS:-interleaved full}; do
      flag=--no-compile; [ "$mode" = compiled ] && flag=--compile
      run="$WORK/$(basename "$results")-$attention-$mode"
      rm -rf "$run"
      $CLI --device cuda train-iflame --data "$WORK/tokens" --out "$run" "${PARITY_TRAIN[@]}" "$@" "$flag" \
        --set model.attention="$attention" || continue
      mkdir -p "$results/$attention-$mode"
      cp "$run"/{summary.json,config.yaml,metrics.csv} "$results/$attention-$mode/"
      [ -d "$run/profile" ] && cp "$run"/profile/rank0.{txt,json} "$results/$attention-$mode/"
    done
  done
}

short_profile() {  # profiles of 10 steps each, then benchmarks/profile_diff.py of each pair
  local results=benchmarks/results/iflame_short_profile mode
  short_runs "$results" --steps 40 --profile-steps 10
  for mode in eager compiled; do
    timed python3 benchmarks/profile_diff.py "$results/interleaved-$mode/rank0.json" "$results/full-$mode/rank0.json" \
      --labels interleaved full --out "$results/diff_$mode.json"
  done
}

parity_rescore() {  # parity_rescore --runs|--time-runs NAME: the pair's face-acc into iflame_vs_full.json
  timed python3 benchmarks/iflame_vs_full.py --rescore-face-acc "$1" "$PARITY_RUNS/$2-interleaved" "$PARITY_RUNS/$2-full"
}

ddp() {  # the same global batch on 1 and 2 GPUs
  ( export CUDA_VISIBLE_DEVICES=0,1
    timed python3 benchmarks/iflame_ddp.py --data "$WORK/tokens" --out "$WORK/ddp" --batch-size 64 --steps 80 ) >"$LOGS/ddp.log" 2>&1
  for run in gpus1 gpus2 gpus1_rerun; do
    mkdir -p "benchmarks/results/iflame_ddp_runs/$run"
    cp -r "$WORK/ddp/$run"/{summary.json,metrics.csv,curves.png,config.yaml,profile} "benchmarks/results/iflame_ddp_runs/$run/" 2>/dev/null
    rm -f "benchmarks/results/iflame_ddp_runs/$run"/profile/*.trace.json.gz  # traces are megabytes: in $OUT only
    cp "$WORK/ddp/$run/profile/rank0.trace.json.gz" "$OUT/trace_${run}_rank0.json.gz" 2>/dev/null
  done
}

ddp_compute_bound() {  # the same comparison where a step is compute-bound: 128 sequences per GPU
  ( export CUDA_VISIBLE_DEVICES=0,1
    timed python3 benchmarks/iflame_ddp.py --data "$WORK/tokens" --out "$WORK/ddp-large" --batch-size 256 \
      --steps 40 --log-every 4 --max-faces 200 --no-rerun --set model.grad_checkpoint=true \
      --result benchmarks/results/iflame_ddp_large.json ) >"$LOGS/ddp-large.log" 2>&1
  for run in gpus1 gpus2; do
    mkdir -p "benchmarks/results/iflame_ddp_large_runs/$run"
    cp -r "$WORK/ddp-large/$run"/{summary.json,metrics.csv,curves.png,config.yaml,profile} \
      "benchmarks/results/iflame_ddp_large_runs/$run/" 2>/dev/null
    rm -f "benchmarks/results/iflame_ddp_large_runs/$run"/profile/*.trace.json.gz
  done
}

direct3d_r256() {
  $CLI --device cuda run recipes/direct3d_r256.yaml --out "$WORK/r256"
  timed python3 benchmarks/direct3d_scale.py --sections recipe_r256 --recipe-run "$WORK/r256"
  timed python3 benchmarks/ssa_selection.py --run "$WORK/r256/dit" --tiles 16
}

ssa_tile_ab() {  # the same DiT, data, seed and steps (its run record as --config); only the tile differs
  [ -f "$WORK/r256/dit/config.yaml" ] || { echo "ssa-tile-ab needs the direct3d-r256 phase first"; return 1; }
  for tile in 64 16; do
    $CLI --device cuda train-dit --config "$WORK/r256/dit/config.yaml" --out "$WORK/ab-$tile" --steps 500 \
      --time-limit-min 0 --eval-every 0 --set model.dit.ssa_query_tile=$tile
  done
  timed python3 benchmarks/ssa_selection.py --ab 64="$WORK/ab-64" 16="$WORK/ab-16"
}

# The reference recipe cut to fit a call: 16 shapes (a quarter held out, for the R 1024 reconstruction),
# the trainers stopped by short time limits.
REFERENCE_SHORT=(--set synth.n=16 --set sdf-voxelize.val_fraction=0.25 --set train-vae.time_limit_min=1.5
                 --set eval-recon.n=4 --set sample-dit.n=1)

direct3d_reference() {  # $1: the SS-DiT's time limit (minutes); a second run resumes the first's
  $CLI --device cuda run recipes/direct3d_reference.yaml --out "$WORK/reference" "${REFERENCE_SHORT[@]}" \
    --set train-dit.time_limit_min="$1"
}

direct3d_ddp() {  # the same global batch of 1024^3 shapes on 1 and 2 GPUs, the VAE then the DiT
  ( export CUDA_VISIBLE_DEVICES=0,1
    timed python3 benchmarks/direct3d_ddp.py --out "$WORK/direct3d-ddp" ) >"$LOGS/direct3d-ddp.log" 2>&1
  for run in vae_gpus1 vae_gpus2 dit_gpus1 dit_gpus2; do
    mkdir -p "benchmarks/results/direct3d_ddp_runs/$run"
    cp "$WORK/direct3d-ddp/$run"/{summary.json,metrics.csv,curves.png,config.yaml} \
      "benchmarks/results/direct3d_ddp_runs/$run/" 2>/dev/null
  done
}

needs_data=false  # the recipe makes its own data; decoding and the linear-attention forms need none
for phase in "$@"; do case $phase in iflame-recipe|decode|decode-profile|decode-linear|linear-attention|launch-overhead|gpu-tests|first-step|step-variants|direct3d-*|ssa-tile-ab) ;; *) needs_data=true ;; esac; done
if $needs_data; then
  iflame_data >"$LOGS/data.log" 2>&1 || { cat "$LOGS/data.log"; exit 1; }
fi
for phase in "$@"; do
case $phase in
  training)
    lane interleaved 0 lane_train interleaved
    # The full-attention run ends first; the GPU tests then take its GPU while the other run goes on.
    lane full 1 lane_train_then_gpu_tests full
    wait
    ddp
    ;;
  figures)
    # Both GPUs are idle for a moment: the interconnect that data-parallel steps pay for.
    ( export CUDA_VISIBLE_DEVICES=0,1; timed python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/nccl_allreduce.py ) >"$LOGS/nccl.log" 2>&1
    lane iflame 0 lane_iflame_figures
    lane direct3d 1 lane_direct3d
    ;;
  iflame)  # the iFlame figures alone: iflame_vs_full (GPU 0) beside all GPU tests, then ddp
    lane iflame 0 iflame_vs_full
    ( export CUDA_VISIBLE_DEVICES=1; timed python3 -m pytest -m gpu -q -p no:cacheprovider tests ) >"$LOGS/gpu-tests.log" 2>&1
    wait
    ddp
    ;;
  ddp) ddp ;;
  ddp-large) ddp_compute_bound ;;
  direct3d-ddp) direct3d_ddp ;;
  iflame-recipe)  # recipes/iflame_gpu.yaml alone, 45 s of training (~4 min on a fresh machine)
    ( export CUDA_VISIBLE_DEVICES=0; iflame_recipe ) >"$LOGS/iflame-recipe.log" 2>&1 ;;
  linear-attention)
    ( export CUDA_VISIBLE_DEVICES=0
      timed python3 -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_linear_attention.py &&
      timed python3 benchmarks/linear_attention_forms.py ) >"$LOGS/linear-attention.log" 2>&1 ;;
  decode)  # the decoding figures alone: benchmarks/results/iflame_vs_full_decode.json
    ( export CUDA_VISIBLE_DEVICES=0; decoding_tests
      timed python3 benchmarks/iflame_vs_full.py --only decode --decode-batches 1 16 64 ) >"$LOGS/decode.log" 2>&1 ;;
  decode-profile)  # where a decoding step's time goes: kernels, GPU time and gaps per token (~1 min)
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 benchmarks/decode_profile.py ) >"$LOGS/decode-profile.log" 2>&1 ;;
  decode-linear)  # the decoding GEMM's tilings, timed in CUDA graphs (~2 min)
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 benchmarks/decode_linear.py ) >"$LOGS/decode-linear.log" 2>&1 ;;
  long)  # the 4,000-face training steps alone, added to benchmarks/results/iflame_vs_full.json
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 benchmarks/iflame_vs_full.py --only long ) >"$LOGS/long.log" 2>&1 ;;
  direct3d-r256) ( export CUDA_VISIBLE_DEVICES=0; direct3d_r256 ) >"$LOGS/direct3d-r256.log" 2>&1 ;;
  ssa-tile-ab) ( export CUDA_VISIBLE_DEVICES=0; ssa_tile_ab ) >"$LOGS/ssa-tile-ab.log" 2>&1 ;;
  direct3d-reference) ( export CUDA_VISIBLE_DEVICES=0; direct3d_reference 1.5 ) >"$LOGS/direct3d-reference.log" 2>&1 ;;
  direct3d-reference-resume)
    ( export CUDA_VISIBLE_DEVICES=0; direct3d_reference 3 ) >"$LOGS/direct3d-reference-resume.log" 2>&1 ;;
  parity)  # steps are what is matched, so sharing one GPU changes nothing the pair is compared on
    for attention in interleaved full; do
      lane "parity-$attention" 0 parity_run "steps-$attention" "$attention" --steps 2000 --resume
    done
    wait
    parity_rescore --runs steps >"$LOGS/parity-rescore.log" 2>&1 ;;
  parity-time)
    ( export CUDA_VISIBLE_DEVICES=0
      for attention in ${PARITY_TIME_KINDS:-interleaved full}; do
        parity_run "time-$attention" "$attention" --steps 8000 --time-limit-min "$PARITY_TIME_MIN" --compile
      done
      parity_rescore --time-runs time ) >"$LOGS/parity-time.log" 2>&1 ;;
  short-profile) ( export CUDA_VISIBLE_DEVICES=0; short_profile ) >"$LOGS/short-profile.log" 2>&1 ;;
  short-throughput)  # 200 unprofiled steps each (the median of windows 2-10 of 20 steps: most shapes compiled by then)
    ( export CUDA_VISIBLE_DEVICES=0; short_runs benchmarks/results/iflame_short_throughput --steps 200
      timed python3 benchmarks/iflame_vs_full.py --collect ) >"$LOGS/short-throughput.log" 2>&1 ;;
  launch-overhead)  # host time per call of the step's ops, Triton's and fla's launch paths taken apart (~1 min)
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 benchmarks/launch_overhead.py ) >"$LOGS/launch-overhead.log" 2>&1 ;;
  gpu-tests)  # GPU_TESTS (default: every GPU test) alone on GPU 0
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 -m pytest -m gpu -q -p no:cacheprovider -rs ${GPU_TESTS:-tests} ) \
      >"$LOGS/gpu-tests.log" 2>&1 ;;
  direct3d-scale)
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 benchmarks/direct3d_scale.py --sections vae,dit ) >"$LOGS/direct3d-scale.log" 2>&1 ;;
  step-variants)
    ( export CUDA_VISIBLE_DEVICES=0; timed python3 benchmarks/iflame_step_variants.py ) >"$LOGS/step-variants.log" 2>&1 ;;
  first-step)
    ( export CUDA_VISIBLE_DEVICES=0
      timed python3 benchmarks/first_step.py --record && timed python3 benchmarks/first_step.py ) >"$LOGS/first-step.log" 2>&1 ;;
  retrain-interleaved)  # the interleaved run of the face-acc pair again, after a change to the model
    ( export CUDA_VISIBLE_DEVICES=0; lane_train interleaved ) >"$LOGS/retrain-interleaved.log" 2>&1 ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
wait
done
for log in "$LOGS"/*.log; do echo "=== $log"; tail -n 25 "$log"; done

# Light run outputs only (no checkpoints): curves, metrics, summaries, sample grids and stats.
tar -czf "$OUT/results.tgz" benchmarks/results kernels/linear_attention/fla_configs "$LOGS" \
  $(cd / && find "$WORK" \( -name '*.png' -o -name '*.csv' -o -name '*.json' -o -name 'config.yaml' \
      -o -path '*/profile/*.txt' \) \
      -not -path '*/latents/*' -not -path '*/tokens/*' -not -path '*/data/*' -not -path '*/synth/*' 2>/dev/null) \
  2>/dev/null
ls -la "$OUT"
