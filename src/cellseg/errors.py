"""The project's one exception family: caught at the CLI/stage boundary and printed as one line."""


def cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: what a message echoes of a file or another library stays short."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


class CellsegError(Exception):
    """Base of every error that cellseg raises on purpose (bad input, bad params, unreachable resources)."""


class DataError(CellsegError, ValueError):
    """Input data is malformed: the message names the file, the row and the problem."""


class ParamsError(CellsegError, ValueError):
    """A parameter is missing, of the wrong type or out of range: the message names the parameter."""


class ResourceError(CellsegError, RuntimeError):
    """Something the run needs cannot be reached (pretrained weights, a tracking server, a checkpoint)."""


class TrainingError(CellsegError, RuntimeError):
    """Training cannot go on (e.g. the loss diverged)."""
