"""Running the stage scripts as subprocesses on a tiny Kaggle-format directory (``conftest.make_kaggle``),
with the good inputs of the stages before them made in-process: the harness of ``test_bad_inputs.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from cellseg import config
from cellseg.checkpoint import save_checkpoint
from cellseg.decode import IMAGES_TABLE, INSTANCES_TABLE, decode_dataset
from cellseg.flows import write_flows
from cellseg.io import write_json, write_parquet
from cellseg.models.unet import build_unet
from cellseg.patches import sample_patches
from cellseg.sources.kaggle import read_kaggle
from cellseg.split import make_split

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

# Arguments of each stage; the first output listed is the one a "prior" good run writes.
STAGE_ARGS: dict[str, list[str]] = {
    "decode": ["--out", "decoded"],
    "split": ["--decoded", "decoded", "--out", "split.json"],
    "patches": ["--decoded", "decoded", "--split", "split.json", "--out", "patches.parquet"],
    "flows": ["--decoded", "decoded", "--out", "flows"],
    "train_unet": [
        "--decoded", "decoded", "--split", "split.json", "--patches", "patches.parquet", "--flows", "flows",
        "--models", "models/unet", "--metrics", "metrics/unet",
    ],
    "train_maskrcnn": [
        "--decoded", "decoded", "--split", "split.json", "--models", "models/maskrcnn", "--metrics", "metrics/maskrcnn",
    ],
    "synthesize": ["--out", "synth"],
    "evaluate": [
        "--decoded", "decoded", "--split", "split.json", "--coco", "coco/coco_val.json",
        "--checkpoints", "models/unet/best.pt", "models/maskrcnn/best.pt",
        "--histories", "metrics/unet/epochs.csv", "metrics/maskrcnn/epochs.csv",
        "--postprocess", "models/unet/postprocess.json", "models/maskrcnn/postprocess.json",
        "--metrics", "metrics/evaluate.json", "--plots", "plots", "--report", "reports/compare.md",
    ],
    "tune": [
        "--decoded", "decoded", "--split", "split.json", "--checkpoint", "models/unet/best.pt",
        "--out", "models/unet/postprocess.json", "--metrics", "metrics/unet/tune.json",
    ],
}
OUTPUTS: dict[str, list[str]] = {
    "decode": ["decoded"],
    "split": ["split.json"],
    "patches": ["patches.parquet"],
    "flows": ["flows"],
    "train_unet": ["models/unet/best.pt", "metrics/unet"],
    "train_maskrcnn": ["models/maskrcnn/best.pt", "metrics/maskrcnn"],
    "synthesize": ["synth"],
    "predict": ["pred"],
    "synth": ["synth"],
    "evaluate": ["metrics/evaluate.json", "plots", "reports/compare.md"],
    "tune": ["models/unet/postprocess.json", "metrics/unet/tune.json"],
}
NEEDS: dict[str, tuple[str, ...]] = {  # good inputs made in-process before the stage runs
    "decode": (),
    "synthesize": (),
    "split": ("decoded",),
    "patches": ("decoded", "split"),
    "flows": ("decoded",),
    "train_unet": ("decoded", "split", "patches", "flows"),
    "train_maskrcnn": ("decoded", "split"),
    "predict": (),
    "synth": (),
    "evaluate": (),  # its cases fail on the command line's paths, before any input is read
    "tune": ("decoded", "split", "checkpoint"),
}


@dataclass
class World:
    """One case's files: the Kaggle directory, the working directory and the params to write."""

    root: Path
    work: Path
    params: dict
    params_text: str | bytes | None = None  # written verbatim instead of ``params`` when set
    params_arg: str = "params.yaml"
    model: str = "model.pt"  # predict: the checkpoint given to --model
    args: list[str] | None = None  # the command's arguments, in place of the stage's usual ones

    @property
    def csv(self) -> Path:
        return self.root / "train.csv"

    def image(self, image_id: str = "sh0000000000") -> Path:
        return self.root / "train" / f"{image_id}.png"

    def table(self) -> pd.DataFrame:
        return pd.read_csv(self.csv, dtype=str, keep_default_na=False)

    def write_table(self, table: pd.DataFrame) -> None:
        table.to_csv(self.csv, index=False)

    def set_cells(self, rows, column: str, value: str) -> None:
        table = self.table()
        table.loc[rows, column] = value
        self.write_table(table)

    def write_params(self) -> None:
        text = self.params_text if self.params_text is not None else yaml.safe_dump(self.params)
        target = self.work / "params.yaml"
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)


ASTRO = "as1000000000"  # rows 8-10 of train.csv; sh0000000000 is rows 2-4, sh0000000001 rows 5-7


def base_params(root: Path) -> dict:
    """The project's params, set for a tiny and quick run on the Kaggle-format directory ``root``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source="kaggle", root=str(root), limit_images=None)
    raw["synth"].update(images=3)
    raw["split"].update(n_folds=2, fold=0)
    raw["patches"].update(size=32)
    raw["unet"].update(encoder="resnet18", encoder_weights="none", target="boundary")  # no flows stage before it
    raw["train"]["unet"].update(
        epochs=1, batch_size=2, workers=0, device="cpu", samples_per_epoch=2, amp=False, channels_last=False
    )
    raw["maskrcnn"].update(image_scale=0.125, detections_per_img=20, rpn_pre_nms_top_n=200, rpn_post_nms_top_n=100,
                           box_batch_size_per_image=8)
    raw["train"]["maskrcnn"].update(epochs=1, batch_size=1, workers=0, device="cpu", samples_per_epoch=1, amp=False)
    raw["tracking"].update(enabled=False)
    return raw


def prepare(w: World, stage: str) -> None:
    """Make the good inputs ``stage`` reads, as the earlier stages would."""
    needs = NEEDS[stage]
    if "decoded" in needs:
        decode_dataset(read_kaggle(w.root), w.work / "decoded")
    if "split" in needs:
        images = pd.read_parquet(w.work / "decoded" / IMAGES_TABLE)
        write_json(w.work / "split.json", make_split(images, 2, 0, 0))
    if "patches" in needs:
        split = json.loads((w.work / "split.json").read_text())
        index = sample_patches(
            pd.read_parquet(w.work / "decoded" / INSTANCES_TABLE), pd.read_parquet(w.work / "decoded" / IMAGES_TABLE),
            split["train"], size=32, jitter=0.5, per_cell=1, background_fraction=0.05, seed=0,
        )
        write_parquet(w.work / "patches.parquet", index)
    if "checkpoint" in needs:  # an untrained U-Net of the params
        params = config.section(w.params, "unet")
        (w.work / "models" / "unet").mkdir(parents=True)
        save_checkpoint(w.work / "models/unet/best.pt", "unet", {
            "model_params": params.model_dump(), "postprocess": config.section(w.params, "postprocess").unet.model_dump(),
            "model_state": build_unet(params).state_dict(), "epoch": 1,
        })
    if "flows" in needs:  # the boundary target's: an empty folder
        write_flows(w.work / "decoded", [], w.work / "flows")
    if stage == "predict":
        (w.work / "images").mkdir()
        for image_id in ("sh0000000000", ASTRO):
            (w.work / "images" / f"{image_id}.png").write_bytes(w.image(image_id).read_bytes())
    if stage.startswith("train_"):
        (w.work / "models" / stage.removeprefix("train_")).mkdir(parents=True)


def command(w: World, stage: str) -> list[str]:
    """The command line of ``stage``: a stage script, or ``cellseg predict`` / ``cellseg synth``."""
    if stage == "predict":
        args = ["--model", str(w.work / w.model), "images", "--out", "pred", "--device", "cpu"]
        return [sys.executable, "-m", "cellseg.cli", "predict", *(w.args or args)]
    if stage == "synth":
        return [sys.executable, "-m", "cellseg.cli", "synth", *(w.args or ["--out", "synth", "--images", "1"])]
    args = w.args if w.args is not None else STAGE_ARGS[stage]
    return [sys.executable, str(REPO / "stages" / f"{stage}.py"), "--params", w.params_arg, *args]


def run(w: World, stage: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(w, stage), cwd=w.work, capture_output=True, text=True, env=ENV, timeout=300)
