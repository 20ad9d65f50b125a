"""The CLI contract: one-line errors with hints and exit codes, JSON keys other tools rely on,
and an estimate path that never imports heavy packages."""
import json
import os
import subprocess
import sys

import pytest

from vramplan.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_keys_and_sum(capsys):
    code, out, _ = run(capsys, "estimate", "meta-llama/Llama-2-70b", "--gpu", "48GB", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("peak_allocated_bytes", "device_total_bytes", "components", "fits", "gpu", "model", "setup"):
        assert key in data
    assert set(data["components"]) >= {"weights", "quant_constants", "adapters", "gradients", "optimizer_state",
                                       "activations", "logits_loss", "temporaries"}
    assert all(isinstance(v, int) for v in data["components"].values())
    assert data["gpu"]["memory_bytes"] == 48 * 10**9
    assert data["model"]["id"] == "meta-llama/Llama-2-70b-hf"
    assert data["setup"]["method"] == "qlora" and data["setup"]["rank"] == 16


def test_fits_is_null_without_gpu(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--json")
    assert code == 0 and json.loads(out)["fits"] is None


def test_all_setup_flags_reach_the_setup(capsys):
    code, out, _ = run(capsys, "estimate", "mistralai/Mistral-7B-v0.1", "--gpu", "RTX4090", "--batch", "4",
                       "--seq", "4096", "--no-grad-ckpt", "--method", "qlora", "--quant", "fp4",
                       "--no-double-quant", "--dtype", "fp16", "--rank", "8", "--targets", "q_proj,v_proj",
                       "--lora-dropout", "0.05", "--attn", "eager", "--optimizer", "paged_adamw8bit",
                       "--prepare-kbit", "--experts", "4bit", "--loop", "plain", "--loss", "chunked", "--grad-accum", "3",
                       "--json")
    assert code == 0
    s = json.loads(out)["setup"]
    assert s == {"method": "qlora", "quant": "fp4", "double_quant": False, "dtype": "fp16", "rank": 8,
                 "targets": ["q_proj", "v_proj"], "lora_dropout": 0.05, "batch": 4, "seq": 4096, "grad_accum": 3,
                 "grad_ckpt": False, "reentrant": None, "attn": "eager", "optimizer": "paged_adamw8bit", "prepare_kbit": True,
                 "experts": "4bit", "amp": "none", "loop": "plain", "loss": "chunked", "recast": False,
                 "adapter_dtype": "fp32", "recipe": None}


def test_table_output_names_verdict_and_assumptions(capsys):
    code, out, _ = run(capsys, "estimate", "meta-llama/Llama-2-70b", "--gpu", "A100-80GB")
    assert code == 0
    assert "FITS" in out and "Assumptions" in out and "peak allocated" in out


# Pinned error text: scripts and users depend on these lines.
@pytest.mark.parametrize("argv, code, message", [
    (["estimate", "no-such-model"], 1, "Error: unknown model 'no-such-model'"),
    (["estimate", "a" * 300], 1, f"Error: unknown model '{'a' * 300}'"),     # longer than a file name may be
    (["estimate", "llama-2-7b", "--gpu", "B9000"], 1, "Error: unknown GPU 'B9000'"),
    (["estimate", "llama-2-7b", "--gpu", "all"], 1,
     "Error: unknown GPU 'all' (hint: `vramplan plan MODEL --gpu all` compares every catalog GPU; here give one"),
    (["estimate", "llama-2-7b", "--gpu", "0GB"], 2, "Error: memory size '0GB' must be positive"),
    (["estimate", "llama-2-7b", "--gpu", "5MB"], 2, "Error: GPU size '5MB' is not a plausible GPU memory size"),
    (["estimate", "llama-2-7b", "--gpu=-4GB"], 2, "Error: GPU memory must be positive, got '-4GB'"),
    (["estimate", "llama-2-7b", "--batch", "0"], 2, "Error: --batch must be positive, got 0"),
    (["estimate", "llama-2-7b", "--seq", "99999999999"], 2, "Error: --seq 99999999999 is beyond any real run"),
    (["estimate", "llama-2-7b", "--rank", "-1"], 2, "Error: --rank must be positive, got -1"),
    (["estimate", "llama-2-7b", "--method", "dora"], 2, "Error: unknown method 'dora'"),
    (["estimate", "llama-2-7b", "--quant", "nf2"], 2, "Error: unknown quant 'nf2'"),
    (["estimate", "llama-2-7b", "--optimizer", "lion"], 2, "Error: unknown optimizer 'lion'"),
    (["estimate", "llama-2-7b", "--targets", "qkv"], 1, "Error: target modules qkv match nothing"),
    (["estimate", "llama-2-7b", "--batch", "two"], 2, "Error: argument --batch: invalid int value: 'two'"),
    (["estimate"], 2, "Error: the following arguments are required: model"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--workers", "0"], 2,
     "Error: --workers must be a whole number of at least 1, got 0"),
    (["sweep", "llama-2-7b", "--workers", "-1"], 2, "Error: --workers must be a whole number of at least 1, got -1"),
    (["frobnicate"], 2, "Error: argument command: invalid choice: 'frobnicate'"),
    # a prefix of a flag is not that flag: `--no-ckpt` would have been --no-ckpt-reentrant
    (["plan", "llama-2-7b", "--gpu", "24GB", "--no-ckpt"], 2, "Error: unrecognized arguments: --no-ckpt"),
    (["estimate", "llama-2-7b", "--bat", "2"], 2, "Error: unrecognized arguments: --bat 2"),
])
def test_bad_input_is_one_line_with_hint(capsys, argv, code, message):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "hint:" in err and "Traceback" not in err
    assert out == ""


def test_malformed_config_file(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('["not", "an", "object"]')
    code, _, err = run(capsys, "estimate", str(path))
    assert code == 1 and err.startswith("Error: config for") and "is not a JSON object" in err


def _llama_config(tmp_path, **changes) -> str:
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("changes, message", [
    # past 2**64 the replay's packed sizes break; millions of layers would run for minutes
    (dict(vocab_size=10**30), "vocab_size 1,000,000,000,000,000,000,000,000,000,000 is beyond any model "
                              "(at most 4,194,304)"),
    (dict(hidden_size=6_400_000_000, num_attention_heads=50_000_000), "hidden_size 6,400,000,000 is beyond any model"),
    (dict(intermediate_size=10**15), "intermediate_size 1,000,000,000,000,000 is beyond any model"),
    (dict(num_hidden_layers=100_000), "num_hidden_layers 100,000 is beyond any model (at most 1,024)"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be a positive integer, got 0"),
    (dict(max_position_embeddings=-1), "max_position_embeddings must be a positive integer, got -1"),
])
def test_config_fields_out_of_range_are_refused(capsys, tmp_path, changes, message):
    code, out, err = run(capsys, "estimate", _llama_config(tmp_path, **changes), "--gpu", "48GB")
    assert code == 1 and out == "", err
    assert err.startswith("Error: config for ") and message in err and err.count("\n") == 1, err


def test_a_step_past_a_64_bit_address_space_is_refused(capsys, tmp_path):
    # every field within its limit, but 2**38 tokens of a 2**22 vocabulary: logits alone are 2**62 bytes
    model = _llama_config(tmp_path, vocab_size=1 << 22, hidden_size=1 << 17, num_attention_heads=1024,
                          num_key_value_heads=1024, num_hidden_layers=2, intermediate_size=1 << 20)
    code, out, err = run(capsys, "estimate", model, "--gpu", "48GB", "--batch", "65536", "--seq", "4194304")
    assert code == 2 and out == ""
    assert err.startswith("Error: the allocations would reserve more than 2**64 bytes (") and err.count("\n") == 1
    assert "(hint: lower the batch or the sequence length)" in err


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000, "its JSON nests too deeply"),
    ('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
])
def test_unreadable_config_json_is_one_line(capsys, tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    code, out, err = run(capsys, "estimate", str(tmp_path))
    assert code == 1 and out == "" and message in err and err.count("\n") == 1, err


def test_bad_environment_alloc_conf_is_named(capsys, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:maybe")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    code, out, err = run(capsys, "estimate", "llama-2-7b", "--gpu", "24GB")
    assert code == 2 and out == ""
    assert err == ("Error: PYTORCH_CUDA_ALLOC_CONF='expandable_segments:maybe' in the environment: invalid allocator "
                   "settings 'expandable_segments:maybe': expected 'True' or 'False' but got 'maybe' "
                   "(hint: fix or unset PYTORCH_CUDA_ALLOC_CONF, or give --alloc-conf)\n")
    code, _out, _err = run(capsys, "estimate", "llama-2-7b", "--gpu", "24GB", "--alloc-conf", "expandable_segments:True")
    assert code == 0
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")   # valid for torch, not modelled
    code, out, err = run(capsys, "estimate", "llama-2-7b", "--gpu", "24GB")
    assert code == 2 and out == ""
    assert err == ("Error: PYTORCH_CUDA_ALLOC_CONF='backend:cudaMallocAsync' in the environment: backend:cudaMallocAsync "
                   "is not modelled (hint: the model covers the native caching allocator only: unset "
                   "PYTORCH_CUDA_ALLOC_CONF, or give --alloc-conf)\n")


def test_models_and_gpus_list(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and any(m["id"] == "mistralai/Mixtral-8x7B-v0.1" for m in json.loads(out))
    code, out, _ = run(capsys, "gpus", "--json")
    assert code == 0 and any(g["name"] == "H100-80GB" for g in json.loads(out))


def test_estimate_path_imports_nothing_heavy():
    code = ("import sys, vramplan\n"
            "from vramplan.cli import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['estimate', 'meta-llama/Llama-2-70b', '--gpu', '48GB', '--json'])\n"
            "    main(['estimate', 'meta-llama/Llama-2-70b', '--gpu', '48GB'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'pandas', 'numpy', 'pynvml')\n"
            "         if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_command_exits_with_mains_code():
    """`python -m vramplan.cli` (cli.run, the console script too): main()'s return code, the output
    written before the interpreter exits."""
    ok = subprocess.run([sys.executable, "-m", "vramplan.cli", "gpus", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and any(g["name"] == "H100-80GB" for g in json.loads(ok.stdout))
    bad = subprocess.run([sys.executable, "-m", "vramplan.cli", "estimate", "no/such-model", "--json"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode != 0 and bad.stderr.startswith("Error:")


def test_library_call():
    import vramplan

    est = vramplan.estimate("meta-llama/Llama-2-70b", gpu="48GB")
    assert est.fits in (True, False)
    assert est.to_dict()["components"] == est.components


def test_a_tight_verdict_never_shows_the_tight_band_as_its_headroom(capsys):
    # 4.7% left on this card: TIGHT (under 5%), and the percent is rounded down, not up to "5%"
    code, out, _ = run(capsys, "estimate", "Qwen/Qwen2.5-0.5B", "--gpu", "6155020088B")
    assert code == 0
    assert "TIGHT on 6155020088B (5.73 GiB): 5.46 GiB needed, +0.27 GiB headroom (4%)." in " ".join(out.split())


@pytest.mark.parametrize("argv", [["estimate", "Qwen/Qwen2.5-0.5B"], ["models"]])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_with_0(argv):
    """`vramplan estimate ... | head -1`: rich's broken-pipe exit (SystemExit(1)) ends as main()
    ends a BrokenPipeError, with 0 and nothing on stderr."""
    cmd = f"{sys.executable} -m vramplan.cli {' '.join(argv)} | head -1 > /dev/null; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"})
    assert done.stdout.strip() == "0" and done.stderr == ""


def test_a_model_path_is_printed_as_written_not_as_markup(capsys, tmp_path):
    """rich reads `[...]` as markup: a folder named `[/x]` crashed every table's title, and
    `[red]y` lost its brackets. Paths and model ids are escaped wherever they are printed."""
    from conftest import tiny_config

    for name in ("[", "[red]y"):
        folder = tmp_path / name / "x" if name == "[" else tmp_path / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(tiny_config()))
        for argv in (["estimate", str(folder)], ["plan", str(folder), "--gpu", "24GB", "--no-recommend"]):
            got, out, err = run(capsys, *argv)
            assert got == 0, err
            assert str(folder) in "".join(out.split())      # as written, wherever rich wrapped it
