"""The stage scripts and the DVC pipeline, run for real on tiny data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cellseg.checkpoint import load_checkpoint
from helpers.stage_harness import OUTPUTS, World, base_params, prepare, run

REPO = Path(__file__).resolve().parents[1]


def _stage(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{name}.py"), *args], cwd=cwd, capture_output=True, text=True
    )


def _write_params(path: Path, **sections: dict) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in sections.items():
        raw[name].update(values)
    path.write_text(yaml.safe_dump(raw))


def test_stages_on_a_kaggle_directory(make_kaggle, tmp_path: Path) -> None:
    root = make_kaggle(images_per_type=4)
    _write_params(tmp_path / "params.yaml", data={"source": "kaggle", "root": str(root)}, split={"n_folds": 2})
    done = _stage("decode", "--out", "decoded", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = _stage("split", "--decoded", "decoded", "--out", "split.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 12


def test_stage_errors_are_one_line_and_leave_outputs(make_kaggle, tmp_path: Path) -> None:
    root = make_kaggle()
    _write_params(tmp_path / "params.yaml", data={"source": "kaggle", "root": str(root)}, split={"n_folds": 2})
    assert _stage("decode", "--out", "decoded", cwd=tmp_path).returncode == 0
    with open(root / "train.csv", "a") as handle:
        handle.write("sh0000000000,1 2 3,48,40,shsy5y,10h00m00s,2020-01-01,shsy5y_A0-1_Vessel-1_Ph_1,0 days 10:00:00\n")
    done = _stage("decode", "--out", "decoded", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {root / 'train.csv'}: row 20: malformed RLE: odd number of tokens (3): every start needs a length"
    )
    assert "Traceback" not in done.stderr
    assert (tmp_path / "decoded" / "images.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoded", "kaggle", "params.yaml"]
    _write_params(tmp_path / "params.yaml", split={"n_folds": 2, "fold": 2})
    done = _stage("split", "--decoded", "decoded", "--out", "split.json", cwd=tmp_path)
    assert done.returncode == 1 and "split: Value error, fold 2 is out of range" in done.stderr


BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER") for what, value in (("NAME", "t"), ("EMAIL", "t@t"))},
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of this project's pipeline in a fresh git + DVC repository, set to a tiny data set."""
    dest = tmp_path / "project"
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    _write_params(dest / "params.yaml", synth={"images": 6}, split={"n_folds": 2})
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=dest, check=True, env=ENV, capture_output=True)
    return dest


def _dvc(project: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dvc_repro_is_exact(project: Path) -> None:
    """Up to ``split`` (the training stages run in CI's full pipeline): a rerun does nothing, a param reruns its stage."""
    first = _dvc(project, "repro", "split")
    assert all(f"Running stage '{s}'" in first for s in ("synthesize", "decode", "split"))
    assert "Running stage" not in _dvc(project, "repro", "split")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["split"]["fold"] = 1 - params["split"]["fold"]  # the other of the two folds
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = _dvc(project, "repro", "split")
    assert "Running stage 'split'" in rerun
    assert "Running stage 'decode'" not in rerun and "Running stage 'synthesize'" not in rerun


def test_dvc_remote_push_then_pull_into_a_fresh_clone(project: Path, tmp_path: Path) -> None:
    """The README's sharing recipe on a local-directory remote: ``dvc push`` after a run, then ``git clone`` and
    ``dvc pull`` elsewhere restore every output byte for byte, and the clone's pipeline is up to date."""
    _dvc(project, "repro", "coco", "patches")  # every stage before the trainings
    remote = tmp_path / "remote"
    _dvc(project, "remote", "add", "--default", "store", str(remote))
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "run and remote"]):
        subprocess.run(command, cwd=project, check=True, env=ENV, capture_output=True)
    assert "pushed" in _dvc(project, "push")
    outputs = ["data/raw/synthetic", "data/interim/decoded", "data/interim/split.json",
               "data/processed/patches.parquet", "data/processed/coco"]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, env=ENV, capture_output=True)
    assert not any((clone / path).exists() for path in outputs)  # only git's files came with the clone
    _dvc(clone, "pull", "--with-deps", "coco", "patches")
    for path in outputs:
        original, pulled = project / path, clone / path
        files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file()) if original.is_dir() else [Path()]
        assert files and files == (
            sorted(p.relative_to(pulled) for p in pulled.rglob("*") if p.is_file()) if pulled.is_dir() else [Path()]
        ), path
        assert all((original / f).read_bytes() == (pulled / f).read_bytes() for f in files), path
    assert "up to date" in _dvc(clone, "status", "coco", "patches")
    assert "Running stage" not in _dvc(clone, "repro", "coco", "patches")


@pytest.mark.parametrize("stage", ["train_unet", "train_maskrcnn"])
def test_training_stage_run_twice_gives_the_same_model(stage: str, make_kaggle, tmp_path: Path) -> None:
    """Same params, same weights: the random initialisation is seeded by ``train.<model>.seed`` (torch's own
    default seed differs in every process), and another seed gives another model."""
    root = make_kaggle()
    weights = []
    for run_dir, seed in (("a", 0), ("b", 0), ("c", 1)):
        world = World(root=root, work=tmp_path / run_dir, params=base_params(root))
        world.work.mkdir()
        world.params["train"][stage.removeprefix("train_")]["seed"] = seed
        world.write_params()
        prepare(world, stage)
        done = run(world, stage)
        assert done.returncode == 0, done.stderr[-3000:]
        weights.append(load_checkpoint(world.work / OUTPUTS[stage][0])["model_state"])
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_decode_and_split_read_the_real_training_set_as_it_is(sartorius_dir: Path, tmp_path: Path) -> None:
    """``../shared/sartorius`` unchanged through the stage scripts: its 15 exact duplicate rows are dropped and
    its blank metadata accepted, each with one warning; the split puts every cell type on both sides."""
    _write_params(tmp_path / "params.yaml", data={"source": "kaggle", "root": str(sartorius_dir)})
    decode = _stage("decode", "--out", "decoded", cwd=tmp_path)
    assert decode.returncode == 0, decode.stderr[-2000:]
    warnings = [line for line in decode.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, warnings
    assert "dropped 15 row(s) that repeat an earlier row of the same image exactly, in 6 image(s)" in warnings[0]
    assert "blank metadata accepted" in warnings[1] and "sample_id (360)" in warnings[1]
    images = pd.read_parquet(tmp_path / "decoded" / "images.parquet")
    assert len(images) == 361 and images["n_cells"].sum() == 23_601 - 15
    split = _stage("split", "--decoded", "decoded", "--out", "split.json", cwd=tmp_path)
    assert split.returncode == 0, split.stderr[-2000:]
    assert "360 of 361 image(s) have no sample_id: each is its own group" in split.stderr
    counts = json.loads((tmp_path / "split.json").read_text())["counts"]
    assert all(sorted(counts[part]) == ["astro", "cort", "shsy5y"] for part in ("train", "val"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "scored"),
    [(["--set", "evaluate.tta=[]"], {"unet", "unet+tuned"}),
     (["--tta"], {"unet", "unet+tta", "unet+tta+tuned"})],
    ids=["plain", "tta"],
)
def test_real_data_benchmark_runs_end_to_end(
    sartorius_dir: Path, tmp_path: Path, options: list[str], scored: set[str]
) -> None:
    """``bench/real.py --quick``: the whole chain on a real subset, scored on its real validation images, for the
    models trained on real images (plain and tuned; with ``evaluate.tta``, the default, tuned on the TTA outputs
    and scored with TTA) and for the synthetic-only ones (the default pipeline's: plain, and tuned on its
    synthetic validation images' TTA outputs) (about 4 minutes)."""
    out, plot = tmp_path / "real.json", tmp_path / "curve.png"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real.py"), "--quick", "--tune", *options, "--data", str(sartorius_dir),
         "--work", str(tmp_path / "work"), "--out", str(out), "--plot", str(plot)],
        cwd=REPO, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"real training folds", "synthetic only (default)"}
    assert set(record["results"]["real training folds"]) == scored
    assert set(record["results"]["synthetic only (default)"]) == {"unet", "unet+tta+tuned"} | (scored & {"unet+tta"})
    tuned = json.loads((tmp_path / "work" / "real" / "models" / "unet" / "postprocess.json").read_text())
    assert tuned["tta"] is ("--tta" in options)
    assert {"params/map", "cross_validated/map", "gain"} <= set(record["tuning"]["unet"])
    for metrics in record["results"].values():
        assert {"map", "coco_segm_AP", "dice", "n_pred", "n_true", "image_type_accuracy"} <= set(metrics["unet"])
    assert record["unet_curve"] and "val/map" in record["unet_curve"][0] and plot.stat().st_size > 0


@pytest.mark.slow
def test_real_data_benchmark_transfer_only(sartorius_dir: Path, tmp_path: Path) -> None:
    """``bench/real.py --quick --transfer-only``: no model trained on real images; the synthetic-only U-Net is
    scored on the real validation images (those of the real split)."""
    out = tmp_path / "real.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real.py"), "--quick", "--transfer-only", "--data", str(sartorius_dir),
         "--synth-set", "synth.seed=1", "--work", str(tmp_path / "work"), "--out", str(out),
         "--plot", str(tmp_path / "curve.png")],
        cwd=REPO, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"synthetic only (default)"} and set(record["training"]) == {"synthetic"}
    assert not (tmp_path / "work" / "real" / "models").exists() and not (tmp_path / "curve.png").exists()
    scored = record["results"]["synthetic only (default)"]["unet"]
    assert json.loads((tmp_path / "work" / "real" / "split.json").read_text())["val"]
    assert scored["n_true"] > 0 and {"map", "dice", "recall50"} <= set(scored)
    assert record["synthetic_changes"] == {"synth.seed": 1}
    assert yaml.safe_load((tmp_path / "work" / "synthetic.yaml").read_text())["synth"]["seed"] == 1


@pytest.mark.parametrize("option", ["--set", "--synth-set"])
def test_real_data_benchmark_refuses_a_params_key_that_does_not_exist(
    sartorius_dir: Path, tmp_path: Path, option: str
) -> None:
    """A mistyped key (``synth.sed``) stops ``bench/real.py`` before any stage runs, naming the key."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real.py"), option, "synth.sed=1", "--data", str(sartorius_dir),
         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "real.json")],
        cwd=REPO, capture_output=True, text=True, env=ENV,
    )
    assert done.returncode != 0 and "synth.sed: params.yaml has no such key" in done.stderr
    assert not (tmp_path / "work" / "logs").exists() and not (tmp_path / "real.json").exists()


def test_tune_stage_writes_the_tuned_file_that_predict_then_uses(make_kaggle, tmp_path: Path) -> None:
    """The tune stage's file holds the values found, the scores and each fold; its metrics the gain; and
    ``cellseg predict`` on that checkpoint reads it by default."""
    root = make_kaggle(images_per_type=4)
    w = World(root=root, work=tmp_path / "work", params=base_params(root))
    w.work.mkdir()
    w.params["tune"].update(folds=2, unet={**w.params["tune"]["unet"], "min_size": [0, 1_000_000]})
    w.write_params()
    prepare(w, "tune")
    done = run(w, "tune")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((w.work / OUTPUTS["tune"][0]).read_text())
    assert record["model"] == "unet" and record["search"]["grid"]["min_size"] == [0, 1_000_000]
    assert set(record["search"]["grid"]) == {"marker_threshold", "mask_threshold", "min_size"}  # the boundary target's
    assert set(record["map"]) == {"params", "tuned", "cross_validated"} and len(record["folds"]) == 2
    assert record["map"]["tuned"]["all"] >= record["map"]["params"]["all"]
    metrics = json.loads((w.work / OUTPUTS["tune"][1]).read_text())
    assert metrics["gain"] == pytest.approx(metrics["cross_validated/map"] - metrics["params/map"])
    images = w.work / "images"
    images.mkdir()
    shutil.copy(w.image(), images / "a.png")
    predicted = subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "predict", "images", "--model", "models/unet/best.pt", "--out", "pred",
         "--device", "cpu"], cwd=w.work, capture_output=True, text=True,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "post-processing: tuned, from models/unet/postprocess.json" in predicted.stderr
