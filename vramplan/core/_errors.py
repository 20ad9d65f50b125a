"""Errors a user can cause. The CLI prints them as one line, `Error: message (hint)`, never a
traceback; library callers catch VramplanError."""
from __future__ import annotations


class VramplanError(Exception):
    """Bad input or an unavailable resource. exit_code 1; usage errors use 2."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class UsageError(VramplanError):
    """A flag or argument the CLI cannot accept."""

    exit_code = 2


class ModelError(VramplanError):
    """Unknown model, malformed config, or an architecture the analytic model does not know."""


class UnmodelledError(ModelError):
    """A model (or a config setting) the analytic estimate does not model that transformers builds:
    `vramplan simulate` traces it without the estimate beside it (simulate/_build.py simulation_spec)."""


class GpuError(VramplanError):
    """Unknown GPU, or no GPU / NVML where one is required."""


class SimulationError(VramplanError):
    """The simulated training step (vramplan simulate) hit something it cannot answer or run: a
    data-dependent value on the meta device, or an op that failed mid-way (which op, which module)."""


class DependencyError(VramplanError):
    """An optional package (torch, transformers, peft, bitsandbytes, pandas, pynvml) is missing."""


def require(module: str, extra: str):
    """Import an optional heavy module, or raise DependencyError with the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(f"{module} is not installed ({exc})",
                              hint=f"pip install 'vramplan[{extra}]'") from None
