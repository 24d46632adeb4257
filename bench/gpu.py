"""Part 5: GPU training and inference throughput of the U-Net and Mask R-CNN (CUDA only)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from cases import project_section
from measure import MB, Result, against
from torch.utils.data import DataLoader, Dataset

from cellseg.models.maskrcnn import build_maskrcnn, score_floor
from cellseg.models.unet import build_unet

SCHEDULE = 15 * 75_000  # the seed's U-Net schedule: 15 epochs of one 256-px window per cell

# The GPU recipe's Mask R-CNN (README, *The full recipe*), beside the CPU default's params.yaml section.
MASKRCNN_RECIPE = {
    "backbone": "resnet50_fpn_v2", "box_batch_size_per_image": 512, "rpn_pre_nms_top_n": 6000, "rpn_post_nms_top_n": 3000,
    "mask_head_channels": 256,
}


def _throughput(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """``(seconds per step, peak MiB allocated)`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - began) / steps, torch.cuda.max_memory_allocated(device) / MB


def _unet_step(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step of params.yaml's U-Net (EfficientNet-B0): AMP and channels_last on CUDA, AdamW,
    cross-entropy of the class logits."""
    model = build_unet(project_section("unet")).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            logits, _ = model(images)  # (class logits, cell-type logits)
            loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def unet_training(device: torch.device, batch: int = 64, size: int = 256, warmup: int = 5, steps: int = 20) -> Result:
    """U-Net training patches/s on random tensors already on the GPU: the compute bound."""
    step = _unet_step(device)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 3, (batch, size, size), device=device)
    seconds, peak = _throughput(lambda: step(images, targets), device, warmup, steps)
    rate = batch / seconds
    return Result("5", f"unet train {size}² b{batch}", "random tensors", seconds * steps, rate, "patches/s", peak,
                  note=f"15 epochs × 75,000 patches ≈ {SCHEDULE / rate / 60:.1f} min")


def unet_fed_training(device: torch.device, dataset: Dataset, workers: int, batch: int = 64, warmup: int = 5,
                      steps: int = 40) -> Result:
    """U-Net training patches/s fed by the real DataLoader (``dataset``: augmented windows, ``workers`` processes).

    Each step is synchronised, so a step's wall time is the wait for the loader plus the GPU's work: the GPU
    is busy for the share of the time not spent waiting (``note``).
    """
    step = _unet_step(device)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    stream = iter(loader)
    waited = total = 0.0
    for k in range(warmup + steps):
        began = time.perf_counter()
        item = next(stream)
        arrived = time.perf_counter()
        images = item["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        step(images, item["target"].to(device, non_blocking=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= warmup:
            waited += arrived - began
            total += time.perf_counter() - began
    rate = batch * steps / total
    return Result("5", f"unet train {dataset[0]['image'].shape[-1]}² b{batch}", f"DataLoader, {workers} workers",
                  total, rate, "patches/s", note=f"GPU busy {100 * (1 - waited / total):.0f} % of the time; "
                  f"15 epochs × 75,000 patches ≈ {SCHEDULE / rate / 60:.1f} min")


def maskrcnn(device: torch.device, samples: Sequence[tuple[torch.Tensor, dict]], scale: float,
             warmup: int = 3, steps: int = 10) -> list[Result]:
    """Mask R-CNN training (AMP, AdamW) and inference images/s on ``InstanceDataset`` items, batch 2; the GPU
    recipe's model (README: R50-FPN v2, 512 RoIs, 6000/3000 proposals; random init) at ``scale``, inferring with
    params.yaml's score floor (as its predictor does)."""
    model = build_maskrcnn(project_section("maskrcnn", image_scale=scale, **MASKRCNN_RECIPE)).to(device)
    score_floor(model, project_section("postprocess").maskrcnn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler("cuda")
    images = [image.to(device) for image, _ in samples]
    targets = [{k: v.to(device) for k, v in target.items() if isinstance(v, torch.Tensor)} for _, target in samples]

    def train_step() -> None:
        model.train()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            model(images)

    size = f"{round(704 * scale)}×{round(520 * scale)}"
    rows = []
    for mode, step in (("train", train_step), ("infer", infer_step)):
        seconds, peak = _throughput(step, device, warmup, steps)
        rows.append(Result("5", f"maskrcnn {mode} {size} b{len(images)}", "cuda amp", seconds * steps,
                           len(images) / seconds, "img/s", peak))
    return rows


def gpu(samples: Sequence[tuple[torch.Tensor, dict]], patches: Callable[[], Dataset], quick: bool) -> list[Result]:
    """Every GPU figure, or one row saying why there is none. ``patches()`` gives the U-Net's training dataset."""
    if not torch.cuda.is_available():
        return [Result("5", "gpu", "-", note="skipped: no CUDA device")]
    device = torch.device("cuda")
    steps = {"warmup": 2, "steps": 3} if quick else {}
    bound = unet_training(device, **steps)
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    fed = unet_fed_training(device, patches(), workers, **steps)
    rows = [bound, against(fed, "random tensors", fed.seconds * fed.rate / bound.rate)]
    for scale in (1.0, 2.0):
        rows += maskrcnn(device, samples, scale, **steps)
    return rows
