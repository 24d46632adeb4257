"""The project's ``params.yaml``, the one source of defaults, as typed params with a test's changes."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from cellseg import config

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@lru_cache(maxsize=1)
def _raw() -> dict:
    return config.read_params(PARAMS)


def project_params(name: str, **changes: Any) -> Any:
    """The params section ``name`` of ``params.yaml`` (dotted for a nested one: ``train.unet``,
    ``postprocess.maskrcnn``) with ``changes`` to its keys, validated as the pipeline validates it."""
    first, *rest = name.split(".")
    section = config.section(_raw(), first, path=PARAMS)
    for part in rest:
        section = getattr(section, part)
    return type(section).model_validate({**section.model_dump(), **changes})
