"""NVML: the device memory nvidia-smi shows, sampled in a background thread.

The sampler runs in the profiling (parent) process while training runs in a child process, so
it never competes with the training loop for the GIL; the only interference possible is inside
the driver while an NVML query runs. Its overhead is therefore bounded by the time spent in
queries: `overhead_fraction` = NVML query seconds during the measured steps / their wall time
(an upper bound: it assumes every query stalls the GPU process, which it does not).

`nvmlDeviceGetMemoryInfo` (nvidia-ml-py, `pynvml` module): `used` is what nvidia-smi reports
as Memory-Usage. With the v2 structure (driver >= 510) `used` excludes memory the driver
reserves for itself; v1 includes it. Either way the run's own use is taken as the difference
from a baseline read before the run created its CUDA context.

Everything takes an `nvml` module argument so tests can pass a fake; nothing here invents a
value when NVML is missing: `open_device` raises GpuError / DependencyError instead.
"""
from __future__ import annotations

import threading
import time


from vramplan.core._errors import DependencyError, GpuError
from vramplan.core._record import record

DEFAULT_HZ = 200.0   # the issue asks for >= 100 Hz; one query costs tens of microseconds


def load_nvml(nvml=None):
    """The pynvml module (from nvidia-ml-py), initialized."""
    if nvml is None:
        try:
            import pynvml as nvml  # noqa: PLC0415 - optional heavy-ish dependency
        except ImportError:
            raise DependencyError("pynvml is not installed (nvidia-ml-py provides it)",
                                  hint="pip install 'vramplan[profile]'") from None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        raise GpuError(f"NVML is not available: {_text(exc)}",
                       hint="needs an NVIDIA driver; on a machine without a GPU use --device cpu") from None
    return nvml


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


@record
class DeviceInfo:
    index: int
    name: str
    uuid: str
    total_bytes: int
    driver: str

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "uuid": self.uuid, "total_bytes": self.total_bytes,
                "driver": self.driver}


class NvmlDevice:
    """One GPU as NVML sees it."""

    def __init__(self, nvml, handle, index: int):
        self.nvml = nvml
        self.handle = handle
        self.index = index
        self._v2 = None

    def used(self) -> int:
        return int(self.memory().used)

    def memory(self):
        nvml = self.nvml
        if self._v2 is None:
            self._v2 = hasattr(nvml, "nvmlMemory_v2")
        if self._v2:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(self.handle, version=nvml.nvmlMemory_v2)
            except Exception:  # old driver or fake: fall back to v1 for good
                self._v2 = False
        return nvml.nvmlDeviceGetMemoryInfo(self.handle)

    def info(self) -> DeviceInfo:
        nvml = self.nvml
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = "unknown"
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(self.handle))
        except Exception:
            uuid = ""
        return DeviceInfo(self.index, _text(nvml.nvmlDeviceGetName(self.handle)), uuid,
                          int(self.memory().total), driver)


def open_device(index: int = 0, nvml=None, uuid: str | None = None) -> NvmlDevice:
    """The NVML device for CUDA device `index`, honouring CUDA_VISIBLE_DEVICES (an index list or
    UUIDs). Raises GpuError when NVML or the device is not there."""
    import os

    nvml = load_nvml(nvml)
    try:
        if uuid:
            return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByUUID(uuid), index)
        count = nvml.nvmlDeviceGetCount()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        target = visible[index] if index < len(visible) else (None if visible else str(index))
        if target is None:
            raise GpuError(f"CUDA device {index} is not among CUDA_VISIBLE_DEVICES={','.join(visible)}",
                           hint="pick --device cuda:N with N below the number of visible GPUs")
        if target.isdigit():
            if int(target) >= count:
                raise GpuError(f"no GPU {target}: NVML sees {count}",
                               hint="check --device and CUDA_VISIBLE_DEVICES (`nvidia-smi -L`)")
            return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByIndex(int(target)), index)
        return NvmlDevice(nvml, nvml.nvmlDeviceGetHandleByUUID(target), index)
    except GpuError:
        raise
    except Exception as exc:
        raise GpuError(f"NVML cannot open GPU {index}: {_text(exc)}", hint="check `nvidia-smi -L`") from None


class Sampler(threading.Thread):
    """Samples device used memory at `hz` until stop(); phase markers come from the caller.

    Keeps every sample's (time, used) only when `used` changed (plus the first and last), which
    loses nothing of the step function NVML reports and keeps records small. Times are
    time.monotonic() (CLOCK_MONOTONIC: the same clock in every process on the machine)."""

    def __init__(self, device: NvmlDevice, hz: float = DEFAULT_HZ, clock=time.monotonic):
        super().__init__(name="vramplan-nvml", daemon=True)
        self.device = device
        self.interval = 1.0 / hz
        self.hz = hz
        self.clock = clock
        self.points: list[tuple[float, int]] = []   # change points
        self.samples = 0
        self.query_seconds = 0.0
        self.query_times: list[tuple[float, float]] = []  # (t, seconds) per query, for windowed overhead
        self.markers: list[tuple[float, int | None, str]] = []
        self.last_used: int | None = None
        self.peak_used = 0
        self.error: str | None = None
        self.started_at: float | None = None
        self._last_t: float | None = None
        self.stopped_at: float | None = None
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def mark(self, step: int | None, phase: str, t: float | None = None) -> None:
        with self._lock:
            self.markers.append((self.clock() if t is None else t, step, phase))

    def sample_once(self) -> int:
        t0 = self.clock()
        used = self.device.used()
        t1 = self.clock()
        with self._lock:
            self.samples += 1
            self.query_seconds += t1 - t0
            self.query_times.append((t1, t1 - t0))
            if used != self.last_used:
                self.points.append((t1, used))
                self.last_used = used
            self._last_t = t1
            self.peak_used = max(self.peak_used, used)
        return used

    def run(self) -> None:
        self.started_at = self.clock()
        next_t = self.started_at
        try:
            while not self._stop_event.is_set():
                self.sample_once()
                next_t += self.interval
                delay = next_t - self.clock()
                if delay > 0:
                    self._stop_event.wait(delay)
                else:  # fell behind (a slow query): do not burst to catch up
                    next_t = self.clock()
        except Exception as exc:  # the device vanished mid-run: keep what was sampled
            self.error = _text(exc)
        finally:
            self.stopped_at = self.clock()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        with self._lock:
            if self.points and self._last_t is not None and self.points[-1][0] != self._last_t:
                self.points.append((self._last_t, self.last_used))  # the level held until the end

    # --- summaries ---------------------------------------------------------------------------------
    def rate_hz(self) -> float:
        if self.started_at is None or self.samples < 2:
            return 0.0
        end = self.stopped_at or self.clock()
        return self.samples / max(end - self.started_at, 1e-9)

    def query_seconds_between(self, t0: float, t1: float) -> float:
        with self._lock:
            return sum(s for t, s in self.query_times if t0 <= t <= t1)

    def peak_between(self, t0: float, t1: float) -> int | None:
        """Largest used value whose level was held at any moment inside [t0, t1]."""
        with self._lock:
            points = list(self.points)
        best = None
        level = None
        for t, used in points:
            if t < t0:
                level = used
                continue
            if t > t1:
                break
            best = used if best is None else max(best, used)
        if level is not None:
            best = level if best is None else max(best, level)
        return best

    def used_at(self, t: float) -> int | None:
        with self._lock:
            points = list(self.points)
        level = None
        for pt, used in points:
            if pt > t:
                break
            level = used
        return level
