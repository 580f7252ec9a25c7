#!/usr/bin/env bash
# llmcli in a shell pipeline: stdin in, stdout out, one line per line, in order.
#   examples/pipeline.sh MODEL_DIR
# (MODEL_DIR: the model `llmcli demo` printed, or one from examples/train_your_own.sh.)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="$1"

# Translate, keep source and output side by side, show the first three.
paste "$here/numbers.test.en" <(llmcli translate -m "$model" --quiet < "$here/numbers.test.en") | head -3

# Translate and score in one pipe: chrF of the output against the references.
llmcli translate -m "$model" --quiet < "$here/numbers.test.en" \
    | llmcli eval --metric chrf --ref "$here/numbers.test.zh"
