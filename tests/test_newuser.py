"""What a new user hit (issue #11, part 6), each pinned: configs filled with hidden defaults,
lookup narrative in product text, a sweep aborted by one bad row, contradictory flags silently
ignored, two shapes of `model` in JSON, colour-only verdicts, tables cut at 80 columns, and a
bitsandbytes warning printed by importing the Trainer callback."""
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.core._architectures import ARCHITECTURES

from vramplan.cli import main
from vramplan.core._config_fields import CORE_SHAPE_FIELDS, CONFIG_CLASSES
from vramplan.core._errors import ModelError, UsageError
from vramplan.core._models import ModelSpec, catalog, spec_from_config
from vramplan.core._setup import TrainSetup

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(tmp_path, config: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


FULL_LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 1000}


# --- 1. config.json with missing fields ------------------------------------------------------------

def test_a_config_without_its_shape_is_an_error_not_llama_2_7b(tmp_path, capsys):
    path = write_config(tmp_path, {"model_type": "llama", "hidden_size": 4096})
    code, out, err = run(capsys, "estimate", path)
    assert code == 1 and out == ""
    assert err == (f"Error: config for {path} is missing num_hidden_layers, num_attention_heads, intermediate_size, "
                   "vocab_size (hint: a llama config.json must give hidden_size, num_hidden_layers, "
                   "num_attention_heads, intermediate_size, vocab_size; vramplan fills at most two of them from "
                   "transformers' defaults)\n")


@pytest.mark.parametrize("missing", CORE_SHAPE_FIELDS)
def test_one_missing_core_field_is_an_assumption_three_are_an_error(missing):
    # published configs leave some out (gemma-3-4b-pt's text_config has no vocab_size nor
    # num_attention_heads): the family's default is used and named; three of five missing is
    # mostly defaults, an error
    config = {k: v for k, v in FULL_LLAMA.items() if k != missing}
    spec = spec_from_config(config, "m", "test")
    default = ARCHITECTURES["llama"].defaults[missing]
    assert any(f"{missing} = {default!r} (transformers' LlamaConfig default)" in line for line in spec.defaults_used)
    for other in [k for k in CORE_SHAPE_FIELDS if k != missing][:2]:
        config.pop(other)
    with pytest.raises(ModelError, match="is missing "):
        spec_from_config(config, "m", "test")


def test_defaults_used_are_listed_as_assumptions_with_their_origin(tmp_path, capsys):
    path = write_config(tmp_path, FULL_LLAMA)
    code, out, _ = run(capsys, "estimate", path, "--json")
    assert code == 0
    lines = [a for a in json.loads(out)["assumptions"] if a.startswith("config.json leaves out")]
    assert len(lines) == 1
    line = lines[0]
    assert "num_key_value_heads = num_attention_heads = 4 (as transformers derives it)" in line
    assert "head_dim = hidden_size / num_attention_heads = 64" in line
    for field in ("tie_word_embeddings = False", "attention_bias = False", "mlp_bias = False"):
        assert f"{field} (transformers' LlamaConfig default)" in line


def test_a_config_that_gives_every_field_has_no_default_assumption():
    config = dict(FULL_LLAMA, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False)
    assert spec_from_config(config, "m", "test").defaults_used == ()


def _claimed_defaults(spec: ModelSpec) -> dict[str, str]:
    """field -> value text, for the defaults the assumption line attributes to transformers."""
    out = {}
    for line in spec.defaults_used:
        for part in line.split(": ", 1)[1].split("; "):
            m = re.match(r"(\w+) = (?:.* = )?(\S+) \((as )?transformers", part)
            if m:
                out[m.group(1)] = m.group(2)
    return out


@pytest.mark.transformers
@pytest.mark.parametrize("model_id", sorted(catalog()))
def test_claimed_transformers_defaults_are_what_transformers_uses(model_id):
    """Every default the assumption line attributes to transformers is checked against the
    transformers config class built from the same config.json."""
    from transformers import CONFIG_MAPPING

    entry = catalog()[model_id]
    spec = spec_from_config(entry.config, entry.id, entry.source)
    config = CONFIG_MAPPING[spec.model_type](**{k: v for k, v in entry.config.items() if k != "model_type"})
    assert type(config).__name__ == CONFIG_CLASSES[spec.model_type]
    # head_dim: the attention modules read getattr(config, "head_dim", hidden_size // heads)
    derived = {"head_dim": config.hidden_size // config.num_attention_heads}
    for field, text in _claimed_defaults(spec).items():
        assert str(getattr(config, field, None) or derived[field] if field in derived
                   else getattr(config, field)) == text, (model_id, field)


def test_the_gemma2_catalog_entries_name_their_tied_embeddings_default():
    spec = spec_from_config(catalog()["google/gemma-2-2b"].config, "google/gemma-2-2b", "test")
    assert _claimed_defaults(spec) == {"tie_word_embeddings": "True"}


# --- 2. product text describes models, not lookups -----------------------------------------------

LOOKUP_WORDS = re.compile(r"find_string|find_files|read_file|index file|file ids?\b|search tool|\bhits\b|"
                          r"from memory|located with|not exposed|\blent\b", re.IGNORECASE)


@pytest.mark.parametrize("model_id", sorted(catalog()))
def test_catalog_sources_say_what_the_data_is(model_id):
    source = catalog()[model_id].source
    assert source.startswith(f"huggingface.co/{model_id}/blob/main/config.json: ")
    assert not LOOKUP_WORDS.search(source), source


def test_no_product_text_mentions_lookup_mechanics():
    files = [*ROOT.glob("vramplan/**/*.py"), *ROOT.glob("vramplan/**/*.json"), *ROOT.glob("vramplan/**/*.toml"),
             *ROOT.glob("docs/*.md"), ROOT / "README.md"]
    assert len(files) > 50
    offending = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
                 for m in [LOOKUP_WORDS.search(p.read_text())] if m]
    assert offending == []


def test_estimate_json_source_is_the_catalog_description(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--json")
    assert code == 0
    assert json.loads(out)["model"]["source"] == ("bundled catalog (huggingface.co/meta-llama/Llama-2-7b-hf/blob/"
                                                  "main/config.json: every field as published.)")


# --- 3. a sweep keeps rows that cannot run ---------------------------------------------------------

SDPA_REFUSED = ("google/gemma-2-2b (gemma2) cannot train with attn='sdpa' in transformers 5 "
                "(hint: use --attn eager)")


@pytest.mark.pandas
def test_sweep_marks_rows_that_cannot_run():
    import vramplan

    df = vramplan.sweep("gemma-2-2b", gpu="24GB", attn=["sdpa", "eager"], batch=[1, 2])
    assert len(df) == 4 and list(df.columns)[-1] == "error"
    bad, good = df[df["attn"] == "sdpa"], df[df["attn"] == "eager"]
    assert list(bad["error"]) == [SDPA_REFUSED] * 2
    assert list(bad["fits"]) == [None, None] and bad["device_total_bytes"].isna().all()
    assert list(good["error"]) == [None, None] and good["fits"].tolist() == [True, True]
    assert str(df["device_total_bytes"].dtype) == "Int64"  # bytes stay integers next to missing rows


def test_a_model_without_sdpa_trains_with_eager_unless_told(capsys):
    """With no --attn, every command takes what from_pretrained picks: sdpa, or eager where the
    model class has no SDPA path (Gemma-2's `_supports_sdpa = False`)."""
    code, out, _ = run(capsys, "estimate", "gemma-2-2b", "--json")
    assert code == 0 and json.loads(out)["setup"]["attn"] == "eager"
    assert any("gemma2 has no SDPA path" in a for a in json.loads(out)["assumptions"])
    code, out, _ = run(capsys, "plan", "gemma-2-2b", "--gpu", "24GB", "--json")
    assert code == 0 and json.loads(out)["setup"]["attn"] == "eager"
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--json")
    assert json.loads(out)["setup"]["attn"] == "sdpa"
    code, _, err = run(capsys, "estimate", "gemma-2-2b", "--attn", "sdpa")
    assert code == 1 and err == f"Error: {SDPA_REFUSED}\n"
    import vramplan

    assert vramplan.estimate("gemma-2-2b").setup.attn == "eager"


@pytest.mark.pandas
def test_sweep_cli_sweeps_method_without_contradicting_the_default_quant(capsys):
    code, out, err = run(capsys, "sweep", "llama-2-7b", "--method", "qlora,lora,full", "--json")
    assert code == 0 and err == ""
    assert [row["error"] for row in json.loads(out)] == [None, None, None]
    code, out, err = run(capsys, "sweep", "llama-2-7b", "--method", "qlora,full", "--quant", "int8", "--json")
    assert code == 0
    assert [row["error"] is None for row in json.loads(out)] == [True, False]


@pytest.mark.pandas
def test_sweep_cli_prints_the_reason_and_keeps_rows_in_the_csv(tmp_path, capsys):
    import pandas as pd

    csv = tmp_path / "s.csv"
    code, out, err = run(capsys, "sweep", "gemma-2-2b", "--gpu", "24GB", "--attn", "sdpa,eager", "--csv", str(csv))
    assert code == 0 and err == ""
    assert "cannot run [1]" in out and "[1] cannot run: google/gemma-2-2b (gemma2) cannot train" in out
    df = pd.read_csv(csv)
    assert len(df) == 2 and df["error"].notna().sum() == 1


@pytest.mark.pandas
def test_a_sweep_where_nothing_runs_is_one_error(capsys):
    code, out, err = run(capsys, "sweep", "gemma-2-2b", "--attn", "sdpa")
    assert (code, out, err) == (1, "", f"Error: {SDPA_REFUSED}\n")


@pytest.mark.pandas
def test_a_contradictory_combination_is_a_row_but_a_typo_is_fatal():
    import vramplan

    df = vramplan.sweep("llama-2-7b", method=["qlora", "full"], quant=["nf4", "int8"])
    errors = df.set_index(["method", "quant"])["error"].to_dict()
    # the quant axis was given, so it contradicts every full row; qlora rows run
    assert errors[("full", "int8")].startswith("--quant int8 contradicts --method full")
    assert errors[("full", "nf4")].startswith("--quant nf4 contradicts --method full")
    assert errors[("qlora", "nf4")] is None and errors[("qlora", "int8")] is None
    df = vramplan.sweep("llama-2-7b", method=["qlora", "full"])  # no quant axis: full rows run
    assert df["error"].isna().all()
    with pytest.raises(UsageError, match="unknown method 'dora'"):
        vramplan.sweep("llama-2-7b", method=["qlora", "dora"])


# --- 4. contradictory flags ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, error", [
    (["--method", "full", "--quant", "int8"],
     "Error: --quant int8 contradicts --method full (hint: --method full loads unquantized weights; quantization "
     "is --method qlora; drop --quant)"),
    (["--method", "full", "--quant", "nf4"],  # the default value, typed: still a contradiction
     "Error: --quant nf4 contradicts --method full (hint: --method full loads unquantized weights; quantization "
     "is --method qlora; drop --quant)"),
    (["--method", "lora", "--no-double-quant"],
     "Error: --no-double-quant contradicts --method lora (hint: --method lora loads unquantized weights; "
     "quantization is --method qlora; drop --no-double-quant)"),
    (["--quant", "int8", "--no-double-quant"],
     "Error: --no-double-quant contradicts --method qlora --quant int8 (hint: LLM.int8 (--quant int8) has no "
     "nested absmax quantization; it is a 4-bit option; drop --no-double-quant)"),
    (["--method", "full", "--rank", "16"],
     "Error: --rank 16 contradicts --method full (hint: --method full trains every weight, with no LoRA "
     "adapters; drop --rank)"),
    (["--method", "full", "--targets", "q_proj,v_proj"],
     "Error: --targets q_proj,v_proj contradicts --method full (hint: --method full trains every weight, with no "
     "LoRA adapters; drop --targets)"),
    (["--method", "full", "--lora-dropout", "0.1"],
     "Error: --lora-dropout 0.1 contradicts --method full (hint: --method full trains every weight, with no LoRA "
     "adapters; drop --lora-dropout)"),
    (["--method", "lora", "--prepare-kbit"],
     "Error: --prepare-kbit applies to quantized models only (hint: use it with --method qlora, or drop it)"),
])
@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_contradictory_flags_are_one_line_exit_2(capsys, command, argv, error):
    extra = ["--gpu", "80GB"] if command == "plan" else []
    code, out, err = run(capsys, command, "llama-2-7b", *argv, *extra)
    assert (code, out, err) == (2, "", error + "\n")


@pytest.mark.parametrize("argv", [["--method", "full"], ["--method", "full", "--optimizer", "paged_adamw8bit"],
                                  ["--method", "lora", "--rank", "8", "--targets", "q_proj"],
                                  ["--quant", "fp4", "--no-double-quant"], ["--quant", "int8", "--prepare-kbit"]])
def test_consistent_flags_still_run(capsys, argv):
    code, out, err = run(capsys, "estimate", "llama-2-7b", "--json", *argv)
    assert code == 0 and err == ""
    assert json.loads(out)["setup"]["method"] == (argv[1] if argv[0] == "--method" else "qlora")


def test_library_keyword_flags_are_checked_too():
    import vramplan
    from vramplan.plan._sharding import per_gpu

    with pytest.raises(UsageError, match=r"^--quant int8 contradicts --method full"):
        vramplan.estimate("llama-2-7b", quant="int8", method="full")
    with pytest.raises(UsageError, match=r"^--quant nf4 contradicts --method full"):
        vramplan.estimate("llama-2-7b", quant="nf4", method="full")
    with pytest.raises(UsageError, match=r"^--rank 8 contradicts --method full"):
        vramplan.plan("llama-2-7b", gpu="80GB", method="full", rank=8)
    with pytest.raises(UsageError, match=r"^--rank 8 contradicts --method full"):
        per_gpu("llama-2-7b", gpus=2, method="full", rank=8)
    # a setup may carry unused defaults: switching its method is not a contradiction
    assert TrainSetup(rank=8).with_(method="full").method == "full"
    assert vramplan.estimate("llama-2-7b", method="full").setup.to_dict()["quant"] is None


# --- 5. one `model` object in every JSON ----------------------------------------------------------

def _model_keys() -> set:
    return set(spec_from_config(FULL_LLAMA, "m", "test").to_dict())


def test_estimate_and_plan_json_share_the_model_object(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--json")
    estimate_model = json.loads(out)["model"]
    assert code == 0 and set(estimate_model) == _model_keys()
    code, out, _ = run(capsys, "plan", "llama-2-7b", "--gpu", "24GB", "--json", "--no-recommend")
    data = json.loads(out)
    assert code == 0
    assert data["model"] == estimate_model == data["estimate"]["model"]
    code, out, _ = run(capsys, "plan", "llama-2-70b", "--gpu", "80GB", "--gpus", "2", "--strategy", "fsdp",
                       "--json", "--no-recommend")
    assert code == 0 and set(json.loads(out)["estimate"]["model"]) == _model_keys()


@pytest.mark.torch
@pytest.mark.transformers
def test_simulate_json_has_the_same_model_object(tmp_path, capsys):
    config = dict(FULL_LLAMA, hidden_size=64, intermediate_size=128, vocab_size=128)
    path = write_config(tmp_path, config)
    code, out, _ = run(capsys, "estimate", path, "--seq", "16", "--json")
    estimate_model = json.loads(out)["model"]
    code, out, err = run(capsys, "simulate", path, "--seq", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == estimate_model


def test_profile_comparison_json_has_the_same_model_object():
    from test_compare import gpu_shaped

    from vramplan.profile._compare import compare_record

    record = gpu_shaped(1.0)
    d = compare_record(record).to_dict()
    assert set(d["model"]) == _model_keys()
    assert d["model"] == {k: v for k, v in record.to_dict()["model"].items() if k != "config"}


def test_readme_documents_the_model_object():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### The `model` object"):]
    for key in _model_keys():
        assert f"`{key}`" in section, key


# --- 6. verdicts readable without colour ----------------------------------------------------------

def test_plan_grid_cells_carry_text_marks_when_piped():
    out = subprocess.run([sys.executable, "-m", "vramplan.cli", "plan", "llama-2-7b", "--gpu", "24GB",
                          "--grid-batch", "1,11", "--grid-seq", "1024,2048,8192",
                          "--no-recommend"], capture_output=True, text=True, cwd=ROOT).stdout
    assert "\x1b[" not in out  # no terminal, no colour codes: the marks carry the verdict
    grid = out[out.index("GiB per GPU"):]
    rows = {line.split("│")[1].strip(): line for line in grid.splitlines() if line.startswith("│")}
    assert rows["1024"].count("✓") == 2 and "✗" in rows["8192"]
    assert re.search(r"\d ~ ", rows["2048"]), grid  # batch 11 x seq 2048 leaves under 5% of the card
    assert "✓ fits, ~ tight (under 5% of the GPU left), ✗ does not fit" in " ".join(grid.split())


# --- 7. tables at 80 columns -----------------------------------------------------------------------

def assert_whole_at_80(out: str, boxed: bool = True) -> None:
    """No cell cut (…), no line past 80 columns, and no boxed table cropped at the right edge
    (`boxed=False`: a borderless table, such as `vramplan models`, has no edge to check)."""
    lines = out.splitlines()
    assert "…" not in out
    assert max(len(line) for line in lines) <= 80
    box_lines = [line.rstrip() for line in lines if line[:1] in "┏┃┡│├└"]
    assert (bool(box_lines) == boxed) and all(line[-1] in "┓┃┩│┤┘" for line in box_lines), out


@pytest.mark.parametrize("argv", [
    ["estimate", "meta-llama/Llama-3.3-70B-Instruct", "--gpu", "80GB", "--optimizer", "paged_adamw8bit"],
    ["plan", "llama-2-70b", "--gpu", "24GB"],
    ["plan", "llama-2-70b", "--gpu", "all"],
    ["plan", "llama-2-70b", "--gpu", "40GB", "--gpus", "4", "--strategy", "zero3", "--offload", "cpu"],
    ["plan", "llama-2-70b", "--gpu", "80GB", "--gpus", "4", "--strategy", "fsdp"],
    pytest.param(["sweep", "gemma-2-2b", "--gpu", "24GB", "--attn", "sdpa,eager", "--batch", "1,2", "--method",
                  "qlora,lora"], marks=pytest.mark.pandas),
    ["models"],
    ["gpus"],
])
def test_tables_render_whole_at_80_columns(capsys, monkeypatch, argv):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert_whole_at_80(out, boxed=argv[0] != "models")
    for name in ("optimizer_state", "quant_constants", "allocator_overhead"):
        if argv[0] == "estimate":
            assert name in out
    if argv[0] == "models":
        assert all(model_id in out for model_id in catalog())


@pytest.mark.torch
@pytest.mark.transformers
def test_simulate_tables_render_whole_at_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    path = write_config(tmp_path, dict(FULL_LLAMA, hidden_size=64, intermediate_size=128, vocab_size=128))
    code, out, _ = run(capsys, "simulate", path, "--seq", "16")
    assert code == 0
    assert_whole_at_80(out)
    assert "optimizer_state" in out and "quant_constants" in out


def test_profile_detail_table_has_one_unit_per_column():
    from rich.console import Console

    from test_compare import gpu_shaped
    from vramplan.profile._compare import compare_record
    from vramplan.render._profile_tables import detail_table

    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(detail_table(compare_record(gpu_shaped(1.0))))
    out = console.file.getvalue()
    assert_whole_at_80(out)
    assert "allocator_overhead" in out and "gradients + activations +" in out
    lines = out.splitlines()
    header = lines[next(i for i, line in enumerate(lines) if "predicted" in line) + 1]
    assert header.split("┃")[2].strip() == "MiB"  # a tiny model next to a 520 MiB CUDA context: MiB throughout
    body = [line for line in out.splitlines() if line.startswith("│")]
    assert not any(re.search(r"\d (KiB|MiB|GiB)", line) for line in body)
    context = next(line for line in body if line.startswith("│ cuda_context"))
    assert "520.000" in context


def test_profile_summary_table_renders_whole_at_80_columns():
    from dataclasses import replace

    from rich.console import Console

    from test_compare import gpu_shaped
    from vramplan.profile._compare import compare_record
    from vramplan.render._profile_tables import summary_table

    records = [gpu_shaped(1.0), replace(gpu_shaped(1.2), model_ref="meta-llama/Llama-3.3-70B-Instruct")]
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(summary_table([compare_record(r) for r in records]))
    out = console.file.getvalue()
    assert_whole_at_80(out)
    assert "+20.0%" in out and "qlora-nf4+dq b1 s64 gc adamw" in out


# --- 8. importing the Trainer callback is quiet -----------------------------------------------------

@pytest.mark.transformers
def test_importing_memory_callback_prints_nothing():
    done = subprocess.run([sys.executable, "-c", "from vramplan.integrations import MemoryCallback"],
                          capture_output=True, text=True, cwd=ROOT)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.transformers
def test_only_the_bitsandbytes_kernels_warning_is_dropped(caplog):
    """The warning appears only on CPUs with AVX512-BF16 and no `kernels` package, so the record
    bitsandbytes logs (backends/cpu/ops.py) is replayed here on its logger."""
    import vramplan.integrations  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    # (simulate's require_packages raises the "bitsandbytes" logger to ERROR: set this one explicitly)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
