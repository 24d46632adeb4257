"""Mask R-CNN training-step time on this machine, per backbone and setting, against today's default.

    python bench/maskrcnn_step.py [--steps 3] [--out bench/maskrcnn_results.json]

Each setting runs in its own process (so that its peak RSS is its own): a model built from ``params.yaml``'s
``maskrcnn`` section with the setting's changes, random init, trains on the same batch of 2 synthetic images
(seed 0, their cells' whole masks, as the training stage feeds it) for one warm-up and ``--steps`` timed steps
(forward, backward, AdamW). The ratio is the baseline's median step time over the setting's (above 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import pandas as pd
import torch

from cellseg import config
from cellseg.data import ImageStore
from cellseg.decode import IMAGES_TABLE, decode_dataset
from cellseg.models.maskrcnn import InstanceDataset, MaskRCNNTask, build_maskrcnn, collate
from cellseg.sources.read import load_source
from cellseg.sources.synthetic import synthesize

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "resnet50_fpn_v2 (the old default)"
# The old default's settings, which every row starts from ("channels_last": the trainer's memory format).
OLD = {
    "backbone": "resnet50_fpn_v2", "box_batch_size_per_image": 512, "rpn_pre_nms_top_n": 3000, "rpn_post_nms_top_n": 1500,
    "mask_head_channels": 256,
}
RESNET18 = {**OLD, "backbone": "resnet18_fpn", "box_batch_size_per_image": 128, "rpn_pre_nms_top_n": 1000, "rpn_post_nms_top_n": 500}
SETTINGS: dict[str, dict] = {
    BASELINE: OLD,
    "resnet50_fpn": {**OLD, "backbone": "resnet50_fpn"},
    "resnet34_fpn": {**OLD, "backbone": "resnet34_fpn"},
    "resnet18_fpn": {**OLD, "backbone": "resnet18_fpn"},
    "mobilenet_v3_large_fpn": {**OLD, "backbone": "mobilenet_v3_large_fpn"},
    "resnet18_fpn, 128 RoIs/image": {**OLD, "backbone": "resnet18_fpn", "box_batch_size_per_image": 128},
    "resnet18_fpn, 128 RoIs, RPN 1000/500": RESNET18,
    "resnet18_fpn, channels_last": {**OLD, "backbone": "resnet18_fpn", "channels_last": True},
    "resnet18_fpn, 128 RoIs, RPN 1000/500, channels_last": {**RESNET18, "channels_last": True},
    "that, and a 128-wide mask head (today's default)": {**RESNET18, "channels_last": True, "mask_head_channels": 128},
}


def one(setting: str, steps: int, data: Path) -> dict:
    """Time ``steps`` training steps of ``setting`` in this process: median seconds per step and peak RSS."""
    torch.manual_seed(0)
    changes = dict(SETTINGS[setting])
    channels_last = changes.pop("channels_last", False)
    raw = config.read_params(ROOT / "params.yaml")
    params = config.MaskRCNNParams.model_validate({**raw["maskrcnn"], **changes})
    post = config.section(raw, "postprocess").maskrcnn
    ids = list(pd.read_parquet(data / "decoded" / IMAGES_TABLE)["image_id"])
    store = ImageStore(data / "raw", data / "decoded", ids)
    dataset = InstanceDataset(store, data / "decoded", store.image_ids)
    batch = collate([dataset[0], dataset[1]])
    model = build_maskrcnn(params).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    task = MaskRCNNTask(params, post)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cpu = torch.device("cpu")

    def step() -> float:
        began = time.perf_counter()
        loss = task.train_step(model, batch, cpu)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - began

    step()  # warm-up
    times = [step() for _ in range(steps)]
    return {
        "setting": setting,
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cells": [len(target["boxes"]) for target in batch[1]],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "maskrcnn_results.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one setting in this process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.data)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        synthesize(data / "raw", n_images=2, seed=0)
        decode_dataset(load_source("synthetic", data / "raw"), data / "decoded")
        rows = []
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--one", setting, "--steps", str(args.steps), "--data", str(data)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{setting:40s} {rows[-1]['step_s']:6.2f} s/step  {rows[-1]['peak_rss_mb']:6.0f} MB", flush=True)
    base = rows[0]["step_s"]
    for row in rows:
        row["ratio"] = base / row["step_s"]
    args.out.write_text(json.dumps({"load_avg": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
