"""Predicted peak reserved memory against published measurements (tests/data/published_reserved.csv:
the rows of the published peak-memory table whose metric is torch.cuda.max_memory_reserved, with
their source columns, and the vramplan setup each is modelled as).

Targets (issue #8): median |error| <= 10%, no prediction under by more than 15% (a row that is not
met is a strict xfail naming its gap, KNOWN_GAPS), and the sharded rows within +-10% both ways.
Single-GPU rows use the estimate's two-step allocator replay; FSDP rows (Answer.AI) go through
sharding.per_gpu, which replays one GPU's FSDP wrap phase and steps, each CUDA stream in its own
pool (docs/allocator.md#fsdp-wrap, #fsdp-stream). docs/published-reserved.md holds the table.
"""
from __future__ import annotations

import csv
import statistics
from functools import lru_cache
from pathlib import Path

import pytest

from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.estimate._estimator import estimate
from vramplan.plan._sharding import per_gpu

DATA = Path(__file__).parent / "data" / "published_reserved.csv"
MEDIAN_TARGET, UNDER_TARGET = 0.10, -0.15
SHARDED_TARGET = 0.10


def rows() -> list[dict]:
    with DATA.open() as f:
        return list(csv.DictReader(f))


def predict(row: dict) -> tuple[int, str]:
    """(predicted bytes of the row's quantity, how it was computed)."""
    # vp_lora_dropout: the recipe's LoRA dropout where it is not 0 (Answer.AI's train.py: 0.1)
    setup = TrainSetup(method=row["vp_method"], rank=int(row["vp_rank"]), targets=row["vp_targets"],
                       lora_dropout=float(row["vp_lora_dropout"] or 0), batch=int(row["vp_batch"]),
                       seq=int(row["vp_seq"]), grad_ckpt=row["vp_grad_ckpt"] == "1",
                       optimizer=row["vp_optimizer"], loop=row["vp_loop"])
    spec = resolve(row["vp_model"])
    if row["vp_strategy"] == "single":
        est = estimate(spec, setup, alloc_conf="")
        return est.peak_reserved_bytes, "replay"
    est = per_gpu(spec, setup, gpus=int(row["vp_gpus"]), strategy=row["vp_strategy"])
    return est.reserved_bytes, "per_gpu (FSDP wrap + stream replay)"


def table() -> list[tuple]:
    out = []
    for row in rows():
        pred, how = predict(row)
        measured = float(row["measured_gb"]) * 1e9
        out.append((row["id"], row["vp_model"], row["vp_method"], row["vp_batch"], row["vp_seq"], pred / 1e9,
                    measured / 1e9, pred / measured - 1, how, row["vp_recipe_gap"]))
    return out


def markdown(t: list[tuple]) -> str:
    lines = ["| id | model | method | batch x seq | predicted reserved GB | measured GB | error | model | recipe gap |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for rid, model, method, b, s, pred, meas, err, how, gap in t:
        lines.append(f"| {rid} | {model} | {method} | {b} x {s} | {pred:.2f} | {meas:.2f} | {err:+.1%} | {how} | {gap} |")
    errs = [r[7] for r in t]
    lines.append("")
    lines.append(f"median |error| {statistics.median(abs(e) for e in errs):.1%}, most under {min(errs):+.1%}, "
                 f"most over {max(errs):+.1%} ({len(errs)} rows)")
    return "\n".join(lines)


def test_rows_carry_their_sources():
    for row in rows():
        assert row["source"] and row["metric"] and "reserved" in row["metric"].lower() + row["vp_recipe_gap"].lower()
        assert row["vp_quantity"] == "reserved"


def test_published_reserved_median_error(capsys):
    t = table()
    with capsys.disabled():
        print("\n" + markdown(t))
    assert statistics.median(abs(r[7]) for r in t) <= MEDIAN_TARGET


KNOWN_GAPS = {
    "TT-T1-05": "torchao NF4 (not bitsandbytes) quantizes on the GPU at load and the cache keeps that loading "
                "peak (model-init peak reserved 9.13 GB of the 9.29): torchao's load is not modelled, bitsandbytes' "
                "is (docs/published-reserved.md)",
}


@lru_cache(maxsize=1)
def _errors() -> dict:
    return {r[0]: r[7] for r in table()}


def _ids(keep) -> list:
    return [pytest.param(row["id"], marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[row["id"]]))
            if row["id"] in KNOWN_GAPS else row["id"] for row in rows() if keep(row)]


@pytest.mark.parametrize("rid", _ids(lambda row: True))
def test_published_reserved_nothing_far_under(rid):
    assert _errors()[rid] >= UNDER_TARGET


@pytest.mark.parametrize("rid", _ids(lambda row: row["vp_strategy"] != "single"))
def test_sharded_rows_within_ten_percent_both_ways(rid):
    """Issue #8: the sharded (FSDP) rows within +-10% of the published reserved memory, symmetric."""
    assert abs(_errors()[rid]) <= SHARDED_TARGET
