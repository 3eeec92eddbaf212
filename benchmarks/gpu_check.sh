#!/usr/bin/env bash
# svdicl's checks on a GPU in one go: CUDA tests, exact vs randomized SVD on the GPU, and the
# throughput and sweep benchmarks on a LLaMA-2-7B-shaped model with random weights (no weights
# need to be at hand: only a config.json and a tokenizer). Logs and JSON go to OUT.
#
#   benchmarks/gpu_check.sh prepare                    # once, where svdicl's default model is installed:
#                                                      # .gpu/ = SST-2 data + model folders (config + tokenizer)
#   benchmarks/gpu_check.sh OUT tests svd throughput sweep   # on the GPU machine, any of the stages
#   DEVICE=cpu MODEL=.gpu/llama-tiny EXAMPLES=16 benchmarks/gpu_check.sh /tmp/out throughput sweep   # smoke run
#
# The model folder can be any Hugging Face folder or Hub id with a config.json and a tokenizer,
# e.g. MODEL=meta-llama/Llama-2-7b-hf (its weights are never loaded). STAGE_SECONDS caps each stage;
# BATCH, THROUGHPUT_DTYPES, SWEEP_DTYPE, EXAMPLES and PAPER_EXAMPLES set the benchmarks' sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=${GPU_DIR:-.gpu}

if [ "${1:-}" = prepare ]; then
    mkdir -p "$GPU_DIR/data/sst2"
    cp "${SVDICL_DATA:?set SVDICL_DATA to the task data folder}"/sst2/*.jsonl "$GPU_DIR/data/sst2/"
    python - "$GPU_DIR" <<'EOF'
import sys

import transformers as tf

from svdicl.aliases import ALIASES, alias_gguf
from svdicl.cachedir import default_cache_dir

gguf = alias_gguf(ALIASES["smollm2-135m"], default_cache_dir())
tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
shapes = {  # LLaMA-2-7B's layers with SmolLM2's tokenizer (49,152 tokens instead of 32,000); a tiny one for smoke runs
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=4096),
}
for name, shape in shapes.items():
    tf.LlamaConfig(**shape, **ids).save_pretrained(f"{sys.argv[1]}/{name}")
    tokenizer.save_pretrained(f"{sys.argv[1]}/{name}")
EOF
    echo "wrote $GPU_DIR; on the GPU machine: SVDICL_DATA=$GPU_DIR/data benchmarks/gpu_check.sh OUT tests svd throughput sweep"
    exit
fi

OUT=${1:?usage: benchmarks/gpu_check.sh OUT STAGE... (tests, svd, throughput, sweep) or benchmarks/gpu_check.sh prepare}
shift
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SVDICL_DATA=${SVDICL_DATA:-$GPU_DIR/data}
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-$GPU_DIR/llama2-7b} EXAMPLES=${EXAMPLES:-500} PAPER_EXAMPLES=${PAPER_EXAMPLES:-64}
BATCH=${BATCH:-8} THROUGHPUT_DTYPES=${THROUGHPUT_DTYPES:-bfloat16 float32} SWEEP_DTYPE=${SWEEP_DTYPE:-bfloat16}
STAGE_SECONDS=${STAGE_SECONDS:-540}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

stage() {  # name, command...: run one stage under its time cap, say how it ended, go on either way
    local name=$1 started=$SECONDS
    shift
    echo "=== $name: $* ($(date -u +%FT%TZ))"
    timeout "$STAGE_SECONDS" "$@"
    echo "=== $name: exit $? after $((SECONDS - started)) s"
}

echo "=== $(date -u +%FT%TZ) $(hostname); git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(),
    'float32 matmul precision', torch.get_float32_matmul_precision(), 'transformers', transformers.__version__)"

for name in "$@"; do
    case $name in
    tests) stage tests python -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py ;;
    svd) stage svd python benchmarks/svd_cost.py --shapes all --device "$DEVICE" --json "$OUT/svd_cost_$DEVICE.json" ;;
    throughput)
        for dtype in $THROUGHPUT_DTYPES; do  # float32 (no TF32) is slow on a GPU: one round after the warm-up
            stage "throughput $dtype" python benchmarks/throughput.py --model "$MODEL" --random-weights --device "$DEVICE" \
                --dtype "$dtype" --examples "$EXAMPLES" --batch-size "$BATCH" --repeats "$([ "$dtype" = float32 ] && echo 1 || echo 2)" \
                --json "$OUT/throughput_${dtype}_batch$BATCH.json"
        done
        ;;
    sweep)
        stage sweep python benchmarks/sweep_speed.py --model "$MODEL" --random-weights --device "$DEVICE" --dtype "$SWEEP_DTYPE" \
            --examples "$EXAMPLES" --layers -1 0 --rates paper --paper-examples "$PAPER_EXAMPLES" \
            --json "$OUT/sweep_speed_$SWEEP_DTYPE.json"
        ;;
    *) echo "unknown stage $name (tests, svd, throughput, sweep)" && exit 2 ;;
    esac
done
