"""The training run of `vramplan profile`, in a child process.

A CUDA failure (an illegal access, a driver reset, a segfault in a kernel) kills this process,
not the CLI; the parent (_session.py) turns whatever arrived before into a record. Everything is
reported through a one-way multiprocessing Connection as small dicts (`event` key):

    env        library versions, GPU, driver, CUDA
    context    NVML baseline before the CUDA context exists, and the context size
    phase      a phase boundary: allocated / reserved / peaks, time (monotonic clock)
    failure    an out-of-memory (a result: step, phase, last values) or another runtime error
    result     the tensor inventory and the CPU attribution at the peak; the run is complete
    error      a setup problem before anything was measured (no GPU, missing weights, bad
               targets): the parent raises it as the same VramplanError, no record is written

The run is the user's script: the model loaded as from_pretrained does (or random weights,
_materialize.py), prepare_model_for_kbit_training if asked, gradient checkpointing
(non-reentrant, or use_reentrant=True with TrainSetup.reentrant), peft LoRA, the optimizer (fused AdamW where the recipe uses it), TRL's fused lm_head
for the chunked loss; then `warmup + steps` iterations of
    loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
with the forward under torch.autocast where the recipe runs it, and a plain loop's `out` kept until
the next forward returns (simulate/_step.py loop_forward, the same loop body simulate runs), on
random token ids of shape (batch, seq). Phase boundaries synchronize the device, read the
counters and reset the peak, so each phase's peak is its own.

Entry points: `python -m vramplan.profile._runner --job FILE --fd N` (a fresh interpreter; the
CLI) and `child_entry(job, conn)` (a forked worker with libraries preloaded; the campaign).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

from vramplan.simulate import _attribution as attribution
from vramplan.version import __version__
from vramplan.core._components import ALLOCATED
from vramplan.core._errors import GpuError, ModelError, require, UsageError, VramplanError
from vramplan.core._models import spec_from_config
from vramplan.estimate._quant import alloc
from vramplan.profile._materialize import random_model
from vramplan.profile._meters import CudaMeter, TrackerMeter
from vramplan.profile._record import setup_from_record
from vramplan.simulate._build import apply_loop, bnb_config, make_trainable, torch_dtype
from vramplan.simulate._step import loop_forward
from vramplan.profile._nvml import open_device

PHASES = ("forward", "backward", "optimizer")


class Channel:
    def __init__(self, conn):
        self.conn = conn

    def send(self, event: str, **data) -> None:
        data["event"] = event
        data.setdefault("t", time.monotonic())
        try:
            self.conn.send(data)
        except (BrokenPipeError, OSError):  # the parent is gone: nothing to report to
            os._exit(3)


class SetupFailure(Exception):
    """A VramplanError raised before measuring: forwarded to the parent as `error`."""


def child_entry(job: dict, conn) -> None:
    """Run one profile job and report through `conn`. Never raises."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C and ends us
    except ValueError:
        pass
    _redirect_output(job.get("log_path"))
    if job.get("alloc_conf") is not None:
        # before the first CUDA call: c10's CUDAAllocatorConfig parses the variable once, when the
        # caching allocator initializes, so a forked child still gets its own settings
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = job["alloc_conf"]
    channel = Channel(conn)
    try:
        Run(job, channel).execute()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as data
        if isinstance(exc, VramplanError):
            channel.send("error", error_class=type(exc).__name__, message=exc.message, hint=exc.hint)
        else:
            channel.send("error", error_class=type(exc).__name__, message=f"{type(exc).__name__}: {exc}",
                         hint=None, traceback=traceback.format_exc()[-4000:])
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        conn.close()


def _redirect_output(path: str | None) -> None:
    """Library chatter (progress bars, warnings) goes to the run's log, not over the parent's
    progress display."""
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _is_oom(exc: BaseException) -> bool:
    import torch
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "cudaerrormemoryallocation" in text)


class Run:
    def __init__(self, job: dict, channel: Channel):
        self.job = job
        self.ch = channel
        self.step: int | None = None
        self.phase: str | None = None
        self.run_peak = 0
        self.meter = None

    # --- setup ---------------------------------------------------------------------------------------
    def execute(self) -> None:
        job = self.job
        self.setup = setup = setup_from_record(job["setup"])
        # The NVML baseline comes first: importing peft imports bitsandbytes, which asks
        # torch.cuda.get_device_capability (bitsandbytes/cuda_specs.py) and so creates this
        # process's CUDA context; the baseline must be read before that.
        self._baseline()
        for module in ("torch", "transformers", "peft"):
            require(module, "profile")
        if setup.method == "qlora" or setup.optimizer in ("adamw8bit", "paged_adamw", "paged_adamw8bit"):
            require("bitsandbytes", "profile")
        import torch

        self.torch = torch
        self.spec = spec_from_config(job["config"], job["model_id"], job.get("model_source", "profile job"))
        self.device = self._device(job["device"])
        self.ch.send("env", environment=self._environment(), pid=os.getpid())
        self._context()
        self.meter = self._meter()
        with self.meter.active():
            self._run()

    def _device(self, text: str):
        torch = self.torch
        if text == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise GpuError("no CUDA GPU is available to torch "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})",
                           hint="on a machine without a GPU use --device cpu")
        dev = torch.device(text)
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise GpuError(f"no GPU cuda:{index}: torch sees {torch.cuda.device_count()}",
                           hint="pick --device cuda:N with N below the number of visible GPUs")
        return torch.device("cuda", index)

    def _environment(self) -> dict:
        import platform

        import transformers

        torch = self.torch
        # plain values only: the parent unpickles them, and a TorchVersion (torch.__version__) would
        # make it import torch (about 1.5 s of CPU beside the child's own imports)
        env = {"python": platform.python_version(), "platform": platform.platform(),
               "torch": str(torch.__version__), "transformers": str(transformers.__version__),
               "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes"),
               "nvidia-ml-py": _version("nvidia-ml-py"), "vramplan": _vramplan_version(),
               "device": str(self.device), "cuda": torch.version.cuda,
               "env": {k: os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_MODULE_LOADING",
                                                  "CUDA_VISIBLE_DEVICES") if k in os.environ}}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            env.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                       compute_capability=f"{props.major}.{props.minor}",
                       multiprocessors=props.multi_processor_count,
                       gpu_uuid=str(getattr(props, "uuid", "")) or None)
        else:
            env.update(gpu=None, gpu_memory_bytes=None, cpu=platform.processor() or platform.machine(),
                       threads=torch.get_num_threads())
        return env

    def _baseline(self) -> None:
        """NVML device use before this process touches CUDA (no torch import yet)."""
        self.nvml = None
        self.baseline = None
        self.nvml_error = None
        text = self.job["device"]
        if text == "cpu":
            return
        index = int(text.split(":")[1]) if ":" in text else 0
        try:
            self.nvml = open_device(index, uuid=self.job.get("nvml_uuid"))
            self.baseline = self.nvml.used()
            self.driver = self.nvml.info().driver
        except Exception as exc:  # noqa: BLE001 - NVML is optional for the torch counters
            self.nvml, self.nvml_error = None, str(exc)

    def _context(self) -> None:
        """The CUDA context's size: NVML used after a one-element allocation, less the baseline
        and less what torch's allocator reserved for that allocation. Then the --gpu cap."""
        torch = self.torch
        if self.device.type != "cuda":
            return
        torch.cuda.set_device(self.device)
        probe = torch.empty(1, device=self.device)
        torch.cuda.synchronize(self.device)
        context = None
        if self.nvml is None:
            self.ch.send("context", available=False, reason=self.nvml_error or "NVML unavailable")
        else:
            time.sleep(0.05)
            context = int(self.nvml.used() - self.baseline - torch.cuda.memory_reserved(self.device))
            self.ch.send("context", available=True, baseline_used_bytes=int(self.baseline), context_bytes=context,
                         driver=self.driver)
        del probe
        limit = self.job.get("memory_limit_bytes")
        if limit:
            if context is None:   # no NVML: the estimate's context model stands in
                context = int(self.job.get("predicted_context_bytes", 0))
            total = torch.cuda.get_device_properties(self.device).total_memory
            usable = limit - context
            if usable <= 0:
                raise UsageError(f"--gpu {limit:,} bytes is less than the CUDA context ({context:,} bytes)",
                                 hint="give a larger GPU size")
            # torch.cuda.set_per_process_memory_fraction caps what the caching allocator may
            # reserve (c10 CUDACachingAllocator: an allocation past it raises OutOfMemoryError):
            # context + reserved <= the emulated size, as on a card of that size.
            torch.cuda.set_per_process_memory_fraction(min(1.0, usable / total), self.device)

    def _meter(self):
        self.ctx = None   # the CPU's module attribution (below); a GPU run has none
        if self.device.type == "cuda":
            if self.job.get("snapshot_path"):
                # Python stacks of allocations only: the events are what `vramplan replay --check` needs,
                # the stacks name the code in pytorch.org/memory_viz, and C++ stacks (stacks="all") make
                # the dump slow and the file several times larger
                self.torch.cuda.memory._record_memory_history(
                    enabled="all", context="alloc", stacks="python",
                    max_entries=self.job.get("snapshot_entries", 200000))
            return CudaMeter(self.device)
        context = None
        try:  # module attribution of the CPU peak, shared with simulate
            self.ctx = attribution.StepContext("lm_head")
            context = self.ctx
        except Exception:  # noqa: BLE001 - fall back to phases only
            self.ctx = None
        limit = self.job.get("memory_limit_bytes")
        if limit:
            limit -= self.job.get("predicted_context_bytes", 0)
        return TrackerMeter(context, limit)

    # --- phases ---------------------------------------------------------------------------------------
    def _begin(self, step: int | None, phase: str) -> dict:
        m = self.meter
        self.step, self.phase = step, phase
        m.set_phase(phase)
        m.sync()
        start = {"t": time.monotonic(), "allocated": m.allocated(), "reserved": m.reserved()}
        m.reset_peak()
        self.ch.send("phase", stage="start", step=step, phase=phase, warmup=self._warmup(step),
                     allocated=start["allocated"], reserved=start["reserved"], t=start["t"])
        return start

    def _end(self, start: dict, **extra) -> dict:
        m = self.meter
        m.sync()
        t = time.monotonic()
        peak_alloc, peak_res = m.peak()
        stats = dict(phase=self.phase, step=self.step, warmup=self._warmup(self.step),
                     allocated_start=start["allocated"], allocated_end=m.allocated(),
                     peak_allocated=peak_alloc, reserved_end=m.reserved(), peak_reserved=peak_res,
                     t_start=start["t"], seconds=t - start["t"])
        self.run_peak = max(self.run_peak, peak_alloc)
        self.ch.send("phase", stage="end", stats=stats, peak_event=m.peak_event, t=t, **extra)
        return stats

    def _warmup(self, step: int | None) -> bool:
        return step is not None and step < self.job["warmup"]

    def _run(self) -> None:
        torch = self.torch
        job = self.job
        try:
            start = self._begin(None, "load")
            built = self._load()
            inventory = self._static_inventory(built[0])
            self._end(start)
        except Exception as exc:
            if _is_oom(exc):
                self._failure("oom", exc)
                return
            raise
        model, opt, ids = built
        grads = None
        opt_state = None
        paged = 0
        losses = []
        best = (-1, None, None)   # (peak bytes, step, tracker peak event) over measured steps
        total = job["warmup"] + job["steps"]
        held = None     # a plain loop's `out`, alive until the next forward returns
        try:
            for step in range(total):
                # gradient accumulation: two micro-steps per optimizer step, the second beside every
                # .grad (later ones repeat it), as estimate and simulate model it
                for micro in range(2 if self.setup.accumulates else 1):
                    if micro and not self.setup.outputs_outlive_step:
                        held = None   # `del out` at the end of the micro-step (plain-del)
                    st = self._begin(step, "forward")
                    loss, out = loop_forward(model, ids, self.setup)
                    held = out
                    del out
                    s = self._end(st)
                    best = self._best(best, s)
                    if self.ctx is not None:
                        self.ctx.region, self.ctx.bw_module = attribution.LOGITS_REGION, "loss"
                    st = self._begin(step, "backward")
                    loss.backward()
                    losses.append(float(loss.detach().float().item()))
                    del loss   # inside the phase, as simulate does: the step ends with no loss alive
                    s = self._end(st)
                    best = self._best(best, s)
                    if self.ctx is not None:
                        self.ctx.region, self.ctx.bw_module = "", ""
                step_grads = self._grads(model)
                if step == job["warmup"] or grads is None:
                    grads = step_grads
                st = self._begin(step, "optimizer")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if not self.setup.outputs_outlive_step:
                    held = None   # `del out` at the end of the step (plain-del)
                if opt_state is None:
                    opt_state, paged = self._optimizer_state(opt)
                s = self._end(st)
                best = self._best(best, s)
        except Exception as exc:
            if _is_oom(exc):
                self._failure("oom", exc)
                return
            self._failure("error", exc)
            return
        finally:
            self.step, self.phase = None, None
            del held      # a plain loop's last outputs go before the counters are read
        inventory["gradients"] = grads or 0
        inventory["optimizer_state"] = opt_state or 0
        components = self._components_at(best[2]) if job["steps"] and self.device.type == "cpu" else None
        context_end = None
        if self.nvml is not None:
            torch.cuda.synchronize(self.device)
            context_end = self.nvml.used() - self.baseline - torch.cuda.memory_reserved(self.device)
        self._snapshot()
        stats = self._allocator_stats()
        self.ch.send("result", inventory=inventory, components_at_peak=components, paged_optimizer_bytes=paged,
                     losses=losses, context_end_bytes=context_end, allocator_stats=stats,
                     late_tracked=getattr(self.meter, "late_tracked", None))

    def _allocator_stats(self) -> dict | None:
        """torch.cuda.memory_stats(): the caching allocator's own counters (retries, segments, peaks)."""
        if self.device.type != "cuda":
            return None
        from vramplan.profile._record import allocator_stats
        return allocator_stats(self.torch.cuda.memory_stats(self.device))

    def _best(self, best, stats):
        if stats["step"] is None or stats["warmup"]:
            return best
        if stats["peak_allocated"] > best[0]:
            return (stats["peak_allocated"], stats["step"], self.meter.peak_event)
        return best

    # --- loading ---------------------------------------------------------------------------------------
    def _load(self):
        import warnings

        torch = self.torch
        setup, job = self.setup, self.job
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if job["random_weights"]:
                model = random_model(self.spec, setup, str(self.device), seed=job.get("seed", 0))
            else:
                model = self._from_pretrained()
            base = model
            model, opt = make_trainable(model, setup, str(self.device))
            model = apply_loop(model, setup, self.device.type)   # TRL's fused lm_head, autocast
        g = torch.Generator().manual_seed(job.get("seed", 0))
        ids = torch.randint(0, self.spec.vocab, (setup.batch, setup.seq), generator=g).to(self.device)
        if self.ctx is not None:
            names = attribution.module_names(model)
            head = base.get_output_embeddings()
            self.ctx.lm_head = names.get(head, "lm_head")
            self.ctx.install(model, names)
            self.ctx.wrap_loss(model.get_base_model() if hasattr(model, "get_base_model") else model)
            self.meter.retag(ids, "activations")
        return model, opt, ids

    def _from_pretrained(self):
        from transformers import AutoModelForCausalLM

        setup, source = self.setup, self.job["weights"]
        kwargs = dict(dtype=torch_dtype(setup), attn_implementation=setup.attn, device_map={"": str(self.device)},
                      local_files_only=True)
        if setup.method == "qlora":
            kwargs["quantization_config"] = bnb_config(setup)
        try:
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"no weights for {source} on this machine ({first[:200]})",
                             hint="download them first (`hf download MODEL`), or pass --random-weights") from None

    # --- inventory: exact bytes of the persistent tensors -----------------------------------------------
    def _static_inventory(self, model) -> dict:
        """weights / quant_constants / adapters, from the live tensors (each storage once, rounded
        to the allocator's 512-byte block), classified as simulate does."""
        out = {"weights": 0, "quant_constants": 0, "adapters": 0}
        seen = set()

        def add(t, component: str) -> None:
            if t is None or not isinstance(t, self.torch.Tensor) or t.device != self.device:
                return
            key = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key in seen or key[1] == 0:
                return
            seen.add(key)
            out[component] += alloc(t.untyped_storage().nbytes())
            self.meter.retag(t, component)

        for module in model.modules():
            weight = getattr(module, "weight", None)
            qs = getattr(weight, "quant_state", None)
            if qs is not None:
                add(weight, "weights")
                for t in (qs.absmax, qs.code, qs.offset):
                    add(t, "quant_constants")
                if qs.state2 is not None:
                    add(qs.state2.absmax, "quant_constants")
                    add(qs.state2.code, "quant_constants")
            state = getattr(module, "state", None)  # bitsandbytes Linear8bitLt MatmulLtState
            if state is not None and hasattr(state, "SCB"):
                add(weight, "weights")
                add(getattr(state, "CB", None), "weights")
                add(state.SCB, "quant_constants")
                add(getattr(weight, "SCB", None), "quant_constants")
        for name, p in model.named_parameters():
            add(p, "adapters" if "lora_" in name else "weights")
        for _, b in model.named_buffers():
            add(b, "weights")
        return out

    def _grads(self, model) -> int:
        total = 0
        seen = set()
        for p in model.parameters():
            g = p.grad
            if g is None:
                continue
            key = g.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += alloc(g.untyped_storage().nbytes())
            self.meter.retag(g, "gradients")
        return total

    def _optimizer_state(self, opt) -> tuple[int, int]:
        """(device bytes, paged bytes). Paged state (bitsandbytes get_paged: CUDA unified memory)
        is outside the caching allocator. bitsandbytes pages only state1/state2 of parameters with
        at least 1e5 elements (optim/optimizer.py get_state_buffer: `if not self.is_paged or
        p.numel() < 1e5: torch.zeros_like`); absmax1/2 and qmaps are always device tensors. On the
        CPU bitsandbytes falls back to ordinary tensors: the ones a GPU would page are then not
        counted, so the CPU run counts what a GPU would. torch's `step` scalars live on the host
        unless capturable / fused (torch/optim/adamw.py _init_group)."""
        paged_setup = self.setup.paged
        state_bytes = paged = 0
        seen = set()
        for state in opt.state.values():
            for key, v in state.items():
                if not isinstance(v, self.torch.Tensor):
                    continue
                # functional.get_paged wraps the managed pointer with torch.frombuffer: a paged state
                # is a CPU tensor marked is_paged, whatever device the optimizer runs on
                is_paged = getattr(v, "is_paged", False)
                if v.device != self.device and not is_paged:
                    continue
                sk = v.untyped_storage().data_ptr()
                if sk in seen:
                    continue
                seen.add(sk)
                size = alloc(v.untyped_storage().nbytes())
                if is_paged or (paged_setup and self.device.type == "cpu"
                                and key in ("state1", "state2") and v.numel() >= 1e5):
                    paged += v.untyped_storage().nbytes()
                    self.meter.ignore(v)
                elif key == "step" and v.dim() == 0 and self.device.type == "cpu":
                    self.meter.ignore(v)
                else:
                    state_bytes += size
                    self.meter.retag(v, "optimizer_state")
        return state_bytes, paged

    def _components_at(self, event) -> dict | None:
        """CPU only: every storage live at the steady-state peak, by component (simulate's
        attribution: tags set above, dequantize ops -> temporaries, lm_head/loss -> logits_loss)."""
        if event is None or not hasattr(self.meter, "tracker"):
            return None
        try:
            _component = attribution.component_of
        except Exception:  # noqa: BLE001
            _component = None
        out = {c.value: 0 for c in ALLOCATED}
        for block in self.meter.tracker.live_at(event):
            if _component is not None:
                name = _component(block)
            else:
                name = block.tag or "activations"
            if name not in out:
                name = "activations"
            out[name] += block.size
        return out

    # --- failure and snapshot ------------------------------------------------------------------------
    def _failure(self, kind: str, exc: BaseException) -> None:
        m = self.meter
        last = {}
        try:
            if m is not None:
                peak, reserved_peak = m.peak()
                last = dict(last_allocated_bytes=m.allocated(), last_peak_allocated_bytes=max(peak, self.run_peak),
                            last_reserved_bytes=m.reserved())
                if self.nvml is not None:
                    last["last_nvml_used_bytes"] = self.nvml.used() - self.baseline
        except Exception:  # noqa: BLE001 - the device may be unusable after a CUDA error
            pass
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._snapshot()
        self.ch.send("failure", kind=kind, message=message[:500], step=self.step, phase=self.phase,
                     traceback=None if kind == "oom" else traceback.format_exc()[-4000:], **last)

    def _snapshot(self) -> None:
        path = self.job.get("snapshot_path")
        if not path or self.device.type != "cuda":
            return
        try:
            self.torch.cuda.memory._dump_snapshot(path)
            self.torch.cuda.memory._record_memory_history(enabled=None)
            self.ch.send("snapshot", path=path)
        except Exception as exc:  # noqa: BLE001
            self.ch.send("snapshot", path=None, reason=str(exc))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _vramplan_version() -> str:
    return __version__


def main(argv: list[str] | None = None) -> None:
    import argparse
    from multiprocessing.connection import Connection

    p = argparse.ArgumentParser(prog="python -m vramplan.profile._runner")
    p.add_argument("--job", required=True, help="JSON file describing the run (written by _session.py)")
    p.add_argument("--fd", type=int, required=True, help="write end of the parent's pipe")
    args = p.parse_args(argv)
    with open(args.job) as f:
        job = json.load(f)
    child_entry(job, Connection(args.fd, readable=False))
    # child_entry flushed Python's streams and closed the pipe: nothing is left to say. Skip the
    # interpreter's teardown of torch, transformers and peft (about 1.5 s on 2 cores, during which
    # the parent waits for the exit code), as a multiprocessing child does (popen_fork: os._exit),
    # after flushing what C libraries wrote to the log through stdio (os._exit would drop it).
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
