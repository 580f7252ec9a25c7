#!/usr/bin/env bash
# Train a translation model on your own line-aligned files, then use it.
# Here the files are small English-number-words -> Chinese-numerals samples made by
# llmcli's demo generator; put your own train.src / train.tgt in their place.
#   examples/train_your_own.sh [OUT_DIR]      (STEPS=600 by default; ~1-2 minutes on 2 CPU cores)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../runs/numbers}"
steps="${STEPS:-600}"

llmcli train --task translate \
    --src "$here/numbers.train.en" --tgt "$here/numbers.train.zh" \
    --valid-src "$here/numbers.valid.en" --valid-tgt "$here/numbers.valid.zh" \
    --out "$out" --preset tiny --vocab-size 400 --set d_ff=256 --set dropout=0 \
    --batch-tokens 2000 --lr 2e-3 --warmup 100 --label-smoothing 0 \
    --max-steps "$steps" --valid-every 200

llmcli translate -m "$out" --beam 4 "$here/numbers.test.en" > "$out/test.zh"
llmcli eval "$out/test.zh" --ref "$here/numbers.test.zh" --metric exact
