"""cellseg benchmark suite: one command, a table on stdout and the same rows as JSON.

    python bench/run.py [--images 606] [--out bench/results.json] [--quick]

Every ratio is ``baseline seconds / seconds``, both measured in this run (above 1: faster than the baseline).
Parts: 1 RLE codecs, 2 competition metric, 3 preprocessing stages, 4 data loading, 5 GPU (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from the library inside the benchmarks

import pandas as pd
import psutil
import torch
from cases import loading, metric, patch_dataset, rle_codecs, stages
from gpu import gpu
from measure import Result

from cellseg.data import ImageStore
from cellseg.decode import IMAGES_TABLE
from cellseg.models.maskrcnn import InstanceDataset
from cellseg.sources.synthetic import synthesize


def ensure_data(root: Path, n_images: int) -> Path:
    """``root`` holding the synthetic set of ``n_images`` images (seed 0), generated there unless present."""
    if not ((root / "train.csv").is_file() and len(list((root / "train").glob("*.png"))) == n_images):
        print(f"synthesizing {n_images} images into {root} ...", flush=True)
        synthesize(root, n_images=n_images, seed=0)
    return root


def machine() -> dict:
    """The CPU, memory and library versions the figures were measured with."""
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    return {
        "nproc": os.cpu_count(),
        "cpu": models[0] if models else platform.processor(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def print_table(rows: list[Result]) -> None:
    """The rows as a fixed-width table."""
    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = f"{'part':4} {'case':26} {'impl':22} {'time s':>9} {'rate':>11} {'unit':9} {'peak MiB':>9} " \
             f"{'ratio':>8}  {'vs':12} {'target':22} {'met':4} note"
    print(header)
    print("-" * len(header))
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        print(f"{r.part:4} {r.case:26} {r.impl:22} {num(r.seconds, '9.2f')} {num(r.rate, '11.1f')} {r.unit:9} "
              f"{num(r.peak_mb, '9.1f')} {num(r.ratio, '8.2f')}  {r.baseline:12} {r.target:22} {met:4} {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=606, help="images in the synthetic set (default 606)")
    parser.add_argument("--data", type=Path, help="where the synthetic set is or goes (default /tmp/syn<images>)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run on 12 images (under 2 minutes)")
    args = parser.parse_args()
    n_images = 12 if args.quick else args.images
    data = ensure_data(args.data or Path(f"/tmp/syn{n_images}"), n_images)
    began = time.perf_counter()
    info = machine()
    print(f"{n_images} images from {data}; {info['nproc']} × {info['cpu']}, {info['ram_gb']} GB", flush=True)

    parts: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="cellseg-bench-") as tmp:
        work = Path(tmp)
        print("3: preprocessing stages ...", flush=True)  # first: parts 2, 4 and 5 read their outputs
        parts["3"] = stages(data, work, n_images)
        decoded = work / "decoded"
        images = pd.read_parquet(decoded / IMAGES_TABLE)
        annotations = pd.read_csv(data / "train.csv", usecols=["annotation", "width", "height"])
        shapes = annotations[["height", "width"]].drop_duplicates()
        assert len(shapes) == 1, "the RLE benchmark expects images of one size"
        print(f"1: RLE codecs on {len(annotations)} annotations ...", flush=True)
        shape = (int(shapes["height"].iloc[0]), int(shapes["width"].iloc[0]))
        parts["1"] = rle_codecs(annotations["annotation"].tolist(), shape, sample=200)
        print("2: competition metric ...", flush=True)
        parts["2"] = metric(decoded, images["image_id"].tolist(), dense_images=12 if args.quick else 24)
        print("4: data loading ...", flush=True)
        parts["4"] = loading(data, decoded, work / "patches.parquet", max_images=64, batches=3 if args.quick else 40)
        print("5: GPU ...", flush=True)
        two = images["image_id"].tolist()[:2]
        instances = InstanceDataset(ImageStore(data, decoded, two), decoded, two)
        samples = [instances[i] for i in range(len(instances))]
        patches = partial(patch_dataset, data, decoded, work / "patches.parquet", max_images=n_images)
        parts["5"] = gpu(samples, patches, args.quick)

    rows = [row for part in sorted(parts) for row in parts[part]]
    print()
    print_table(rows)
    report = {"images": n_images, "quick": args.quick, "data": str(data), "machine": info,
              "suite_seconds": time.perf_counter() - began, "results": [asdict(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out} ({report['suite_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
