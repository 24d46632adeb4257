"""Typed, validated parameters: one pydantic model per ``params.yaml`` section.

A wrong value fails before any work, with the parameter's dotted name in the message: a wrong type, a value
out of its range (bounds that keep a run within what a machine can hold), a device the machine lacks, a
missing or unknown key or section. No field has a default: ``params.yaml`` is the one source of them. The file itself is read within bounds: at most :data:`MAX_PARAMS_BYTES`, no YAML
aliases (a few of them expand into gigabytes), nesting at most :data:`MAX_DEPTH` deep.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cellseg.celltypes import CELL_TYPES, DEFAULT
from cellseg.errors import ParamsError, cut

MAX_PARAMS_BYTES = 1 << 20
MAX_DEPTH = 32
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's and torch's seed range


def _check_device(name: str) -> str:
    from cellseg.devices import check_device  # imports torch: only where a device is validated

    return check_device(name)


def _check_augment(name: str) -> str:
    from cellseg.augment import AUGMENTATIONS  # imports albumentations: only where augmentations are validated

    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; the names are {', '.join(AUGMENTATIONS)}")
    return name


def _check_cell_types(values: dict[str, Any]) -> dict[str, Any]:
    """A per-cell-type param names only cell types (and :data:`~cellseg.celltypes.DEFAULT`), and covers them all."""
    keys = (*CELL_TYPES, DEFAULT)
    if unknown := [key for key in values if key not in keys]:
        raise ValueError(f"unknown cell type {unknown[0]!r}; the keys are {', '.join(keys)}")
    if DEFAULT not in values and (missing := [name for name in CELL_TYPES if name not in values]):
        raise ValueError(f"no entry for {', '.join(missing)} and no {DEFAULT!r}")
    return values


def _one_for_all(value: Any) -> Any:
    """A per-cell-type param given as one value: the :data:`~cellseg.celltypes.DEFAULT` of every cell type."""
    return value if isinstance(value, dict) else {DEFAULT: value}


Device = Annotated[str, AfterValidator(_check_device)]
Augment = Annotated[str, AfterValidator(_check_augment)]
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]
# The post-processing values: each one a value, or one per cell type (PerType); the tune stage's search lists
# hold the same kinds of values (Candidates).
MinSize = Annotated[int, Field(ge=0, le=1_000_000)]  # pixels
Score = Annotated[float, Field(ge=0.0, le=1.0)]
CellprobThreshold = Annotated[float, Field(ge=-20.0, le=20.0)]  # a logit, as cellpose's
FlowThreshold = Annotated[float, Field(ge=0.0, le=10.0)]  # 0: no flow-error check
V = TypeVar("V")
PerType = Annotated[dict[str, V], BeforeValidator(_one_for_all), AfterValidator(_check_cell_types)]
Candidates = Annotated[list[V], Field(min_length=1, max_length=100)]


class Section(BaseModel):
    """Base of every params section: every key is required (``params.yaml`` is the one source of defaults);
    unknown keys and type coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataParams(Section):
    """``data``: where the raw data comes from."""

    source: Literal["synthetic", "kaggle", "livecell"]
    root: str
    limit_images: int | None = Field(ge=1)
    seed: Seed


class SynthParams(Section):
    """``synth``: the embedded synthetic data set (used when ``data.source`` is ``synthetic``)."""

    images: int = Field(ge=1, le=10_000)  # 10,000 images: about 2 GB of PNG
    seed: Seed


class SplitParams(Section):
    """``split``: K-fold split stratified by cell type, grouped by sample."""

    n_folds: int = Field(ge=2, le=1000)
    fold: int = Field(ge=0)
    seed: Seed

    @model_validator(mode="after")
    def _fold_in_range(self) -> SplitParams:
        if self.fold >= self.n_folds:
            raise ValueError(f"fold {self.fold} is out of range for n_folds {self.n_folds} (0..{self.n_folds - 1})")
        return self


class PatchParams(Section):
    """``patches``: one training window per annotated cell of the training split."""

    size: int = Field(ge=32, le=2048, multiple_of=32)
    jitter: float = Field(ge=0.0, le=1.0)
    per_cell: int = Field(ge=1, le=100)
    background_fraction: float = Field(ge=0.0, le=10.0)
    seed: Seed


class ModelInput(Section):
    """What every model section has: the training augmentations and the input normalisation (0..1 scale)."""

    augment: list[Augment]
    mean: float = Field(ge=0.0, le=1.0)
    std: float = Field(gt=0.0)


class UNetParams(ModelInput):
    """``unet``: the U-Net, its targets, loss and augmentations."""

    encoder: str
    encoder_weights: str  # imagenet | none | <path to a local weights file>
    decoder_channels: list[Annotated[int, Field(ge=1, le=1024)]] = Field(min_length=5, max_length=5)
    channels: Literal[1, 3]
    target: Literal["boundary", "flows"]
    loss: Literal["ce", "ce_dice"]
    type_loss_weight: float = Field(ge=0.0, le=100.0)
    boundary_width: int = Field(ge=1, le=5)

    @model_validator(mode="after")
    def _flows_follow_augmentations(self) -> UNetParams:
        from cellseg.augment import MOVES_PIXELS, SYMMETRIC  # imports albumentations: only where validated

        if self.target == "flows" and (bent := [n for n in self.augment if n in MOVES_PIXELS and n not in SYMMETRIC]):
            raise ValueError(
                f"augment {bent[0]!r} bends the flow target's vectors; with target 'flows' the geometric "
                f"augmentations are {', '.join(SYMMETRIC)}"
            )
        return self


class MaskRCNNParams(ModelInput):
    """``maskrcnn``: torchvision's Mask R-CNN, sized for cells."""

    backbone: Literal["resnet50_fpn_v2", "resnet50_fpn", "resnet34_fpn", "resnet18_fpn", "mobilenet_v3_large_fpn"]
    weights: str  # coco | imagenet | none | <path to a local weights file>
    image_scale: float = Field(gt=0.0, le=4.0)  # 2.0: 704×520 images upscaled ×2
    anchor_sizes: list[Annotated[int, Field(ge=1, le=2048)]] = Field(min_length=5, max_length=5)
    aspect_ratios: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(min_length=1, max_length=32)
    detections_per_img: int = Field(ge=1, le=20_000)
    rpn_pre_nms_top_n: int = Field(ge=1, le=200_000)
    rpn_post_nms_top_n: int = Field(ge=1, le=200_000)
    box_batch_size_per_image: int = Field(ge=1, le=20_000)
    mask_head_channels: int = Field(ge=1, le=4096)  # width of the mask head's 4 convolutions (torchvision: 256)


class TrainParams(Section):
    """``train.<model>``: the shared trainer's settings for one model."""

    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(ge=1, le=4096)  # per process under torchrun (global batch: batch_size × processes)
    lr: float = Field(gt=0.0, le=10.0)
    weight_decay: float = Field(ge=0.0, le=10.0)
    warmup_epochs: float = Field(ge=0.0, le=100_000)
    grad_clip: float | None = Field(gt=0.0)
    workers: int = Field(ge=0, le=256)
    seed: Seed
    resume: bool
    amp: bool
    channels_last: bool
    device: Device
    samples_per_epoch: int | None = Field(ge=1, le=100_000_000)  # over all processes under torchrun


class TrainSection(Section):
    """``train``: one block of trainer settings per model."""

    unet: TrainParams
    maskrcnn: TrainParams


class UNetPostprocess(Section):
    """``postprocess.unet``: how the U-Net's outputs become instances: a watershed (target ``boundary``) or
    cellpose's flow dynamics (target ``flows``); each value applies to the image's predicted cell type."""

    marker_threshold: PerType[Probability]
    mask_threshold: PerType[Probability]
    cellprob_threshold: PerType[CellprobThreshold]
    flow_threshold: PerType[FlowThreshold]
    min_size: PerType[MinSize]


class MaskRCNNPostprocess(Section):
    """``postprocess.maskrcnn``: which Mask R-CNN detections become instances; each value applies to the
    detection's predicted class."""

    mask_threshold: PerType[Probability]
    score_threshold: PerType[Score]
    min_size: PerType[MinSize]


class PostprocessSection(Section):
    """``postprocess``: one block per model; read by its training's validation (which picks ``best.pt``), stored
    in its checkpoints (``cellseg predict`` uses them unless the tune stage's file is there), the tune stage's
    starting point, and what ``evaluate`` uses with ``evaluate.postprocess: params``."""

    unet: UNetPostprocess
    maskrcnn: MaskRCNNPostprocess


class UNetSearch(Section):
    """``tune.unet``: the values the tune stage tries for each cell type (those of the U-Net's target)."""

    marker_threshold: Candidates[Probability]
    mask_threshold: Candidates[Probability]
    cellprob_threshold: Candidates[CellprobThreshold]
    flow_threshold: Candidates[FlowThreshold]
    min_size: Candidates[MinSize]


class MaskRCNNSearch(Section):
    """``tune.maskrcnn``: the values the tune stage tries for each cell type."""

    mask_threshold: Candidates[Probability]
    score_threshold: Candidates[Score]
    min_size: Candidates[MinSize]


class TuneParams(Section):
    """``tune``: the search of each model's post-processing per cell type on the validation images."""

    folds: int = Field(ge=2, le=100)  # the gain reported: each fold scored with values searched on the others
    rounds: int = Field(ge=1, le=20)  # passes over every (value, cell type)
    seed: Seed
    unet: UNetSearch
    maskrcnn: MaskRCNNSearch


class EvaluateParams(Section):
    """``evaluate``: how the evaluate stage (and the tune stage) run the trained models."""

    postprocess: Literal["tuned", "params"]  # the tune stage's files, or the params' postprocess section
    tta: list[Literal["unet", "maskrcnn"]]  # models evaluated (and tuned) with test-time augmentation


class TrackingParams(Section):
    """``tracking``: MLflow. ``uri: null`` → ``MLFLOW_TRACKING_URI`` or the local default store."""

    enabled: bool
    uri: str | None
    experiment: str = Field(min_length=1, max_length=500)


SECTIONS: dict[str, type[Section]] = {
    "data": DataParams,
    "synth": SynthParams,
    "split": SplitParams,
    "patches": PatchParams,
    "unet": UNetParams,
    "maskrcnn": MaskRCNNParams,
    "train": TrainSection,
    "postprocess": PostprocessSection,
    "tune": TuneParams,
    "evaluate": EvaluateParams,
    "tracking": TrackingParams,
}

S = TypeVar("S", bound=Section)


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and nesting deeper than :data:`MAX_DEPTH`."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise ParamsError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not accepted in params")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise ParamsError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_params(path: str | Path = "params.yaml") -> dict:
    """Read the raw params file (within the module docstring's bounds); a missing, oversized or malformed file,
    or an unknown section, raises :class:`ParamsError`."""
    path = Path(path)
    try:
        if (size := path.stat().st_size) > MAX_PARAMS_BYTES:
            raise ParamsError(f"{path}: {size:,} bytes; a params file holds at most {MAX_PARAMS_BYTES:,}")
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamsLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file is missing") from None
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({cut(' '.join(str(exc).split()), 300)})") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    for name in raw:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the sections are {', '.join(SECTIONS)}"
            raise ParamsError(f"{path}: unknown section {cut(repr(name))}: {hint}")
    return raw


def data_root(raw: dict) -> Path | None:
    """The params' ``data.root`` when it is given as a string (its validation is the ``data`` section's)."""
    data = raw.get("data")
    root = data.get("root") if isinstance(data, dict) else None
    return Path(root) if isinstance(root, str) else None


def section(raw: dict, name: str, model: type[S] | None = None, *, path: str | Path = "params.yaml") -> S:
    """Validate the section ``name`` of ``raw`` params; errors name ``section.key`` and the bad value."""
    model = model or SECTIONS[name]
    if name not in raw:
        raise ParamsError(f"{path}: no section {name!r} (params.yaml in the repository has every section)")
    values = raw[name]
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: {name}: expected a mapping, got {type(values).__name__}")
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join([name, *map(str, error["loc"])]) if error["loc"] else name
        given = f" (got {cut(repr(error['input']))})" if error["type"] != "missing" and error["loc"] else ""
        raise ParamsError(f"{path}: {key}: {error['msg']}{given}") from None


def load(name: str, path: str | Path = "params.yaml") -> Section:
    """Read ``path`` and return its validated section ``name``."""
    return section(read_params(path), name, path=path)
