#!/usr/bin/env bash
# Evidence for the default learning rate: train the tutorial's model on a real dataset with
# Adam 1e-3 (the tutorial's) and 1e-4 (ours) over several seeds; print validation AUC per run.
#   tests/tools/lr_evidence.sh DATA [SEEDS...]
set -uo pipefail
data=${1:?usage: tests/tools/lr_evidence.sh DATA [SEEDS...]}; shift
seeds=${*:-1 2 3}
bin=${BIN:-.venv/bin}
for lr in 1e-3 1e-4; do
  for seed in $seeds; do
    out=$(mktemp -d)
    "$bin/xray-edge" train --data "$data" --learning-rate "$lr" --seed "$seed" --out "$out" >/dev/null 2>"$out/log"
    rc=$?
    "$bin/python" - "$out" "$lr" "$seed" "$rc" <<'PY'
import json, sys
out, lr, seed, rc = sys.argv[1:]
r = json.load(open(f"{out}/training.json"))
v = r["validation"]
print(f"lr={lr} seed={seed} exit={rc} val_auc={v['roc_auc']:.3f} spread={v['probability_spread']:.3f} "
      f"collapsed={v['collapsed']} best_epoch={r['best_epoch']}/{r['epochs_run']}")
PY
  done
done
