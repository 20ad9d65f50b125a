"""Real `--device cpu` profile runs of tiny models: the child process, the CPU allocation counter,
out-of-memory as a result, crashes, timeouts, Ctrl-C, weights from disk, records and plots.

Runs share one fork-server launcher (torch / transformers imported once); the CLI test starts a
fresh interpreter as `vramplan profile` does."""
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import requires

from vramplan.cli import main
from vramplan.core._errors import GpuError, ModelError, UsageError
from vramplan.profile._session import ForkServerLauncher, ProfileOptions, profile
from vramplan.core._setup import TrainSetup

pytestmark = requires("torch", "transformers", "peft", "bitsandbytes")

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(CONFIG))
    return str(d)


@pytest.fixture(scope="module")
def launcher():
    return ForkServerLauncher()


@pytest.fixture(scope="module")
def qlora_run(tiny, launcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles")
    record, path = profile(tiny, TrainSetup(seq=64), ProfileOptions(device="cpu", random_weights=True, steps=2),
                           out=out, launcher=launcher)
    return record, path, out


def cpu_opts(**kw):
    return ProfileOptions(device="cpu", random_weights=True, steps=1, **kw)


def test_cpu_run_is_a_complete_record(qlora_run):
    record, path, out = qlora_run
    assert record.status == "ok" and path.exists() and path.parent == out
    assert not [f for f in os.listdir(out) if f.startswith(".")]       # nothing half-written
    # how the random weights were built, which the comparison's replay of the load follows
    from vramplan.profile._materialize import BUILD
    assert record.run["random_weights"] and record.run["random_weights_build"] == BUILD
    m = record.measured
    assert m.counter == "tracker"
    steady = [p for p in m.phases if p.step is not None and not p.warmup]
    assert [p.phase for p in m.phases] == ["load"] + ["forward", "backward", "optimizer"] * 3
    assert m.peak_allocated_bytes == max(p.peak_allocated for p in steady)
    assert m.run_peak_allocated_bytes >= m.peak_allocated_bytes
    # every phase's peak is at least what it started and ended with; bytes are 512-rounded ints
    for p in m.phases:
        assert p.peak_allocated >= max(p.allocated_start, p.allocated_end)
        assert p.peak_allocated % 512 == 0
    # the attribution at the peak adds up to the peak
    assert sum(m.components_at_peak.values()) == m.peak_allocated_bytes
    # static tensors are counted exactly: they match the estimator's byte-exact inventory
    est = record.estimate["components"]
    assert m.inventory["quant_constants"] == est["quant_constants"]
    assert m.inventory["adapters"] == est["adapters"]
    assert m.inventory["optimizer_state"] == est["optimizer_state"]
    assert m.inventory["weights"] == est["weights"]
    # steady state repeats itself
    peaks = m.step_peaks()
    assert peaks[1] == peaks[2]
    assert not [n for n in record.notes if "not steady" in n]
    assert len(m.losses) == 3 and all(4 < x < 7 for x in m.losses)   # ln(256) = 5.5 for random weights
    # NVML is reported as unavailable on a CPU, never invented
    assert record.nvml.available is False and "cpu" in record.nvml.reason and record.nvml.trace == ()
    assert record.error["device_total"] is None and record.error["allocated"] is not None
    assert record.tolerance["allocated"] >= max(0.03, abs(record.error["allocated"]) + 0.01 - 1e-9)
    assert record.environment["torch"] and record.environment["gpu"] is None
    # plain values only: the CLI process unpickles them, and a TorchVersion would import torch there
    assert {type(v) for v in record.environment.values()} <= {str, int, float, bool, dict, type(None)}


def test_cpu_run_agrees_with_simulate_on_the_cpu(qlora_run, tiny):
    """Both count the same real CPU step with the same tracker: they must agree to the byte."""
    from vramplan.core._models import resolve
    from vramplan.simulate import simulate as run

    record, _, _ = qlora_run
    trace = run(resolve(tiny), TrainSetup(seq=64), "cpu")
    assert trace.peak_allocated_bytes == record.measured.peak_allocated_bytes
    assert trace.components == record.measured.components_at_peak


@pytest.mark.parametrize("loop", [dict(loop="plain"), dict(loop="plain-del"), dict(loss="chunked"),
                                  dict(grad_accum=4), dict(grad_accum=2, loop="plain-del")],
                         ids=["plain-loop", "plain-del-loop", "chunked-loss", "grad-accum", "grad-accum-plain-del"])
def test_cpu_run_of_a_recipe_loop_agrees_with_simulate(tiny, launcher, tmp_path, loop):
    """profile runs the recipe's loop body (a plain loop's held outputs, TRL's chunked loss) as
    simulate does: the same real CPU step, to the byte. (The fused AdamW on the CPU differs by one
    512-byte step tensor per parameter between the two counters: not asserted here.)"""
    from vramplan.core._models import resolve
    from vramplan.simulate import simulate as run

    setup = TrainSetup(seq=64, **loop)
    record, _ = profile(tiny, setup, ProfileOptions(device="cpu", random_weights=True, steps=2), out=tmp_path,
                        launcher=launcher)
    assert record.setup["loop"] == setup.loop and record.setup["loss"] == setup.loss
    assert record.setup["grad_accum"] == setup.grad_accum
    trace = run(resolve(tiny), setup, "cpu")
    assert trace.peak_allocated_bytes == record.measured.peak_allocated_bytes
    assert not [n for n in record.notes if "not steady" in n]
    assert trace.phase_peaks["forward"] == record.measured.phase_peaks["forward"]   # the previous step's outputs
    idealized = run(resolve(tiny), TrainSetup(seq=64), "cpu")
    assert trace.peak_allocated_bytes != idealized.peak_allocated_bytes   # the loop changes the step


def test_compare_and_plot_of_a_cpu_record(qlora_run, tmp_path, capsys):
    record, path, out = qlora_run
    code = main(["compare", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and len(data) == 1
    c = data[0]
    assert c["measured_allocated_bytes"] == record.measured.peak_allocated_bytes
    in_total = [r for r in c["components"] if r["in_total"] and r["component"] not in ("cuda_context", "allocator_overhead")]
    assert sum(r["measured"] for r in in_total) == c["measured_allocated_bytes"]
    assert sum(r["predicted"] for r in in_total) == c["predicted_allocated_bytes"]
    assert c["within_tolerance"] is True
    from vramplan.render._profile_plots import plot_record
    png = plot_record(record, tmp_path / "mem.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oom_is_a_result(tiny, launcher, tmp_path):
    # emulate a GPU just big enough to load the model: the first step cannot fit
    from vramplan.estimate._estimator import estimate
    from vramplan.core._models import resolve
    est = estimate(resolve(tiny), TrainSetup(seq=64))
    limit = est.cuda_context_bytes + 600 * 1024   # context + 600 KiB for allocations
    record, path = profile(tiny, TrainSetup(seq=64), cpu_opts(memory_limit_bytes=limit), out=tmp_path,
                           launcher=launcher)
    assert record.status == "oom" and path.exists()
    f = record.failure
    assert f.kind == "oom" and f.step == 0 and f.phase in ("forward", "backward", "optimizer")
    assert 0 < f.last_peak_allocated_bytes <= 600 * 1024
    assert "tried to allocate" in f.message
    assert record.error["allocated"] is None and record.error["allocated_lower_bound"] > 0
    assert record.measured.peak_allocated_bytes is None           # no complete step
    assert record.estimate["fits"] is False


def test_allocator_settings_reach_the_child_and_the_estimate(tiny, launcher, monkeypatch):
    """ProfileOptions.alloc_conf is set in the training child before its first CUDA call (a
    forked child does not see later changes to the parent's environment), recorded with the
    run, and used by the estimate it is compared with; the parent's environment is untouched."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    conf = "expandable_segments:True"
    record, _ = profile(tiny, TrainSetup(seq=32), cpu_opts(alloc_conf=conf), launcher=launcher)
    assert record.status == "ok"
    assert record.environment["env"]["PYTORCH_CUDA_ALLOC_CONF"] == conf
    assert record.run["alloc_conf"] == conf and record.estimate["alloc_conf"] == conf
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    plain, _ = profile(tiny, TrainSetup(seq=32), cpu_opts(), launcher=launcher)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in plain.environment["env"] and plain.run["alloc_conf"] is None


def test_a_kept_snapshot_outlives_the_run_folder(tmp_path):
    """profile(out=None, snapshot) hands the snapshot to the caller (the campaign moves it next to
    its record): the run's work folder that holds it must not be deleted under it."""
    from vramplan.profile._session import _cleanup

    work = tmp_path / "vramplan-profile-x"
    work.mkdir()
    snap = work / "r.snapshot.pickle"
    snap.write_bytes(b"x")
    _cleanup(work, snap, keep_snapshot=True)
    assert snap.read_bytes() == b"x"
    _cleanup(work, snap, keep_snapshot=False)
    assert not work.exists()


def test_paged_state_is_not_counted_on_the_cpu(tmp_path, launcher):
    # full fine-tuning: embed_tokens / lm_head (2048 x 64 = 131072 >= 1e5 elements) get paged state
    cfg = dict(CONFIG, vocab_size=2048)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    record, _ = profile(str(tmp_path), TrainSetup(method="full", seq=32, optimizer="paged_adamw"),
                        cpu_opts(), launcher=launcher)
    assert record.status == "ok"
    m = record.measured
    # two fp32 states of each of the two 2048 x 64 matrices
    assert m.paged_optimizer_bytes == 2 * 2 * 2048 * 64 * 4
    assert any("page" in n for n in record.notes)


def test_weights_from_disk(tmp_path, launcher):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    record, _ = profile(str(tmp_path), TrainSetup(seq=32), ProfileOptions(device="cpu", steps=1), launcher=launcher)
    assert record.status == "ok" and record.run["weights"] == str(tmp_path)
    assert record.measured.inventory["quant_constants"] == record.estimate["components"]["quant_constants"]


def test_missing_weights_is_a_one_line_error(tiny, launcher):
    with pytest.raises(ModelError, match="no weights for") as exc:
        profile(tiny, TrainSetup(seq=32), ProfileOptions(device="cpu", steps=1), launcher=launcher)
    assert "--random-weights" in exc.value.hint


def test_crash_is_recorded_with_the_last_values(tiny, launcher, tmp_path):
    seen = {}

    def kill_in_backward(event):
        if event.get("event") == "env":
            seen["pid"] = event["pid"]
        if event.get("event") == "phase" and event.get("stage") == "start" and event.get("phase") == "backward":
            os.kill(seen["pid"], signal.SIGKILL)

    record, path = profile(tiny, TrainSetup(seq=32), cpu_opts(), out=tmp_path, on_event=kill_in_backward,
                           launcher=launcher)
    assert record.status == "crashed" and path.exists()
    f = record.failure
    assert f.step == 0 and f.phase == "backward" and f.last_allocated_bytes > 0
    assert "signal 9" in f.message
    assert record.error["allocated"] is None


def test_timeout_is_recorded(tiny, launcher, tmp_path):
    record, path = profile(tiny, TrainSetup(seq=32), cpu_opts(timeout_s=0.01), out=tmp_path, launcher=launcher)
    assert record.status == "timeout" and record.failure.kind == "timeout" and path.exists()


def test_ctrl_c_writes_nothing(tiny, launcher, tmp_path):
    pid = {}

    def interrupt(event):
        if event.get("event") == "env":
            pid["child"] = event["pid"]
        if event.get("event") == "phase":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile(tiny, TrainSetup(seq=32), cpu_opts(), out=tmp_path, on_event=interrupt, launcher=launcher)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ProcessLookupError):   # the child was ended
        os.kill(pid["child"], 0)


@pytest.mark.parametrize("argv, code, message", [
    (["--device", "tpu"], 2, "Error: unknown device 'tpu'"),
    (["--steps", "0"], 2, "Error: --steps must be a whole number >= 1"),
    (["--device", "cpu", "--snapshot"], 2, "Error: --snapshot needs a GPU"),
    (["--plot", "mem.gif"], 2, "Error: --plot mem.gif: unknown image type"),
    (["--targets", "qkv"], 1, "Error: target modules qkv match nothing"),
    (["--device", "cpu", "--seed", str(2**70)], 2, f"Error: --seed must be a whole number in [0, 2**63), got {2**70}"),
])
def test_bad_profile_flags_fail_before_any_run(capsys, tiny, argv, code, message):
    got = main(["profile", tiny, "--random-weights", *argv])
    err = capsys.readouterr().err
    assert got == code and err.startswith(message) and err.count("\n") == 1 and "hint:" in err


def test_no_gpu_for_device_cuda_is_one_line(capsys, tiny, monkeypatch, tmp_path):
    # a fake pynvml whose init fails, as on a machine without the NVIDIA driver
    import types

    class NVMLError(Exception):
        pass

    def fail():
        raise NVMLError("NVML Shared Library Not Found")
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    code = main(["profile", tiny, "--random-weights", "--device", "cuda", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("Error: NVML is not available") and "--device cpu" in err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_cli_profile_json_in_a_fresh_interpreter(tiny, tmp_path):
    """The CLI path: `vramplan profile ... --device cpu --json` starts the child with
    `python -m vramplan.profile._runner`."""
    out = tmp_path / "profiles"
    proc = subprocess.run([sys.executable, "-m", "vramplan.cli", "profile", tiny, "--device", "cpu",
                           "--random-weights", "--steps", "1", "--seq", "32", "--out", str(out), "--json",
                           "--plot", str(tmp_path / "mem.png")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "ok" and data["path"] and os.path.exists(data["path"])
    assert data["measured"]["peak_allocated_bytes"] > 0 and data["nvml"]["available"] is False
    assert (tmp_path / "mem.png").stat().st_size > 1000
    assert "Traceback" not in proc.stderr


def test_options_validation():
    with pytest.raises(UsageError):
        ProfileOptions(device="cuda:x").validate()
    with pytest.raises(UsageError):
        ProfileOptions(nvml_hz=0).validate()
    ProfileOptions(device="cuda:1").validate()
    with pytest.raises(UsageError, match="expandable_segments"):
        ProfileOptions(alloc_conf="expandable_segments:maybe").validate()
    ProfileOptions(alloc_conf="expandable_segments:True,max_split_size_mb:128").validate()
    assert GpuError  # imported for the error taxonomy the CLI maps


def test_default_steps_depend_on_the_device():
    assert ProfileOptions(device="cpu").steps == 2
    assert ProfileOptions().steps == 5 and ProfileOptions(device="cuda:1").steps == 5
    assert ProfileOptions(device="cpu", steps=7).steps == 7


def test_a_phase_that_changes_between_measured_steps_is_noted():
    from vramplan.profile._record import PhaseStats
    from vramplan.profile._session import unsteady_phases

    def step(i, fwd_peak, warmup=False):
        return [PhaseStats("forward", i, warmup, 100, 300, fwd_peak), PhaseStats("backward", i, warmup, 300, 100, 900)]

    assert unsteady_phases([PhaseStats("load", None, False, 0, 100, 100), *step(0, 700, True), *step(1, 500),
                            *step(2, 500)]) == []           # the warm-up may differ; measured steps repeat
    notes = unsteady_phases([*step(0, 500, True), *step(1, 500), *step(2, 512)])
    assert notes == ["cpu run: the forward phase differs between measured steps (peak allocated 500..512 bytes, "
                     "allocated at its end 300..300): the step is not steady"]


class FakeCuda:
    """torch.cuda as the GPU branch of the runner uses it, with scripted counters."""

    def __init__(self):
        self.allocated, self.reserved, self.peak, self.peak_reserved = 0, 0, 0, 0
        self.fraction = None
        self.calls = []

    def is_available(self):
        return True

    def device_count(self):
        return 1

    def set_device(self, d):
        self.calls.append("set_device")

    def synchronize(self, d=None):
        self.calls.append("sync")

    def memory_allocated(self, d=None):
        return self.allocated

    def memory_reserved(self, d=None):
        return self.reserved

    def max_memory_allocated(self, d=None):
        return self.peak

    def max_memory_reserved(self, d=None):
        return self.peak_reserved

    def reset_peak_memory_stats(self, d=None):
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def memory_stats(self, d=None):
        return {"allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.peak,
                "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.peak_reserved,
                "num_alloc_retries": 3, "num_ooms": 0, "segment.all.current": 7, "segment.all.peak": 9,
                "requested_bytes.all.peak": 1}

    def get_device_properties(self, d):
        import types
        return types.SimpleNamespace(name="NVIDIA H200", total_memory=140 * 2**30, major=9, minor=0,
                                     multi_processor_count=132, uuid="GPU-1")

    def set_per_process_memory_fraction(self, fraction, d=None):
        self.fraction = fraction

    def init(self):
        pass


def test_gpu_branch_of_the_runner_with_fake_cuda_and_nvml():
    """The runner's CUDA bookkeeping (context size, --gpu cap, phase counters, OOM values) with
    torch.cuda and NVML replaced by fakes: the code a GPU runs, minus the GPU."""
    import types

    import torch

    from vramplan.profile import _runner as runner
    from vramplan.profile._meters import CudaMeter
    from vramplan.profile._nvml import open_device

    events = []
    ch = types.SimpleNamespace(send=lambda event, **d: events.append(dict(d, event=event)))
    job = {"setup": TrainSetup().to_dict(), "device": "cuda:0", "warmup": 1, "steps": 1,
           "memory_limit_bytes": 24 * 2**30, "predicted_context_bytes": 500 * 2**20}
    run = runner.Run(job, ch)
    cuda = FakeCuda()
    cuda.reserved = 2 * 2**20          # the probe's small-pool segment
    run.torch = types.SimpleNamespace(cuda=cuda, empty=lambda *a, **k: object())
    run.device = torch.device("cuda", 0)
    base = 600 * 2**20
    used = base + 2 * 2**20 + 480 * 2**20
    fake_nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=used, total=141 * 2**30))
    run.nvml = open_device(0, nvml=fake_nvml)
    run.baseline, run.driver, run.nvml_error = base, "570.1", None
    run._context()
    ctx = [e for e in events if e["event"] == "context"][0]
    assert ctx["available"] and ctx["context_bytes"] == 480 * 2**20 and ctx["baseline_used_bytes"] == base
    assert cuda.fraction == pytest.approx((24 * 2**30 - 480 * 2**20) / (140 * 2**30))
    # phase counters: reset at the start, peaks read at the end, device synchronized both times
    run.meter = CudaMeter(run.device)
    run.meter.torch = run.torch
    cuda.allocated, cuda.reserved = 5 * 2**30, 6 * 2**30
    start = run._begin(1, "forward")
    cuda.peak, cuda.peak_reserved, cuda.allocated = 9 * 2**30, 10 * 2**30, 7 * 2**30
    stats = run._end(start)
    assert stats["allocated_start"] == 5 * 2**30 and stats["allocated_end"] == 7 * 2**30
    assert stats["peak_allocated"] == 9 * 2**30 and stats["peak_reserved"] == 10 * 2**30
    assert stats["reserved_end"] == 6 * 2**30 and stats["warmup"] is False
    assert cuda.calls.count("sync") >= 3
    # the allocator's own counters, the recorded subset
    recorded = run._allocator_stats()
    assert recorded == {"allocated_bytes.all.current": 7 * 2**30, "allocated_bytes.all.peak": 9 * 2**30,
                        "reserved_bytes.all.current": 6 * 2**30, "reserved_bytes.all.peak": 10 * 2**30,
                        "num_alloc_retries": 3, "num_ooms": 0, "segment.all.current": 7, "segment.all.peak": 9}
    # an OOM inside the next phase keeps the last values, NVML included
    run._begin(1, "backward")
    cuda.peak = 11 * 2**30
    run._failure("oom", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    f = [e for e in events if e["event"] == "failure"][0]
    assert (f["kind"], f["step"], f["phase"]) == ("oom", 1, "backward")
    assert f["last_peak_allocated_bytes"] == 11 * 2**30 and f["last_reserved_bytes"] == 6 * 2**30
    assert f["last_nvml_used_bytes"] == 482 * 2**20 and f["traceback"] is None
    # without NVML the cap falls back to the estimate's context model
    events.clear()
    run.nvml, run.nvml_error = None, "NVML: no driver"
    run._context()
    assert events[0] == {"event": "context", "available": False, "reason": "NVML: no driver"}
    assert cuda.fraction == pytest.approx((24 * 2**30 - 500 * 2**20) / (140 * 2**30))


def test_paged_state_is_found_on_a_gpu_run():
    """bitsandbytes' get_paged wraps CUDA managed memory with torch.frombuffer, so a paged state is
    a CPU tensor marked is_paged even when the optimizer runs on the GPU: it is the paged part, the
    device tensors (absmax, small tensors' states) the device part."""
    import types

    import torch

    from vramplan.profile import _runner as runner

    class Meter:
        def __init__(self):
            self.ignored, self.tagged = [], []

        def ignore(self, t):
            self.ignored.append(t)

        def retag(self, t, component):
            self.tagged.append((t, component))

    paged = torch.zeros(200_000, dtype=torch.uint8)          # host-visible, as frombuffer makes it
    paged.is_paged = True
    absmax = torch.zeros(782, dtype=torch.float32, device="meta")   # (meta storages share data_ptr 0: one)
    elsewhere = torch.zeros(10, dtype=torch.float32)          # a host tensor that is not paged
    run = object.__new__(runner.Run)
    run.torch, run.device, run.meter = torch, torch.device("meta"), Meter()
    run.setup = TrainSetup(optimizer="paged_adamw8bit")
    opt = types.SimpleNamespace(state={"p1": {"state1": paged, "absmax1": absmax, "step": 1},
                                       "p2": {"other": elsewhere}})
    device_bytes, paged_bytes = run._optimizer_state(opt)
    assert paged_bytes == 200_000
    assert device_bytes == 3_584                   # 782 float32 absmax, rounded to 512 B
    assert run.meter.ignored == [paged] and [c for _, c in run.meter.tagged] == ["optimizer_state"]


def test_a_device_that_is_not_text_is_refused():
    with pytest.raises(UsageError, match="unknown device 5"):
        ProfileOptions(device=5).validate()
