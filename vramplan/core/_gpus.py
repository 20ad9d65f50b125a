"""GPU catalog and the --gpu argument: a catalog name ("A100-80GB", "rtx4090") or a size ("48GB")."""
from __future__ import annotations


from functools import lru_cache
from pathlib import Path

from vramplan.core._errors import GpuError, UsageError
from vramplan.core._record import record
from vramplan.core._units import MiB, parse_size

CATALOG = Path(__file__).parent / "catalog" / "gpus.toml"


@record
class Gpu:
    """A GPU to plan for: its name, the memory NVML reports, its architecture (None for a bare size)
    and where the figures come from (core/catalog/gpus.toml, docs/gpus.md)."""
    name: str
    memory_bytes: int           # what NVML reports as total
    arch: str | None = None     # None for a bare size
    source: str = "a size given by the user"
    compute_capability: str | None = None   # "8.6"; None for a bare size
    sms: int | None = None                  # multiprocessor count

    @property
    def cuda(self):
        """The card's cuda.arch.CudaArch, or None for a bare size (the kernel rules then assume one)."""
        if self.compute_capability is None:
            return None
        from vramplan.cuda._arch import CudaArch

        major, _, minor = self.compute_capability.partition(".")
        return CudaArch(int(major), int(minor), self.sms or 0, self.name)

    def to_dict(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "arch": self.arch, "source": self.source,
                "compute_capability": self.compute_capability, "sms": self.sms}


@lru_cache(maxsize=1)
def _entries() -> list[dict]:
    import tomllib     # only when a GPU is looked up by name: `--gpu 48GB` never parses the catalog

    return tomllib.loads(CATALOG.read_text())["gpu"]


@lru_cache(maxsize=1)
def catalog() -> tuple[Gpu, ...]:
    return tuple(Gpu(g["name"], g["memory_mib"] * MiB, g["arch"], g["source"], g["compute_capability"], g["sms"])
                 for g in _entries())


@lru_cache(maxsize=1)
def _index() -> dict[str, Gpu]:
    index = {}
    for raw, gpu in zip(_entries(), catalog()):
        for name in (raw["name"], *raw.get("aliases", ())):
            index[_norm(name)] = gpu
    return index


def _bare_size(text) -> Gpu:
    size = parse_size(text)
    if size < 256 * MiB or size > 2**50:
        raise UsageError(f"GPU size {text!r} is not a plausible GPU memory size",
                         hint="e.g. --gpu 24GB or --gpu 80GiB")
    return Gpu(str(text).strip(), size)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(" ", "-").removeprefix("nvidia-")


def resolve_gpu(text: str | int | Gpu) -> Gpu:
    """'A100-80GB' -> catalog entry; '48GB' / '24GiB' / 80e9 -> a bare size."""
    if isinstance(text, Gpu):      # a caller's own Gpu: its memory is checked as a size would be
        memory = text.memory_bytes
        if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
            raise UsageError(f"Gpu {text.name!r} memory_bytes must be a positive whole number, got {memory!r}",
                             hint="e.g. Gpu('my card', 24 * 2**30)")
        return text
    if isinstance(text, float) and text.is_integer():   # 24e9 from a library caller: bytes, as an int is
        text = int(text)
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UsageError(f"GPU memory must be positive, got {text}", hint="e.g. gpu='48GB'")
        if text < 256 * MiB or text > 2**50:    # the bounds _bare_size puts on "48GB": gpu=24 means bytes
            raise UsageError(f"GPU size {text} bytes is not a plausible GPU memory size",
                             hint="a number is bytes: e.g. gpu=24 * 2**30, or gpu='24GiB'")
        return Gpu(f"{text} bytes", text)
    key = _norm(str(text).strip())
    if key[:1] == "-" and key[1:2].isdigit():     # a negative size ("-4GB"): no catalog name starts so
        raise UsageError(f"GPU memory must be positive, got {text!r}", hint="e.g. --gpu 24GB or --gpu 80GiB")
    if key[:1].isdigit() and key[-1:] == "b":     # a size with its unit ("48gb", "24gib"): no catalog name
        return _bare_size(text)
    if key in _index():
        return _index()[key]
    if key[:1].isdigit():
        return _bare_size(text)
    import difflib

    close = difflib.get_close_matches(key, list(_index()), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(dict.fromkeys(_index()[c].name for c in close))}?" if close else \
        "run `vramplan gpus` for the catalog, or give a size like 24GB"
    if key == "all":   # `plan --gpu all` takes it before a single GPU is resolved
        hint = "`vramplan plan MODEL --gpu all` compares every catalog GPU; here give one, e.g. --gpu 24GB"
    raise GpuError(f"unknown GPU {text!r}", hint=hint)
