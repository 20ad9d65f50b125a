"""Caching-allocator settings as planner changes: each candidate PYTORCH_CUDA_ALLOC_CONF setting is
replayed on the same setup (estimate/_reserved.py), and ranked by the device total it leaves.

The candidates are the two settings PyTorch documents against fragmentation (docs/allocator.md,
"Settings syntax"; PyTorch "CUDA semantics", "Optimizing memory usage with
PYTORCH_CUDA_ALLOC_CONF"):
- `expandable_segments:True`: one growing segment per pool instead of fixed-size ones;
- `max_split_size_mb:N`: blocks above N MiB are never split, so large cached blocks are not
  carved up by small requests (at the cost of a retry when no unsplit block fits).
Neither changes the training step itself, so their cost on the planner's scale is 0.
"""
from __future__ import annotations

from dataclasses import replace

from vramplan.core._record import record
from vramplan.cuda._alloc_conf import AllocConf, as_conf

SOURCE = ("PyTorch CUDA semantics, 'Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF'; "
          "c10/cuda/CUDACachingAllocator.cpp (docs/allocator.md)")
# Settings tried, each merged into the user's own (a key the user set is replaced).
CANDIDATES = (("expandable_segments", "True", "one growing segment per pool: freed space is reused whatever its size"),
              ("max_split_size_mb", "128", "blocks above 128 MiB are not split by smaller requests"),
              ("max_split_size_mb", "512", "blocks above 512 MiB are not split by smaller requests"))


@record
class AllocatorChange:
    alloc_conf: str       # the full settings string to use
    setting: str          # the one setting that differs from the user's
    need_bytes: int       # device total under these settings
    saving_bytes: int     # device total under the user's settings minus need_bytes
    status: str | None    # core/_verdict.py on the planned GPU
    text: str
    source: str = SOURCE

    def to_dict(self) -> dict:
        return {"alloc_conf": self.alloc_conf, "setting": self.setting, "need_bytes": self.need_bytes,
                "saving_bytes": self.saving_bytes, "status": self.status, "text": self.text, "source": self.source}


def merged(base: AllocConf, key: str, value: str) -> str:
    """The user's settings string with `key` set to `value`."""
    parts = [p for p in base.text.split(",") if p.strip() and p.split(":", 1)[0].strip() != key]
    return ",".join(parts + [f"{key}:{value}"])


def ranked_allocator_changes(base, evaluate) -> tuple[AllocatorChange, ...]:
    """`evaluate(alloc_conf) -> (device total bytes, status)` for the planned setup. Candidates the
    user already runs are skipped; the rest are ranked by device total, lowest first."""
    conf = AllocConf.from_env() if base is None else as_conf(base)
    before, _ = evaluate(conf.text)
    out = []
    for key, value, text in CANDIDATES:
        candidate = merged(conf, key, value)
        if replace(as_conf(candidate), text="") == replace(conf, text=""):
            continue
        need, status = evaluate(candidate)
        out.append(AllocatorChange(candidate, f"{key}:{value}", need, before - need, status, text))
    return tuple(sorted(out, key=lambda c: c.need_bytes))
