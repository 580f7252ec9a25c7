#!/usr/bin/env bash
# Score a handful of German hypotheses against their references with every
# reference-based text metric; line 4 of hyp.de is empty on purpose: it is scored
# as empty, not dropped. Run from anywhere: examples/score.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Use an installed `llmcli`, else the checkout this script lives in.
if command -v llmcli >/dev/null 2>&1; then
    llmcli=(llmcli)
else
    export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
    llmcli=(python -m llmcli)
fi

for metric in bleu chrf ter rouge exact; do
    echo "== $metric"
    "${llmcli[@]}" eval "$here/hyp.de" --ref "$here/ref.de" --metric "$metric"
done
echo "== bleu with a bootstrap confidence interval, as JSON"
"${llmcli[@]}" eval "$here/hyp.de" --ref "$here/ref.de" --confidence --json
