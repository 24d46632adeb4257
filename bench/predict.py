"""``cellseg predict`` speed: a lab's large images in tiles, and the outputs written per image.

    python bench/predict.py [--model models/unet/best.pt] [--data ../shared/sartorius] [--out bench/predict_results.json]

On the 3 real public test images (704×520) and a 2048×2048 mosaic of them, each figure in seconds per
megapixel, with its ratio against the baseline measured in the same run: the predictor on a whole 704×520
image, as ``evaluate`` runs it (above 1: faster). Then the time of each output writer on one 704×520 image,
against that image's prediction. Peak memory is what Python and NumPy allocate (tracemalloc; torch's own
buffers unseen). Results and machine in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from measure import Result, against, clock, traced_peak_mb  # noqa: E402
from PIL import Image  # noqa: E402

from cellseg.exports import write_label_tiff, write_overlay, write_rois  # noqa: E402
from cellseg.inference import load_predictor  # noqa: E402
from cellseg.measure import cell_measurements  # noqa: E402
from cellseg.tiling import segment_any_size  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def per_megapixel(part: str, case: str, work, pixels: int, repeats: int = 2) -> Result:
    """The best of ``repeats`` runs of ``work``, in seconds per megapixel, with its traced peak memory."""
    seconds = min(clock(work) for _ in range(repeats)) / (pixels / 1e6)
    return Result(part, case, "cellseg", seconds=seconds, unit="s/Mpx", peak_mb=traced_peak_mb(work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "unet" / "best.pt")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "sartorius")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "predict_results.json")
    args = parser.parse_args()
    predictor = load_predictor(args.model, torch.device("cpu"))
    images = [np.asarray(Image.open(p)) for p in sorted((args.data / "test").glob("*.png"))]
    mosaic = np.block([[images[(r + c) % 3] for c in range(3)] for r in range(4)])[:2048, :2048]
    small = sum(image.size for image in images)
    base = per_megapixel("predict", "3 × 704×520, whole (evaluate's path)", lambda: predictor.predict(images), small)
    rows = [
        against(base, base.case, base.seconds),
        against(per_megapixel("predict", "3 × 704×520, any-size path", lambda: [
            segment_any_size(predictor, image) for image in images], small), base.case, base.seconds),
        against(per_megapixel("predict", "2048×2048 mosaic in 24 tiles, merged", lambda: segment_any_size(
            predictor, mosaic), mosaic.size, repeats=1), base.case, base.seconds),
    ]
    if predictor.name == "unet":  # fully convolutional: it can take the mosaic in one piece
        rows.append(against(per_megapixel("predict", "2048×2048 mosaic in one piece", lambda: predictor.predict(
            [mosaic]), mosaic.size, repeats=1), base.case, base.seconds))
    found = segment_any_size(predictor, images[0])
    predicted = clock(lambda: segment_any_size(predictor, images[0]))
    one = Result("outputs", "predicting the image", "cellseg", seconds=predicted, unit="s")
    rows.append(against(one, one.case, predicted))
    with tempfile.TemporaryDirectory() as folder:
        writers = {
            "label TIFF": lambda: write_label_tiff(Path(folder) / "a.tif", found.labels),
            "overlay PNG": lambda: write_overlay(Path(folder) / "a.png", images[0], found),
            "ImageJ ROI zip": lambda: write_rois(Path(folder) / "a.zip", found),
            "measurements": lambda: cell_measurements("a", found, images[0]),
        }
        for name, work in writers.items():
            result = Result("outputs", f"{name} ({len(found)} cells)", "cellseg", seconds=min(clock(work) for _ in range(3)),
                            unit="s", peak_mb=traced_peak_mb(work))
            rows.append(against(result, one.case, predicted))
    print("| part | case | s/Mpx or s | ratio (baseline / this) | peak MiB |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.part} | {row.case} | {row.seconds:.3f} {row.unit} | {row.ratio:.2f} | {row.peak_mb or 0:.0f} |")
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "model": predictor.name}
    args.out.write_text(json.dumps({"machine": machine, "rows": [vars(r) for r in rows]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
