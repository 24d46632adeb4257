#!/usr/bin/env bash
# The U-Net's full recipe on the full-scale synthetic set, stage by stage without DVC (for a GPU machine
# that has no DVC/MLflow): 606 images, 256×256 windows, one per cell (~75,000 per epoch), batch 64, AMP.
# Usage: bench/full_recipe.sh OUT_DIR [EPOCHS] [key=value ...]   (extra params override, e.g. train.unet.workers=12)
set -euo pipefail
out=${1:?usage: bench/full_recipe.sh OUT_DIR [EPOCHS] [key=value ...]}; epochs=${2:-15}; shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
python3 - "$out" "$epochs" "$@" <<'PY'
import sys, yaml
out, epochs, *overrides = sys.argv[1:]
params = yaml.safe_load(open("params.yaml"))
settings = {
    "data.root": f"{out}/raw", "synth.images": 606, "split.n_folds": 5, "patches.size": 256,
    "train.unet.epochs": int(epochs), "train.unet.batch_size": 64, "train.unet.lr": 0.002,
    "train.unet.samples_per_epoch": None, "train.unet.workers": 12, "tracking.enabled": False,
}
settings.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
for key, value in settings.items():
    *parents, leaf = key.split(".")
    node = params
    for name in parents:
        node = node[name]
    node[leaf] = value
yaml.safe_dump(params, open(f"{out}/params.yaml", "w"), sort_keys=False)
PY
p=(--params "$out/params.yaml")
time python3 stages/synthesize.py "${p[@]}" --out "$out/raw"
time python3 stages/decode.py "${p[@]}" --out "$out/decoded"
time python3 stages/split.py "${p[@]}" --decoded "$out/decoded" --out "$out/split.json"
time python3 stages/patches.py "${p[@]}" --decoded "$out/decoded" --split "$out/split.json" --out "$out/patches.parquet"
time python3 stages/train_unet.py "${p[@]}" --decoded "$out/decoded" --split "$out/split.json" \
  --patches "$out/patches.parquet" --models "$out/models/unet" --metrics "$out/metrics/unet"
