"""`vramplan models`: whole ids at 80 columns, a filter, and what each family supports."""
from __future__ import annotations

import json

import pytest

from vramplan.cli import main
from vramplan.core._architectures import ARCHITECTURES
from vramplan.core._models import catalog, spec_from_config


def run(capsys, monkeypatch, *argv, columns=80):
    monkeypatch.setenv("COLUMNS", str(columns))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_filtered_listing_pinned_at_80_columns(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "models", "MIXTRAL")
    assert (code, err) == (0, "")
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines == [
        "Bundled model catalog, by model_type",
        "id                          params layers hidden kv vocab",
        "mixtral:",
        "mistralai/Mixtral-8x7B-v0.1 46.70B     32   4096  8 32000",
        "Families: what each supports",
        "type    methods                     attention   MoE experts",
        "mixtral estimate, simulate, profile sdpa, eager fused 3-D stacks, 16-bit under",
        "                                                4-bit quantization in",
        "                                                transformers 5; LoRA through",
        "                                                ParamWrapper; --experts 4bit for",
        "                                                stacks that quantize them",
        "simulate and profile also run model types not listed here: transformers builds",
        "them from config.json.",
    ]


def test_full_listing_never_cuts_an_id(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "models")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    table = out.split("Families: what each supports", 1)[0].splitlines()[2:]
    listed, family = {}, None
    for line in table:
        first = line.split()[0]
        if first.endswith(":"):
            family = first[:-1]
        else:
            listed[first] = family
    # every id, whole, under its own model_type
    assert listed == {i: spec_from_config(e.config, e.id, e.source).model_type for i, e in catalog().items()}
    assert "…" not in out


def test_filter_matches_id_alias_and_type_in_any_case(capsys, monkeypatch):
    def ids(query):
        code, out, _ = run(capsys, monkeypatch, "models", query, "--json")
        assert code == 0
        return [m["id"] for m in json.loads(out)]

    qwen = ids("QWEN")
    assert qwen and all("qwen" in i.lower() for i in qwen)
    by_type = ids("phi3")
    assert by_type == [e.id for e in catalog().values() if e.config["model_type"] == "phi3"]
    entry = next(e for e in catalog().values() if e.aliases)
    alias = entry.aliases[0]
    assert entry.id in ids(alias.upper())


def test_families_come_from_the_registry(capsys, monkeypatch):
    code, out, _ = run(capsys, monkeypatch, "models", "--json")
    families = {m["model_type"]: m["family"] for m in json.loads(out)}
    # the family is the decoder's type: a multimodal gemma3 config is read through its text_config
    types = {spec_from_config(e.config, e.id, e.source).model_type for e in catalog().values()}
    assert set(families) == types
    for name, family in families.items():
        arch = ARCHITECTURES[name]
        assert family["attention"] == list(arch.attention)
        assert bool(family["moe"]) == arch.moe
    assert families["gemma2"]["attention"] == ["eager"]


def test_a_family_listed_in_the_registry_shows_up(capsys, monkeypatch):
    from vramplan.core._architectures import Architecture

    monkeypatch.setitem(ARCHITECTURES, "zz-moe-test", Architecture("zz-moe-test", {}, moe=True, attention=("eager",)))
    code, out, _ = run(capsys, monkeypatch, "models", "zz-moe")
    assert code == 0 and "Bundled model catalog" not in out      # no bundled model of that type
    row = next(line for line in out.splitlines() if line.startswith("zz-moe-test"))
    assert row.split()[1:5] == ["estimate,", "simulate,", "profile", "eager"]
    assert "fused 3-D stacks" in row


def test_no_match_is_one_line_error(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "models", "no-such-thing")
    assert (code, out) == (1, "")
    assert err == ("Error: no bundled model or family matches 'no-such-thing' (hint: `vramplan models` lists them "
                   "all; any hub id or config.json also works)\n")


@pytest.mark.parametrize("columns", [60, 200])
def test_ids_stay_whole_at_other_widths(capsys, monkeypatch, columns):
    code, out, _ = run(capsys, monkeypatch, "models", columns=columns)
    assert code == 0
    for model_id in catalog():
        assert model_id in out


def test_gpt_oss_family_row_says_eager_and_unadapted_experts(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, "models", "gpt-oss")
    assert (code, err) == (0, "")
    rows = out.split("Families: what each supports", 1)[1]
    assert "gpt_oss estimate, simulate, profile eager" in rows
    words = " ".join(rows.split())
    assert "frozen under all-linear" in words and "ParamWrapper" not in words and "--experts 4bit" not in words
