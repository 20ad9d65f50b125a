"""`PYTORCH_CUDA_ALLOC_CONF` parsed the way PyTorch parses it, into a frozen `AllocConf`.

Upstream (pytorch/pytorch): the device-generic keys are parsed by
`c10/core/AllocatorConfig.cpp: AcceleratorAllocatorConfig::parseArgs` and its `parse*` helpers,
the CUDA-only keys by `c10/cuda/CUDAAllocatorConfig.cpp: CUDAAllocatorConfig::parseArgs`, both on
the tokens of `c10/core/AllocatorConfig.h: ConfigTokenizer`. docs/allocator.md lists every rule.
"""
from __future__ import annotations

import os
import re
from dataclasses import field, replace

from vramplan.core._errors import UsageError
from vramplan.core._record import record

MiB = 1024 * 1024
SIZE_MAX = 2**64 - 1          # C++ size_t max: "max_split_size unset" means every block may be split
LARGE_BUFFER = 20 * MiB       # kLargeBuffer: default large segment size and the minimum max_split_size_mb
MIN_LARGE_ALLOC = 10 * MiB    # kMinLargeAlloc: large_segment_size_mb must exceed it
# roundup_power2_divisions has one entry per power-of-two interval from 1 MiB to 64 GiB
# (AcceleratorAllocatorConfig: kRoundUpPowerOfTwoIntervals = 16, kRoundUpPowerOfTwoStart = 1 MiB).
ROUNDUP_INTERVALS = 16
MAX_REGISTER_THREADS = 128    # CUDAAllocatorConfig::pinned_max_register_threads()
ENV_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")

# Keys the device-generic parser owns; the CUDA parser skips them (AcceleratorAllocatorConfig::getKeys).
GENERIC_KEYS = frozenset({"large_segment_size_mb", "max_split_size_mb", "max_non_split_rounding_mb",
                          "garbage_collection_threshold", "roundup_power2_divisions", "expandable_segments",
                          "pinned_use_background_threads"})
_HINT = "see docs/allocator.md, section 'Settings syntax'"


@record
class AllocConf:
    """One parsed settings string. Sizes are bytes; `max_split_size == SIZE_MAX` means unset."""

    text: str = ""
    max_split_size: int = SIZE_MAX
    max_non_split_rounding_size: int = LARGE_BUFFER
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    garbage_collection_threshold: float = 0.0
    expandable_segments: bool = False
    large_segment_size: int = LARGE_BUFFER
    backend: str = "native"
    release_lock_on_cudamalloc: bool = False
    pinned_use_cuda_host_register: bool = False
    pinned_num_register_threads: int = 1
    pinned_use_background_threads: bool = False
    pinned_reserve_segment_size_mb: int = 0
    graph_capture_record_stream_reuse: bool = False
    per_process_memory_fraction: float | None = None
    ignored_keys: tuple[str, ...] = field(default=())

    @classmethod
    def parse(cls, text: str, base: AllocConf | None = None, *, accept_unknown_keys: bool = False) -> AllocConf:
        """Parse `text`. `base` is the settings in force before (what `_set_allocator_settings`
        re-parses over): `expandable_segments` carries over from it unless `text` sets it, the
        other allocator keys restart from their defaults (AcceleratorAllocatorConfig::parseArgs).
        `accept_unknown_keys` is the device-generic parser alone, which skips keys it does not
        know; the CUDA parser (the default) rejects them."""
        if not isinstance(text, str):
            raise UsageError(f"allocator settings must be a string, got {type(text).__name__}", hint=_HINT)
        return _Parser(text, base or cls(), accept_unknown_keys).run()

    @classmethod
    def from_env(cls, environ=None) -> AllocConf:
        """The settings PyTorch would read at start-up: the first of PYTORCH_ALLOC_CONF,
        PYTORCH_CUDA_ALLOC_CONF, PYTORCH_HIP_ALLOC_CONF that is set (AcceleratorAllocatorConfig::instance)."""
        environ = os.environ if environ is None else environ
        for name in ENV_VARS:
            if name in environ:
                try:
                    conf = cls.parse(environ[name])
                except UsageError as exc:     # say where the settings came from: no flag was given
                    raise UsageError(f"{name}={environ[name]!r} in the environment: {exc.message}",
                                     hint=f"fix or unset {name}, or give --alloc-conf") from None
                if conf.backend != "native":  # refused here, where its source is known (cuda/_allocator.py set_conf)
                    raise UsageError(f"{name}={environ[name]!r} in the environment: backend:{conf.backend} is not "
                                     "modelled", hint=f"the model covers the native caching allocator only: unset "
                                                      f"{name}, or give --alloc-conf")
                return conf
        return cls()

    @classmethod
    def from_snapshot_settings(cls, settings: dict) -> AllocConf:
        """The `allocator_settings` dict of a memory snapshot (torch/csrc/cuda/memory_snapshot.cpp:
        _memory_snapshot_pickle): the structured values win over the raw string, which only holds
        the last string parsed."""
        if not isinstance(settings, dict):
            raise UsageError("allocator_settings must be a mapping", hint="is this a memory snapshot?")
        raw = settings.get("PYTORCH_CUDA_ALLOC_CONF", settings.get("PYTORCH_ALLOC_CONF", "")) or ""
        conf = cls.parse(raw, accept_unknown_keys=True) if isinstance(raw, str) else cls()
        changes: dict = {}

        def refuse(reason: str):
            raise UsageError(f"the snapshot's allocator_settings are not the allocator's: {reason}",
                             hint="give a file written by torch.cuda.memory._dump_snapshot")
        split = settings.get("max_split_size")
        if isinstance(split, int) and not isinstance(split, bool):
            split = SIZE_MAX if split < 0 or split >= SIZE_MAX else split
            # the same floor as max_split_size_mb in the string (_size_mb_at_least_large_segment)
            if split < conf.large_segment_size:
                refuse(f"max_split_size {split} is below {conf.large_segment_size} bytes")
            changes["max_split_size"] = split
        gc = settings.get("garbage_collection_threshold")
        if isinstance(gc, (int, float)) and not isinstance(gc, bool):
            if not (gc == 0 or 0.0 < gc < 1.0):     # 0: unset (the allocator's default)
                refuse(f"garbage_collection_threshold {gc!r} is not in (0.0, 1.0)")
            changes["garbage_collection_threshold"] = float(gc)
        if isinstance(settings.get("expandable_segments"), bool):
            changes["expandable_segments"] = settings["expandable_segments"]
        table = settings.get("roundup_power2_divisions")
        if isinstance(table, dict) and table:
            # keyed by the interval's lower bound in MiB: "1", "2", ... "32768"
            divisions = list(conf.roundup_power2_divisions)
            for key, value in table.items():
                try:
                    index = int(key).bit_length() - 1
                except (TypeError, ValueError):
                    continue
                if 0 <= index < ROUNDUP_INTERVALS and isinstance(value, int) and not isinstance(value, bool):
                    if value != 0 and not _is_power_of_two(value):   # as parse_roundup_power2_divisions
                        refuse(f"roundup_power2_divisions values must be a power of 2 or 0, got {value}")
                    divisions[index] = value
            changes["roundup_power2_divisions"] = tuple(divisions)
        return replace(conf, **changes)

    def divisions_for(self, size: int) -> int:
        """AcceleratorAllocatorConfig::roundup_power2_divisions(size): interval log2(size) - 20,
        clamped to [0, 15]."""
        index = max(size.bit_length() - 1 - 20, 0)
        return self.roundup_power2_divisions[min(index, ROUNDUP_INTERVALS - 1)]

    @property
    def max_split_size_set(self) -> bool:
        return self.max_split_size != SIZE_MAX

    def to_dict(self) -> dict:
        return {"text": self.text,
                "max_split_size": None if not self.max_split_size_set else self.max_split_size,
                "max_non_split_rounding_size": self.max_non_split_rounding_size,
                "roundup_power2_divisions": list(self.roundup_power2_divisions),
                "garbage_collection_threshold": self.garbage_collection_threshold,
                "expandable_segments": self.expandable_segments,
                "large_segment_size": self.large_segment_size,
                "backend": self.backend}


def tokenize(text: str) -> list[str]:
    """ConfigTokenizer: `,` `:` `[` `]` are tokens of their own, spaces vanish, the rest accumulates."""
    tokens, buffer = [], []
    for ch in text:
        if ch in ",:[]":
            if buffer:
                tokens.append("".join(buffer))
                buffer = []
            tokens.append(ch)
        elif ch != " ":
            buffer.append(ch)
    if buffer:
        tokens.append("".join(buffer))
    return tokens


_STOULL = re.compile(r"\s*([+-]?)(\d+)")
_STOD = re.compile(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|infinity|nan)", re.IGNORECASE)


class _Parser:
    """One pass over the tokens, like the two C++ parseArgs loops fused (they see the same tokens)."""

    def __init__(self, text: str, base: AllocConf, accept_unknown_keys: bool):
        self.text = text
        self.tokens = tokenize(text)
        self.accept_unknown = accept_unknown_keys
        # parseArgs resets these to their defaults on every call; expandable_segments persists.
        self.values: dict = {"text": text, "expandable_segments": base.expandable_segments}
        self.ignored: list[str] = []

    def fail(self, reason: str):
        raise UsageError(f"invalid allocator settings {self.text!r}: {reason}", hint=_HINT)

    def token(self, i: int) -> str:
        if i >= len(self.tokens):
            self.fail("unexpected end of the settings string")
        return self.tokens[i]

    def expect(self, i: int, want: str) -> None:
        got = self.tokens[i] if i < len(self.tokens) else ""
        if got != want:
            self.fail(f"expected '{want}' but got '{got}'")

    def size_t(self, i: int) -> int:
        # std::stoull: leading digits count, trailing text is ignored, a minus sign wraps around.
        tok = self.token(i)
        m = _STOULL.match(tok)
        if not m:
            self.fail(f"expected a number but got '{tok}'")
        value = int(m.group(2))
        if value >= 2**64:
            self.fail(f"number '{tok}' is out of range")
        return (-value) % 2**64 if m.group(1) == "-" else value

    def double(self, i: int) -> float:
        tok = self.token(i)
        m = _STOD.match(tok)
        if not m:
            self.fail(f"expected a number but got '{tok}'")
        return float(m.group(0))

    def boolean(self, i: int) -> bool:
        tok = self.token(i)
        if tok not in ("True", "False"):
            self.fail(f"expected 'True' or 'False' but got '{tok}'")
        return tok == "True"

    def run(self) -> AllocConf:
        tokens, i = self.tokens, 0
        # large_segment_size_mb is read first: the minimum of max_split_size_mb and
        # max_non_split_rounding_mb depends on it (newest AcceleratorAllocatorConfig::parseArgs).
        for j, tok in enumerate(tokens):
            if tok == "large_segment_size_mb" and (j == 0 or tokens[j - 1] == ","):
                self.parse_large_segment_size(j)
        large = self.values.get("large_segment_size", LARGE_BUFFER)
        self.values["max_non_split_rounding_size"] = large
        while i < len(tokens):
            key = tokens[i]
            if key in _KEY_PARSERS:
                i = getattr(self, _KEY_PARSERS[key])(i)
            elif key in ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc"):
                self.expect(i + 1, ":")
                self.values["release_lock_on_cudamalloc"] = self.boolean(i + 2)
                i += 2
            elif key in ("pinned_use_cuda_host_register", "pinned_use_hip_host_register"):
                self.expect(i + 1, ":")
                self.values["pinned_use_cuda_host_register"] = self.boolean(i + 2)
                i += 2
            elif self.accept_unknown:
                self.ignored.append(key)
                i = self.skip_key(i)
            else:
                self.fail(f"unrecognized key '{key}'")
            if i + 1 < len(tokens):
                self.expect(i + 1, ",")
                i += 1
            i += 1
        return AllocConf(**self.values, ignored_keys=tuple(self.ignored))

    def skip_key(self, i: int) -> int:
        self.expect(i + 1, ":")
        i += 2
        if self.token(i) == "[":
            while self.token(i) != "]":
                i += 1
        return i

    # --- device-generic keys (AcceleratorAllocatorConfig::parse*) ----------------------------------

    def skip_large_segment_size_mb(self, i: int) -> int:
        return i + 2          # already read by parse_large_segment_size

    def parse_large_segment_size(self, i: int) -> None:
        self.expect(i + 1, ":")
        mb = self.size_t(i + 2)
        if mb <= MIN_LARGE_ALLOC // MiB:
            self.fail(f"large_segment_size_mb must be > {MIN_LARGE_ALLOC // MiB}, got {mb}")
        self.values["large_segment_size"] = min(mb, SIZE_MAX // MiB) * MiB

    def _size_mb_at_least_large_segment(self, i: int, key: str) -> int:
        self.expect(i + 1, ":")
        mb = self.size_t(i + 2)
        least = self.values.get("large_segment_size", LARGE_BUFFER) // MiB
        if mb < least:
            self.fail(f"{key} too small, must be >= {least}, got {mb}")
        return min(mb, SIZE_MAX // MiB) * MiB

    def parse_max_split_size_mb(self, i: int) -> int:
        self.values["max_split_size"] = self._size_mb_at_least_large_segment(i, "max_split_size_mb")
        return i + 2

    def parse_max_non_split_rounding_mb(self, i: int) -> int:
        self.values["max_non_split_rounding_size"] = self._size_mb_at_least_large_segment(
            i, "max_non_split_rounding_mb")
        return i + 2

    def parse_garbage_collection_threshold(self, i: int) -> int:
        self.expect(i + 1, ":")
        value = self.double(i + 2)
        if not 0.0 < value < 1.0:
            self.fail(f"garbage_collection_threshold must be in (0.0, 1.0), got {value:g}")
        self.values["garbage_collection_threshold"] = value
        return i + 2

    def parse_expandable_segments(self, i: int) -> int:
        self.expect(i + 1, ":")
        self.values["expandable_segments"] = self.boolean(i + 2)
        return i + 2

    def parse_pinned_use_background_threads(self, i: int) -> int:
        self.expect(i + 1, ":")
        self.values["pinned_use_background_threads"] = self.boolean(i + 2)
        return i + 2

    def parse_roundup_power2_divisions(self, i: int) -> int:
        """Plain `N` (a power of two) sets every interval; `[K:N,...,>:N]` sets interval log2(K)
        (K in MiB), the first N also fills every interval below the first K, `>` fills the
        intervals after the last K, unlisted ones stay 0 (parseRoundUpPower2Divisions)."""
        self.expect(i + 1, ":")
        i += 2
        table = [0] * ROUNDUP_INTERVALS
        if self.token(i) != "[":
            value = self.size_t(i)
            if not _is_power_of_two(value):
                self.fail(f"roundup_power2_divisions must be a power of 2, got {value}")
            self.values["roundup_power2_divisions"] = (value,) * ROUNDUP_INTERVALS
            return i
        first, last_index = True, 0
        i += 1
        while self.token(i) != "]":
            boundary_token = self.token(i)
            self.expect(i + 1, ":")
            value = self.size_t(i + 2)
            if value != 0 and not _is_power_of_two(value):
                self.fail(f"roundup_power2_divisions values must be a power of 2 or 0, got {value}")
            if boundary_token == ">":
                for k in range(last_index + 1, ROUNDUP_INTERVALS):
                    table[k] = value
            else:
                boundary = self.size_t(i)
                if not _is_power_of_two(boundary):
                    self.fail(f"roundup_power2_divisions intervals must be powers of 2, got {boundary}")
                index = min(boundary.bit_length() - 1, ROUNDUP_INTERVALS - 1)
                if first:
                    for k in range(index):
                        table[k] = value
                    first = False
                table[index] = value
                last_index = index
            i += 3
            if self.token(i) != "]":
                self.expect(i, ",")
                i += 1
        self.values["roundup_power2_divisions"] = tuple(table)
        return i

    # --- CUDA-only keys (CUDAAllocatorConfig::parse*) -----------------------------------------------

    def parse_backend(self, i: int) -> int:
        self.expect(i + 1, ":")
        value = self.token(i + 2)
        if value not in ("native", "cudaMallocAsync"):
            self.fail(f"unknown allocator backend '{value}', options are native and cudaMallocAsync")
        self.values["backend"] = value
        return i + 2

    def parse_pinned_num_register_threads(self, i: int) -> int:
        self.expect(i + 1, ":")
        value = self.size_t(i + 2)
        if not _is_power_of_two(value):
            self.fail(f"pinned_num_register_threads must be a power of 2, got {value}")
        if value > MAX_REGISTER_THREADS:
            self.fail(f"pinned_num_register_threads must be <= {MAX_REGISTER_THREADS}, got {value}")
        self.values["pinned_num_register_threads"] = value
        return i + 2

    def parse_pinned_reserve_segment_size_mb(self, i: int) -> int:
        self.expect(i + 1, ":")
        self.values["pinned_reserve_segment_size_mb"] = self.size_t(i + 2)
        return i + 2

    def parse_graph_capture_record_stream_reuse(self, i: int) -> int:
        self.expect(i + 1, ":")
        self.values["graph_capture_record_stream_reuse"] = self.boolean(i + 2)
        return i + 2

    def parse_per_process_memory_fraction(self, i: int) -> int:
        self.expect(i + 1, ":")
        value = self.double(i + 2)
        if not 0.0 <= value <= 1.0:
            self.fail(f"per_process_memory_fraction must be in [0.0, 1.0], got {value:g}")
        self.values["per_process_memory_fraction"] = value
        return i + 2


_KEY_PARSERS = {
    "large_segment_size_mb": "skip_large_segment_size_mb",
    "max_split_size_mb": "parse_max_split_size_mb",
    "max_non_split_rounding_mb": "parse_max_non_split_rounding_mb",
    "garbage_collection_threshold": "parse_garbage_collection_threshold",
    "expandable_segments": "parse_expandable_segments",
    "pinned_use_background_threads": "parse_pinned_use_background_threads",
    "roundup_power2_divisions": "parse_roundup_power2_divisions",
    "backend": "parse_backend",
    "pinned_num_register_threads": "parse_pinned_num_register_threads",
    "pinned_reserve_segment_size_mb": "parse_pinned_reserve_segment_size_mb",
    "graph_capture_record_stream_reuse": "parse_graph_capture_record_stream_reuse",
    "per_process_memory_fraction": "parse_per_process_memory_fraction",
}


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def as_conf(conf: AllocConf | str | None) -> AllocConf:
    """An AllocConf from a settings string, an AllocConf, or None (the defaults)."""
    if conf is None:
        return AllocConf()
    if isinstance(conf, AllocConf):
        return conf
    return AllocConf.parse(conf)
