"""The parent side of `vramplan profile`: start the child run, sample NVML in a background thread,
turn the child's events into a Record, write it atomically.

No torch here: the parent stays up whatever happens to CUDA in the child. Outcomes:
- the child reports a result: status "ok";
- it reports an out-of-memory: status "oom" (a result: step, phase, last values);
- it reports another runtime error, dies (signal, CUDA fatal error) or passes the timeout:
  "error", "crashed", "timeout", with what was measured until then;
- it reports a setup error before measuring (no GPU, no weights, bad targets): the same
  VramplanError is raised here and no record is written;
- Ctrl-C: the child is ended, nothing is written, KeyboardInterrupt propagates.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vramplan.core import _errors as _errors
from vramplan.core._errors import UsageError, VramplanError
from vramplan.core._record import record
from vramplan.profile._record import (
    errors_for, estimate_dict, Failure, Measured, MIN_TOLERANCE, model_dict, NvmlTrace, PhaseStats, Record,
    relative_error, tolerances_for,
)
from vramplan.profile._store import atomic_move, check_out_folder, record_id, unique_path, write_record
from vramplan.core._gpus import Gpu, resolve_gpu
from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.cuda._alloc_conf import AllocConf
from vramplan.estimate._estimator import estimate
from vramplan.profile._nvml import open_device, Sampler

DEFAULT_STEPS = 5        # on a GPU: the caching allocator and NVML vary a little from step to step
# On the CPU the tracker counts every storage exactly, so the measured steps repeat to the byte:
# two show that the step is steady (a third adds nothing but ~4 s a step on a 2-core machine).
DEFAULT_CPU_STEPS = 2
DEFAULT_WARMUP = 1
MIN_LIMIT = 256 * 2**20


@record
class ProfileOptions:
    device: str = "cuda"
    steps: int | None = None      # None: DEFAULT_STEPS on a GPU, DEFAULT_CPU_STEPS on the CPU
    warmup: int = DEFAULT_WARMUP
    random_weights: bool = False
    seed: int = 0
    memory_limit_bytes: int | None = None   # emulate a smaller GPU (--gpu)
    snapshot: bool = False
    timeout_s: float | None = None
    nvml_hz: float = 200.0
    model_ref: str | None = None
    # PYTORCH_CUDA_ALLOC_CONF for the training child (None: the environment's); the child sets it
    # before its first CUDA call, which is when c10's CUDAAllocatorConfig reads it
    alloc_conf: str | None = None

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_CPU_STEPS if self.device == "cpu" else DEFAULT_STEPS)

    def validate(self) -> None:
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device == "cuda" or
                                                    (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise UsageError(f"unknown device {self.device!r}", hint="--device takes cuda, cuda:N or cpu")
        for flag, value, low in (("--steps", self.steps, 1), ("--warmup", self.warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{flag} must be a whole number >= {low}, got {value!r}", hint=f"e.g. {flag} 3")
        # torch.manual_seed takes a 64-bit integer (the CPU generator's seed is an int64 on the way
        # in: a larger one failed in the child, after the estimate, with "Overflow when unpacking long long")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be a whole number in [0, 2**63), got {self.seed!r}", hint="e.g. --seed 0")
        if self.steps + self.warmup > 10000:
            raise UsageError(f"--steps {self.steps} is beyond a profile run (max 10000)", hint="e.g. --steps 5")
        if self.snapshot and self.device == "cpu":
            raise UsageError("--snapshot needs a GPU (torch.cuda.memory snapshots)", hint="drop --snapshot with --device cpu")
        if self.timeout_s is not None and not (0 < self.timeout_s < float("inf")):   # NaN fails both
            raise UsageError(f"--timeout must be a positive number of seconds, got {self.timeout_s}",
                             hint="e.g. --timeout 600, or leave it out for no limit")
        if not 1 <= self.nvml_hz <= 2000:
            raise UsageError(f"--nvml-hz must be in [1, 2000], got {self.nvml_hz}", hint="e.g. --nvml-hz 200")
        if self.memory_limit_bytes is not None and self.memory_limit_bytes < MIN_LIMIT:
            raise UsageError("--gpu is too small to emulate", hint="e.g. --gpu 24GB")
        if self.alloc_conf is not None:
            AllocConf.parse(self.alloc_conf)   # a malformed string is a UsageError before anything runs

    def to_dict(self) -> dict:
        out = {"device": self.device, "steps": self.steps, "warmup": self.warmup,
               "random_weights": self.random_weights, "seed": self.seed,
               "memory_limit_bytes": self.memory_limit_bytes, "snapshot": self.snapshot,
               "timeout_s": self.timeout_s, "nvml_hz": self.nvml_hz, "alloc_conf": self.alloc_conf}
        if self.random_weights:   # how the weights were built (profile/_materialize.py BUILD)
            from vramplan.profile._materialize import BUILD
            out["random_weights_build"] = BUILD
        return out


# --- launching the child ----------------------------------------------------------------------------

class _Child:
    """A started child: a readable Connection and a way to end it."""

    def __init__(self, conn, proc=None, mp_proc=None):
        self.conn = conn
        self.proc = proc
        self.mp_proc = mp_proc

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.mp_proc.is_alive()

    def exitcode(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return self.mp_proc.exitcode

    def wait(self, timeout: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self.mp_proc.join(timeout)

    def kill(self) -> None:
        """SIGTERM, then SIGKILL after 5 s (a process stuck in a CUDA call ignores SIGTERM)."""
        target = self.proc if self.proc is not None else self.mp_proc
        try:
            target.terminate()
        except (ProcessLookupError, OSError, AttributeError):
            pass
        self.wait(5)
        if self.alive():
            try:
                target.kill()
            except (ProcessLookupError, OSError, AttributeError):
                pass
            self.wait(5)


class SubprocessLauncher:
    """A fresh interpreter per run: `python -m vramplan.profile._runner` (the CLI's way)."""

    def start(self, job: dict, workdir: Path) -> _Child:
        from multiprocessing.connection import Connection

        job_file = workdir / "job.json"
        job_file.write_text(json.dumps(job))
        r, w = os.pipe()
        env = dict(os.environ)
        env.update(_child_env())
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the vramplan package
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(workdir / "child.log", "ab") as log:
            try:
                proc = subprocess.Popen([sys.executable, "-m", "vramplan.profile._runner", "--job", str(job_file),
                                         "--fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, env=env, start_new_session=True)
            finally:
                os.close(w)
        return _Child(Connection(r, writable=False), proc=proc)


class ForkServerLauncher:
    """Children forked from a server that already imported torch / transformers / peft, so each
    run starts in a fraction of a second but still in its own process with its own CUDA context.
    The server never touches CUDA (PYTORCH_NVML_BASED_CUDA_CHECK=1 keeps torch.cuda.is_available
    from initializing the driver), which is what makes forking it safe."""

    # Not peft: `import peft` imports bitsandbytes (peft.helpers), whose import asks
    # torch.cuda.get_device_capability (bitsandbytes/cuda_specs.py) and so initializes CUDA, after
    # which no forked child can use the GPU ("Cannot re-initialize CUDA in forked subprocess").
    PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.quantizers.auto",
               "transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
               "vramplan.profile._runner", "vramplan.simulate._build")

    def __init__(self, preload=PRELOAD):
        import multiprocessing

        for k, v in _child_env().items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(list(preload))

    def start(self, job: dict, workdir: Path) -> _Child:
        from vramplan.profile._runner import child_entry  # child-process code: loaded when a child starts

        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child_entry, args=(job, writer), daemon=False)
        proc.start()
        writer.close()
        return _Child(reader, mp_proc=proc)


def _child_env() -> dict:
    return {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}


# --- the run -------------------------------------------------------------------------------------------

@dataclass
class _State:
    environment: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)
    phases: list = field(default_factory=list)
    markers: list = field(default_factory=list)
    current: dict = field(default_factory=dict)   # last phase start
    result: dict | None = None
    failure: dict | None = None
    error: dict | None = None
    snapshot: str | None = None
    last_allocated: int | None = None
    peak_allocated: int = 0


def profile(model: str, setup=None, options: ProfileOptions | None = None, out: str | os.PathLike | None = None,
            on_event=None, launcher=None) -> tuple[Record, Path | None]:
    """Profile `model` under `setup`; returns (record, path written or None).

    on_event(event: dict) is called for every child event and, on a GPU, with NVML samples
    ({"event": "nvml", "used": bytes}) a few times a second: the CLI draws its progress from them."""

    options = options or ProfileOptions()
    options.validate()
    setup = setup or TrainSetup()
    if setup.autocast and options.device == "cpu":
        # CPU autocast has its own op lists (docs/recipes.md#cpu-autocast-differs): a CPU run under
        # autocast would not measure what a GPU's autocast does
        raise UsageError(f"--amp {setup.amp} on the CPU runs CPU autocast, whose op lists differ from CUDA's",
                         hint="profile it on a GPU, or use `vramplan simulate` for the CUDA step")
    spec = resolve(model)
    model_ref = options.model_ref or model
    weights = None if options.random_weights else _weights_source(model, spec)
    cuda = options.device != "cpu"
    index = int(options.device.split(":")[1]) if ":" in options.device else 0
    limit_gpu = resolve_gpu(options.memory_limit_bytes) if options.memory_limit_bytes else None
    pre = estimate(spec, setup, gpu=limit_gpu, alloc_conf=options.alloc_conf)   # validates targets etc. before any child starts
    if not cuda and limit_gpu is not None and limit_gpu.memory_bytes <= pre.cuda_context_bytes:
        # the CPU emulates what the card leaves the allocator (_runner.py _meter), as a GPU run checks it
        raise UsageError(f"--gpu {limit_gpu.memory_bytes:,} bytes is less than the CUDA context "
                         f"({pre.cuda_context_bytes:,} bytes)", hint="give a larger GPU size")
    if out is not None:
        check_out_folder(out)

    sampler, nvml_reason, nvml_dev = None, None, None
    if cuda:
        sampler, nvml_dev, nvml_reason = _start_sampler(index, options.nvml_hz)
    else:
        nvml_reason = "--device cpu: no GPU to sample"

    t0 = time.monotonic()
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rid = record_id(spec.id, setup.to_dict(), options.device, created)
    out_dir = Path(out) if out is not None else None
    workdir = Path(tempfile.mkdtemp(prefix="vramplan-profile-"))
    snapshot_tmp = None
    if options.snapshot and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        snapshot_tmp = out_dir / f".tmp-{os.getpid()}-{rid}.snapshot.pickle"
    elif options.snapshot:
        snapshot_tmp = workdir / f"{rid}.snapshot.pickle"
    job = {"model_id": spec.id, "model_source": spec.source, "config": spec.build_config() if getattr(spec, "wrapper", None) else spec.config, "setup": setup.to_dict(),
           "device": options.device, "steps": options.steps, "warmup": options.warmup,
           "random_weights": options.random_weights, "weights": weights, "seed": options.seed,
           "memory_limit_bytes": options.memory_limit_bytes, "predicted_context_bytes": pre.cuda_context_bytes,
           "snapshot_path": str(snapshot_tmp) if snapshot_tmp else None, "log_path": str(workdir / "child.log"),
           "nvml_uuid": None, "alloc_conf": options.alloc_conf}
    state = _State()
    launcher = launcher or SubprocessLauncher()
    child = None
    status = "ok"
    exit_code = None
    try:
        child = launcher.start(job, workdir)
        status, exit_code = _pump(child, state, sampler, options, t0, on_event)
    except BaseException:
        if child is not None and child.alive():
            child.kill()
        if sampler is not None:
            sampler.stop()
        _cleanup(workdir, snapshot_tmp)
        raise
    if sampler is not None:
        sampler.stop()
    if state.error is not None:
        error = _as_error(state.error)
        details = state.error.get("traceback")
        if details:  # an unexpected failure: keep the child's log and traceback for the user
            (workdir / "error.txt").write_text(details)
            error.hint = f"details in {workdir}/error.txt and child.log"
            error.details = details
            _cleanup(None, snapshot_tmp)
        else:
            _cleanup(workdir, snapshot_tmp)
        raise error

    log_tail = _tail(workdir / "child.log")
    env = dict(state.environment)
    if nvml_dev is not None:
        env.setdefault("driver", state.context.get("driver"))
    gpu = None
    if options.memory_limit_bytes:
        gpu = limit_gpu
    elif env.get("gpu_memory_bytes"):
        gpu = Gpu(env.get("gpu") or "GPU", int(env["gpu_memory_bytes"]), None, "measured (torch.cuda)")
    est = estimate(spec, setup, gpu=gpu, alloc_conf=options.alloc_conf)
    measured = _measured(state, options)
    nvml = _nvml_trace(state, sampler, nvml_reason, options, t0, index)
    failure = _failure(state, status, exit_code, log_tail, t0, sampler)
    if status == "ok" and state.result is None:
        status = "crashed"
    if failure is not None:
        status = failure.kind
    errs = errors_for(est.peak_allocated_bytes, est.device_total_bytes,
                      measured.peak_allocated_bytes if (measured and status == "ok") else None,
                      nvml.peak_used_bytes if (nvml.available and status == "ok") else None)
    if status == "oom" and failure is not None:
        # a lower bound: at least this much was allocated when it failed
        errs["allocated"] = None
        errs["allocated_lower_bound"] = _rel(est.peak_allocated_bytes, failure.last_peak_allocated_bytes)
    tolerance = tolerances_for(errs)
    if "allocated_lower_bound" in errs:
        tolerance["allocated_lower_bound"] = MIN_TOLERANCE
    notes = _notes(options, setup, state, env)
    if nvml.overhead_fraction is not None and nvml.overhead_fraction > 0.01:
        notes.append(f"NVML queries took {nvml.overhead_fraction:.1%} of the measured steps' time (target < 1 %): "
                     "profile again with a lower --nvml-hz")
    record = Record(
        id=rid, created=created, status=status, model_ref=model_ref, model=model_dict(spec), setup=setup.to_dict(),
        run={**options.to_dict(), "weights": weights or "random", "phases_per_step": ["forward", "backward", "optimizer"]},
        environment=env, estimate=estimate_dict(est), measured=measured, nvml=nvml, error=errs,
        tolerance=tolerance, failure=failure, snapshot=None, notes=tuple(notes))
    path = None
    if out_dir is not None:
        if state.snapshot and snapshot_tmp is not None and Path(state.snapshot).exists():
            snap = unique_path(out_dir, f"{rid}.snapshot", ".pickle")
            atomic_move(snapshot_tmp, snap)
            record = _replace(record, snapshot=snap.name)
        path = write_record(record, out_dir)
    elif state.snapshot and snapshot_tmp is not None:
        record = _replace(record, snapshot=str(snapshot_tmp))
    # a kept snapshot (moved into out_dir, or left in workdir for the caller) is not deleted
    _cleanup(workdir, snapshot_tmp, keep_snapshot=record.snapshot is not None)
    return record, path


def skipped_record(model: str, setup, options: ProfileOptions, reason: str) -> Record:
    """A record saying this configuration was not run (a campaign out of time): the estimate and
    the reason, no measurement."""

    spec = resolve(model)
    est = estimate(spec, setup, alloc_conf=options.alloc_conf)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Record(
        id=record_id(spec.id, setup.to_dict(), options.device, created) + "_skipped", created=created,
        status="skipped", model_ref=options.model_ref or model, model=model_dict(spec), setup=setup.to_dict(),
        run={**options.to_dict(), "weights": "random" if options.random_weights else model},
        environment={}, estimate=estimate_dict(est), measured=None,
        nvml=NvmlTrace(available=False, reason=f"not run: {reason}"),
        error={"allocated": None, "device_total": None}, tolerance={"allocated": None, "device_total": None},
        failure=Failure(kind="skipped", message=reason), notes=("not run: no measurement in this record",))


def _replace(record: Record, **changes) -> Record:
    from dataclasses import replace
    return replace(record, **changes)


def _rel(pred, meas):
    return relative_error(pred, meas)


def _weights_source(model: str, spec) -> str:
    """Where from_pretrained reads weights: a local folder, or the hub id (Hugging Face cache)."""
    path = Path(os.path.expanduser(model))
    if path.exists():
        return str(path if path.is_dir() else path.parent)
    return spec.id


def _start_sampler(index: int, hz: float):
    """The NVML sampler for CUDA device `index`. A GPU run without NVML is refused here, before
    any child starts (GpuError / DependencyError): the device total is half of what a record is for."""
    dev = open_device(index)
    sampler = Sampler(dev, hz=hz)
    sampler.start()
    return sampler, dev, None


def _pump(child: _Child, state: _State, sampler, options: ProfileOptions, t0: float, on_event) -> tuple[str, int | None]:
    """Read the child's events until it ends; returns (status, exit code)."""
    deadline = t0 + options.timeout_s if options.timeout_s else None
    last_tick = 0.0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            child.kill()
            return "timeout", child.exitcode()
        try:
            ready = child.conn.poll(0.1)
        except (EOFError, OSError):
            ready = False
            if not child.alive():
                break
        if ready:
            try:
                msg = child.conn.recv()
            except (EOFError, OSError):
                break
            _handle(msg, state, sampler, t0)
            if on_event is not None:
                on_event(msg)
            continue
        if not child.alive():
            # drain anything left, then stop
            try:
                while child.conn.poll(0):
                    msg = child.conn.recv()
                    _handle(msg, state, sampler, t0)
                    if on_event is not None:
                        on_event(msg)
            except (EOFError, OSError):
                pass
            break
        now = time.monotonic()
        if sampler is not None and on_event is not None and now - last_tick > 0.25:
            last_tick = now
            used = sampler.last_used
            if used is not None:
                base = state.context.get("baseline_used_bytes")
                on_event({"event": "nvml", "used": used - base if base is not None else None})
    child.wait(10)
    code = child.exitcode()
    return "ok", code


def _handle(msg: dict, state: _State, sampler, t0: float) -> None:
    kind = msg.get("event")
    if kind == "env":
        state.environment = msg["environment"]
    elif kind == "context":
        state.context = msg
    elif kind == "phase":
        if msg["stage"] == "start":
            state.current = msg
            state.last_allocated = msg.get("allocated")
            if sampler is not None:
                sampler.mark(msg.get("step"), msg["phase"], msg["t"])
            state.markers.append((msg["t"], msg.get("step"), msg["phase"]))
        else:
            s = dict(msg["stats"])
            s["t_start"] = round(s["t_start"] - t0, 6)
            s["seconds"] = round(s["seconds"], 6)
            state.phases.append(PhaseStats(**s))
            state.last_allocated = s["allocated_end"]
            state.peak_allocated = max(state.peak_allocated, s["peak_allocated"])
    elif kind == "result":
        state.result = msg
    elif kind == "failure":
        state.failure = msg
    elif kind == "error":
        state.error = msg
    elif kind == "snapshot":
        state.snapshot = msg.get("path")


def _measured(state: _State, options: ProfileOptions) -> Measured | None:
    if not state.phases:
        return None
    steady = [p for p in state.phases if p.step is not None and not p.warmup]
    best = max(steady, key=lambda p: p.peak_allocated) if steady else None
    phase_peaks: dict[str, int] = {}
    for p in state.phases:
        if p.step is None or not p.warmup:
            phase_peaks[p.phase] = max(phase_peaks.get(p.phase, 0), p.peak_allocated)
    reserved = [p.peak_reserved for p in steady if p.peak_reserved is not None]
    all_reserved = [p.peak_reserved for p in state.phases if p.peak_reserved is not None]
    result = state.result or {}
    inventory = result.get("inventory") or {}
    complete = state.result is not None
    return Measured(
        counter="torch.cuda" if options.device != "cpu" else "tracker",
        peak_allocated_bytes=best.peak_allocated if (best and complete) else None,
        peak_reserved_bytes=max(reserved) if (reserved and complete) else None,
        peak_phase=best.phase if best else None, peak_step=best.step if best else None,
        run_peak_allocated_bytes=max(p.peak_allocated for p in state.phases),
        run_peak_reserved_bytes=max(all_reserved) if all_reserved else None,
        phase_peaks=phase_peaks, inventory=inventory, components_at_peak=result.get("components_at_peak"),
        paged_optimizer_bytes=int(result.get("paged_optimizer_bytes") or 0), phases=tuple(state.phases),
        # a diverged loss is kept as None: JSON has no NaN, and a record must stay readable JSON
        losses=tuple(round(x, 5) if math.isfinite(x) else None for x in result.get("losses", ())),
        allocator_stats=result.get("allocator_stats"))


def _nvml_trace(state: _State, sampler, reason, options: ProfileOptions, t0: float, index: int) -> NvmlTrace:
    ctx = state.context
    if sampler is None or not ctx.get("available"):
        why = reason or ctx.get("reason") or "NVML unavailable in the run"
        return NvmlTrace(available=False, reason=why, device_index=None if options.device == "cpu" else index)
    base = ctx["baseline_used_bytes"]
    steady = [p for p in state.phases if p.step is not None and not p.warmup]
    peak = run_peak = overhead = None
    if steady:
        w0 = t0 + steady[0].t_start
        w1 = t0 + steady[-1].t_start + steady[-1].seconds
        top = sampler.peak_between(w0, w1)
        peak = top - base if top is not None else None
        overhead = sampler.query_seconds_between(w0, w1) / max(w1 - w0, 1e-9)
    if state.phases:
        r0 = t0 + state.phases[0].t_start
        last = state.phases[-1]
        top = sampler.peak_between(r0, t0 + last.t_start + last.seconds)
        run_peak = top - base if top is not None else None
    trace = tuple((round(t - t0, 4), used - base) for t, used in sampler.points)
    markers = tuple((round(t - t0, 4), step, phase) for t, step, phase in sampler.markers)
    end = (state.result or {}).get("context_end_bytes")
    if state.result is None or state.failure is not None:
        peak = None
    return NvmlTrace(
        available=True, reason=sampler.error, device_index=index, target_hz=sampler.hz,
        rate_hz=round(sampler.rate_hz(), 1), samples=sampler.samples,
        query_seconds_mean=(sampler.query_seconds / sampler.samples) if sampler.samples else None,
        overhead_fraction=overhead, baseline_used_bytes=base, context_bytes=ctx.get("context_bytes"),
        context_end_bytes=end, peak_used_bytes=peak, run_peak_used_bytes=run_peak, trace=trace, markers=markers)


def _failure(state: _State, status: str, exit_code, log_tail: str, t0: float, sampler) -> Failure | None:
    cur = state.current
    step, phase = cur.get("step"), cur.get("phase")
    base = state.context.get("baseline_used_bytes")
    nvml_last = (sampler.last_used - base) if (sampler is not None and sampler.last_used is not None
                                               and base is not None) else None
    if state.failure is not None:
        f = state.failure
        return Failure(kind=f["kind"], message=f["message"], step=f.get("step"), phase=f.get("phase"),
                       last_allocated_bytes=f.get("last_allocated_bytes"),
                       last_peak_allocated_bytes=f.get("last_peak_allocated_bytes"),
                       last_reserved_bytes=f.get("last_reserved_bytes"),
                       last_nvml_used_bytes=f.get("last_nvml_used_bytes", nvml_last), exit_code=exit_code)
    if status == "timeout":
        return Failure(kind="timeout", message="the run passed its time limit and was ended", step=step, phase=phase,
                       last_allocated_bytes=state.last_allocated, last_peak_allocated_bytes=state.peak_allocated or None,
                       last_nvml_used_bytes=nvml_last, exit_code=exit_code)
    if state.result is None:
        why = f"the run ended without a result (exit code {exit_code})"
        if exit_code is not None and exit_code < 0:
            why = f"the run was killed by signal {-exit_code}"
        if log_tail:
            why += f"; last output: {log_tail.splitlines()[-1][:300]}"
        return Failure(kind="crashed", message=why, step=step, phase=phase, last_allocated_bytes=state.last_allocated,
                       last_peak_allocated_bytes=state.peak_allocated or None, last_nvml_used_bytes=nvml_last,
                       exit_code=exit_code)
    return None


def _notes(options: ProfileOptions, setup, state: _State, env: dict) -> list[str]:
    notes = []
    if options.device == "cpu":
        notes.append("cpu run: allocated bytes counted per storage with 512-byte rounding (vramplan.simulate._tracker); "
                     "CPU kernels differ from CUDA ones (SDPA, bitsandbytes), so kernel-internal buffers differ")
        if setup.paged:
            notes.append("cpu run: bitsandbytes has no paged memory on the CPU; the state a GPU would page "
                         "(state1/state2 of tensors >= 1e5 elements) is left out of the count")
    if options.device == "cpu":
        notes.extend(unsteady_phases(state.phases))
    if options.random_weights:
        notes.append("random weights: built on the meta device, each weight drawn and quantized on the device "
                     "one tensor at a time (vramplan.profile._materialize)")
    if options.memory_limit_bytes:
        notes.append(f"memory capped at {options.memory_limit_bytes:,} bytes to emulate a smaller GPU")
    if state.result and state.result.get("late_tracked"):
        notes.append(f"cpu run: {state.result['late_tracked']} storages made from Python data (torch.tensor) were "
                     "invisible to the tracker until the inventory found them; counted from the end of load")
    return notes


def unsteady_phases(phases) -> list[str]:
    """A note for each phase whose counts differ between measured steps. The CPU tracker counts
    every storage exactly, so after the warm-up each step repeats the last to the byte; a phase
    that does not is growing (something outlives the step) or changing its work. Under gradient
    accumulation a step runs each phase once per micro-step: the k-th run of a phase is compared
    with the k-th run of the other steps."""
    by_phase: dict = {}
    runs: dict = {}
    for p in phases:
        if p.step is not None and not p.warmup:
            k = runs[(p.step, p.phase)] = runs.get((p.step, p.phase), -1) + 1
            name = p.phase if k == 0 else f"{p.phase} (micro-step {k + 1})"
            by_phase.setdefault(name, set()).add((p.peak_allocated, p.allocated_end))
    return [f"cpu run: the {phase} phase differs between measured steps (peak allocated "
            f"{min(v[0] for v in seen):,}..{max(v[0] for v in seen):,} bytes, allocated at its end "
            f"{min(v[1] for v in seen):,}..{max(v[1] for v in seen):,}): the step is not steady"
            for phase, seen in by_phase.items() if len(seen) > 1]


def _as_error(err: dict) -> VramplanError:
    cls = getattr(_errors, err.get("error_class", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, VramplanError)):
        msg = err.get("message") or "the profile run failed"
        return VramplanError(f"the profile run failed before measuring: {msg}",
                             hint="see the message; run with --device cpu to check the setup without a GPU")
    return cls(err.get("message", ""), hint=err.get("hint"))


def _tail(path: Path, n: int = 2000) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def _cleanup(workdir: Path | None, snapshot_tmp: Path | None, keep_snapshot: bool = False) -> None:
    import shutil
    if snapshot_tmp is not None and not keep_snapshot:
        try:
            Path(snapshot_tmp).unlink()
        except OSError:
            pass
    if workdir is None or (keep_snapshot and snapshot_tmp is not None and workdir in Path(snapshot_tmp).parents):
        return
    shutil.rmtree(workdir, ignore_errors=True)
