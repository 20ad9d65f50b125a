"""`vramplan simulate`: output contract (JSON keys shared with estimate, components summing to the
peak, estimate + difference blocks, timeline CSV) and the error texts, pinned."""
from __future__ import annotations

import csv
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import requires, tiny_config

pytestmark = requires("torch", "transformers", "peft", "bitsandbytes")

from vramplan.cli import main  # noqa: E402
from vramplan.core._components import ALLOCATED  # noqa: E402

TINY = ["--seq", "32", "--rank", "8"]
HINT = "(hint: vramplan estimate still works; please report this model and setup)"


@pytest.fixture
def model_dir(tmp_path):
    def make(model_type: str = "llama", **overrides):
        folder = tmp_path / model_type
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(tiny_config(model_type, **overrides)))
        return str(folder)
    return make


def simulate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["simulate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- output ----------------------------------------------------------------------------------------

def test_json_is_the_trace_plus_estimate_and_difference(capsys, model_dir, tmp_path):
    timeline = tmp_path / "mem.csv"
    code, out, err = simulate(capsys, model_dir(), *TINY, "--json", "--timeline", str(timeline))
    assert code == 0 and err == ""          # no progress bar when stderr is not a terminal
    d = json.loads(out)
    names = [c.value for c in ALLOCATED]
    assert list(d["components"]) == names and sum(d["components"].values()) == d["peak_allocated_bytes"]
    assert d["peak_phase"] in ("forward", "backward", "optimizer") and d["peak_module"] and d["peak_op"]
    assert d["top_modules"] and d["timeline"] and d["layers_traced"] == 2 and d["extrapolated"] is False
    est = d["estimate"]
    assert set(est) == {"peak_allocated_bytes", "peak_phase", "components", "phase_peaks", "peak_reserved_bytes",
                        "alloc_conf"}
    # both replays of the caching allocator: at least what is allocated at the peak
    assert d["peak_reserved_bytes"] >= d["peak_allocated_bytes"]
    assert est["peak_reserved_bytes"] >= est["peak_allocated_bytes"]
    assert d["alloc_conf"] == est["alloc_conf"]
    assert list(est["components"]) == names
    diff = d["difference"]
    assert diff["peak_allocated_bytes"] == est["peak_allocated_bytes"] - d["peak_allocated_bytes"]
    assert diff["components"] == {k: est["components"][k] - d["components"][k] for k in names}
    for k in names:
        pct = diff["components_percent"][k]
        assert pct is None if d["components"][k] == 0 else pct == round(100 * diff["components"][k] / d["components"][k], 2)
    # --timeline: allocated bytes over the step, the same rows as the JSON
    with open(timeline, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["event", "phase", "module", "op", "allocated_bytes"]
    assert [[int(r[0]), r[1], r[2], r[3], int(r[4])] for r in rows[1:]] == d["timeline"]
    assert max(int(r[4]) for r in rows[1:]) == d["peak_allocated_bytes"]


def test_rich_output_shows_peak_components_estimate_and_modules(capsys, model_dir):
    code, out, err = simulate(capsys, model_dir(), *TINY)
    assert code == 0 and err == ""
    out = " ".join(out.split())   # rich wraps at the console width
    for text in ("simulated on the meta device", "Peak allocated", "Components at the peak (GiB)", "simulate",
                 "estimate", "est - sim", "peak_allocated", "Peak by phase (GiB)", "Top modules at the peak",
                 "all 2 layers traced", "weights", "temporaries"):
        assert text in out, text


def test_exact_traces_every_layer_with_the_same_result(capsys, model_dir):
    path = model_dir(num_hidden_layers=7)
    results = []
    for flags in ([], ["--exact"]):
        code, out, _ = simulate(capsys, path, *TINY, "--json", *flags)
        assert code == 0
        results.append(json.loads(out))
    short, exact = results
    assert (short["extrapolated"], short["layers_traced"]) == (True, 5)
    assert (exact["extrapolated"], exact["layers_traced"]) == (False, 7)
    for key in ("peak_allocated_bytes", "components", "peak_module", "timeline", "estimate", "difference"):
        assert short[key] == exact[key], key


def test_progress_reports_layers_as_they_run(tiny_spec):
    from vramplan.core._setup import TrainSetup
    from vramplan.simulate import simulate as run

    seen = []
    run(tiny_spec(), TrainSetup(seq=32, rank=8), progress=lambda stage, done, total: seen.append((stage, done, total)))
    stages = [s for s, _, _ in seen]
    assert stages[0] == "building the model"
    for stage in ("warm-up step", "measured step"):
        rows = [(d, t) for s, d, t in seen if s == stage]
        assert rows[0] == (0, 4) and rows[-1] == (4, 4)   # 2 layers forward + 2 backward
        assert [d for d, _ in rows] == sorted(d for d, _ in rows)


def test_cli_parser_stays_light():
    code = "import sys, vramplan.cli._app as c; c.build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("package, argv", [("torch", []), ("transformers", []), ("peft", []),
                                           ("bitsandbytes", []), ("bitsandbytes", ["--optimizer", "adamw8bit",
                                                                                   "--method", "lora"])])
def test_missing_package_is_one_line_with_the_extra(capsys, monkeypatch, model_dir, package, argv):
    path = model_dir()
    monkeypatch.setitem(sys.modules, package, None)   # `import package` raises ImportError
    code, out, err = simulate(capsys, path, *TINY, *argv)
    assert code == 1 and out == ""
    assert re.fullmatch(rf"Error: {package} is not installed \(.+\) \(hint: pip install 'vramplan\[simulate\]'\)\n", err)


def test_architecture_transformers_cannot_build(capsys, monkeypatch, model_dir):
    import transformers

    path = model_dir()
    monkeypatch.setattr(transformers, "CONFIG_MAPPING", {})   # as with a transformers release without llama
    code, out, err = simulate(capsys, path, *TINY)
    assert code == 1 and out == ""
    assert err == (f"Error: architecture 'llama' ({path}) is not known to transformers {transformers.__version__} "
                   "(hint: simulate needs a transformers release that has this model_type; the analytic estimate "
                   "does not)\n")


@pytest.mark.parametrize("overrides, message", [
    (dict(rms_norm_eps="x"), "transformers refuses the config of {path}: StrictDataclassFieldValidationError: "
                             "Validation error for field 'rms_norm_eps'"),
    (dict(hidden_act="nonexistent_act"), "transformers cannot build {path} from its config: KeyError: "
                                         "'nonexistent_act'"),
    (dict(pad_token_id=100_000), "transformers cannot build {path} from its config: AssertionError: "
                                 "Padding_idx must be within num_embeddings"),
    (dict(torch_dtype="float8"), "transformers refuses the config of {path}: AttributeError: module 'torch' has "
                                 "no attribute 'float8'"),
])
def test_config_values_transformers_cannot_use_are_one_line(capsys, model_dir, overrides, message):
    path = model_dir(**overrides)
    code, out, err = simulate(capsys, path, *TINY, "--method", "lora")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("Error: " + message.format(path=path)), err


def test_gpu_gives_the_verdict_estimate_gives_on_the_simulated_step(capsys, model_dir):
    from vramplan.core._gpus import resolve_gpu
    from vramplan.core._verdict import verdict
    from vramplan.cuda._context import cuda_context

    path = model_dir()
    code, out, err = simulate(capsys, path, *TINY, "--json")
    assert code == 0 and json.loads(out)["status"] is None and json.loads(out)["gpu"] is None
    assert json.loads(out)["fits"] is None
    reserved = json.loads(out)["peak_reserved_bytes"]
    context = cuda_context(resolve_gpu("1GB")).bytes
    for card in ("1GB", str(context + reserved - 2**20)):      # room to spare; 1 MiB short of the need
        code, out, err = simulate(capsys, path, *TINY, "--gpu", card, "--json")
        data = json.loads(out)
        assert code == 0, err
        gpu = resolve_gpu(card)
        assert data["gpu"] == {"name": gpu.name, "memory_bytes": gpu.memory_bytes}
        assert data["cuda_context_bytes"] == context
        if data["allocator_retries"] == 0 and data["allocator_oom"] is None:
            assert data["device_total_bytes"] == context + reserved == context + data["peak_reserved_bytes"]
        assert data["status"] == verdict(data["device_total_bytes"], gpu.memory_bytes, oom=data["allocator_oom"])
        assert data["fits"] == (data["status"] != "no")     # estimate's key, estimate's rule
        assert data["headroom_bytes"] == gpu.memory_bytes - data["device_total_bytes"]
    code, out, _ = simulate(capsys, path, *TINY, "--gpu", "1GB")
    assert code == 0 and "Simulated: FITS on 1GB (0.93 GiB): " in out


def test_simulate_says_the_estimates_warnings_and_no_rank_for_full(capsys, model_dir):
    path = model_dir(max_position_embeddings=16)
    code, out, err = simulate(capsys, path, *TINY, "--json")
    assert code == 0, err
    assert json.loads(out)["warnings"][0].startswith("seq 32 is longer than the model's context (max_position_embeddings 16")
    code, out, err = simulate(capsys, path, "--seq", "32", "--method", "full")
    assert code == 0 and "WARNING: seq 32 is longer than the model's context" in " ".join(out.split())
    assert f"{path} — full, batch 1 x seq 32, adamw" in " ".join(out.split())


def test_gemma2_with_sdpa_is_refused_with_the_eager_hint(capsys, model_dir):
    # transformers 5 refuses sdpa for Gemma-2 (build.py); the estimate may refuse it first
    code, out, err = simulate(capsys, model_dir("gemma2"), *TINY, "--attn", "sdpa")
    assert code == 1 and out == "" and err.startswith("Error: ") and err.endswith("(hint: use --attn eager)\n")
    assert err.count("\n") == 1


def test_op_failing_mid_way_names_phase_module_and_op(capsys, monkeypatch, model_dir):
    kernels = importlib.import_module("vramplan.simulate._kernels")

    def broken(tracker, func, args, kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(kernels, "flash_attention_backward", broken)
    code, out, err = simulate(capsys, model_dir(), *TINY)
    assert code == 1 and out == ""
    assert err == ("Error: the simulated backward step failed in module model.layers.1.self_attn, op "
                   f"aten._scaled_dot_product_flash_attention_backward.default: RuntimeError: boom {HINT}\n")


def test_python_failing_mid_way_names_the_module(capsys, monkeypatch, model_dir):
    from transformers.models.llama import modeling_llama

    def broken(self, x):
        raise ValueError("mlp says no")

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", broken)
    code, out, err = simulate(capsys, model_dir(), *TINY)
    assert code == 1
    assert err == f"Error: the simulated forward step failed in module model.layers.0.mlp: ValueError: mlp says no {HINT}\n"


def test_bad_input_is_rejected_before_the_trace(capsys, model_dir, monkeypatch, tmp_path):
    package = importlib.import_module("vramplan.simulate")
    monkeypatch.setattr(package, "simulate", lambda *a, **k: pytest.fail("traced despite bad input"))
    path = model_dir()
    code, _, err = simulate(capsys, path, "--timeline", "/nonexistent-dir/mem.csv")
    assert (code, err) == (2, "Error: --timeline /nonexistent-dir/mem.csv: /nonexistent-dir does not exist "
                              "(hint: write the file into an existing folder)\n")
    fifo = tmp_path / "mem.fifo"
    os.mkfifo(fifo)          # opening it for writing would wait for a reader for ever
    code, _, err = simulate(capsys, path, "--timeline", str(fifo))
    assert (code, err) == (2, f"Error: --timeline {fifo} is not a regular file (a device or a named pipe) "
                              "(hint: give a file name, e.g. --timeline mem.csv)\n")
    code, _, err = simulate(capsys, path, "--method", "nope")
    assert (code, err) == (2, "Error: unknown method 'nope' (hint: --method takes one of: qlora, lora, full)\n")
    code, _, err = simulate(capsys, "nobody/no-such-model-anywhere")
    assert code == 1 and err.startswith("Error: unknown model 'nobody/no-such-model-anywhere'")


def test_alloc_conf_reaches_simulate_replay(capsys, model_dir):
    """`--alloc-conf` is the setting simulate's replay runs under, the same one the estimate uses,
    on the shortcut path and on every-layer traces alike."""
    for extra in ([], ["--exact"]):
        code, out, _err = simulate(capsys, model_dir(), *TINY, "--json", "--alloc-conf", "expandable_segments:True",
                                   *extra)
        assert code == 0
        d = json.loads(out)
        assert d["alloc_conf"] == "expandable_segments:True" == d["estimate"]["alloc_conf"]
        assert d["peak_reserved_bytes"] >= d["peak_allocated_bytes"]


def test_a_config_transformers_cannot_build_as_a_causal_lm_is_one_short_line(capsys, tmp_path):
    """transformers' refusal lists every config class AutoModelForCausalLM knows (about 3 KB):
    the error keeps its start, on one line of at most a few hundred characters."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"},
                                "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                "num_hidden_layers": 2, "num_attention_heads": 4,
                                                "vocab_size": 1000}}))
    code, out, err = simulate(capsys, str(path), "--seq", "64")
    assert code != 0 and out == "" and err.count("\n") == 1 and len(err) < 600
    assert err.startswith(f"Error: transformers cannot build {path} as a causal LM: Unrecognized configuration "
                          "class <class 'transformers.models.llava.configuration_llava.LlavaConfig'>")


def test_an_allocator_oom_in_simulate_names_its_phase_and_module_as_estimate_does():
    """A card 3 MiB above peak allocated + context: both replays run out of memory in the
    backward (fragmentation); each names the phase, and simulate the module whose storage failed."""
    from vramplan import estimate
    from vramplan.simulate import simulate as run_simulate

    from pathlib import Path

    cfg = str(Path(__file__).parent / "configs" / "llama-gqa.json")
    e = estimate(cfg, seq=512)
    card = f"{e.peak_allocated_bytes + e.cuda_context_bytes + 3 * 2**20}B"
    sim, est = run_simulate(cfg, seq=512, gpu=card).allocator_oom, estimate(cfg, seq=512, gpu=card).allocator_oom
    assert sim["phase"] == est["phase"] == "backward"
    assert sim["module"].startswith("model.layers.") and est["module"].startswith("layers.")


def test_a_step_that_does_not_fit_says_the_least_card_it_runs_on_as_estimate_does(capsys):
    """simulate's shortfall is the smallest card its own replay runs on (estimator.smallest_card),
    as estimate's: it said 'short by 6.05 GiB' from the device total with room to spare where
    estimate said 'a card of about 8.50 GiB (short by about 4.78 GiB)'."""
    from vramplan.estimate._estimator import SMALLEST_CARD_STEP, estimate

    argv = ("Qwen/Qwen2.5-0.5B", "--gpu", "4GB", "--batch", "2", "--seq", "2048")
    code, out, err = simulate(capsys, *argv, "--json")
    assert code == 0, err
    data = json.loads(out)
    least = estimate("Qwen/Qwen2.5-0.5B", batch=2, seq=2048, gpu="4GB").smallest_gpu_bytes
    assert data["status"] == "no" and abs(data["smallest_gpu_bytes"] - least) <= SMALLEST_CARD_STEP
    assert data["cuda_context_bytes"] + data["peak_allocated_bytes"] <= data["smallest_gpu_bytes"] < data["device_total_bytes"]
    code, out, err = simulate(capsys, *argv)
    assert code == 0 and "Simulated: DOES NOT FIT on 4GB (3.73 GiB): it runs on a card of about" in " ".join(out.split())
