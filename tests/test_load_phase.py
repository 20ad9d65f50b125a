"""The load phase (estimate/_load.py): a 4-bit weight quantized as it loads, prepare_model_for_kbit_training's
casts and qlora.py's recast, in the order worked out by hand from the sources the module cites; the
estimate's load held to the allocator snapshots of real runs on an H200."""
from dataclasses import replace
from pathlib import Path

import pytest

from vramplan.cuda._alloc_conf import AllocConf
from vramplan.cuda._allocator import SMALL_BUFFER, CachingAllocator
from vramplan.cuda._arch import target_arch
from vramplan.cuda._snapshot import _gunzip, _unpickle
from vramplan.estimate import _events
from vramplan.estimate._inventory import static_memory
from vramplan.estimate._load import LoadSettings, LoadTensor, casts, load_ops
from vramplan.core._setup import make_setup
from vramplan.profile._compare import record_load, setup_from_record, spec_from_record
from vramplan.profile._store import read_record

# embed_tokens and an untied lm_head of 1,024 elements, a norm of 256, a packed weight, one LoRA
# tensor of 256 elements, the batch. 16-bit copies: 2,048 and 512 B; float32: 4,096 and 1,024 B.
TENSORS = [LoadTensor("embed", "embed", 1024, 2048), LoadTensor("head", "head", 1024, 2048),
           LoadTensor("norm", "upcast", 256, 1024), LoadTensor("w", "weight", 0, 5120),
           LoadTensor("a", "adapter", 256, 512), LoadTensor("x", "later", 0, 512)]


CASTS = LoadSettings(load_bytes=2, double_quant=True, casts=True, recast=True)
# a 4-bit weight of 65,536 elements (1,024 blocks of 64): 32 KiB packed; with double quantization
# its uint8 absmax (1,024 B), the nested float32 absmax (16 B -> 512), code copy, offset, code book
PACKED = [LoadTensor("q", "packed", 65536, 32768), LoadTensor("qa", "constant", 0, 1024),
          LoadTensor("qb", "constant", 0, 512), LoadTensor("qc", "constant", 0, 1024),
          LoadTensor("qd", "constant", 0, 512), LoadTensor("qe", "constant", 0, 512)]


def test_a_4bit_weight_is_quantized_as_it_loads_worked_by_hand():
    """Params4bit._quantize: the weight in the load dtype (65,536 x 2 B), quantize_4bit's float32
    absmax (1,024 x 4 B) before the packed weight, `_absmax - offset` (4 KiB), the constants; then
    `_absmax - offset`, the float32 absmax and the load-dtype weight go."""
    ops = load_ops(PACKED + [LoadTensor("x", "later", 0, 512)], CASTS)
    assert ops == [("alloc", ("copy", "q", 2), 131072), ("alloc", ("absmax", "q"), 4096), ("alloc", "q", 32768),
                   ("alloc", ("absmax - offset", "q"), 4096),
                   ("alloc", "qa", 1024), ("alloc", "qb", 512), ("alloc", "qc", 1024), ("alloc", "qd", 512),
                   ("alloc", "qe", 512),
                   ("free", ("absmax - offset", "q")), ("free", ("absmax", "q")), ("free", ("copy", "q", 2)),
                   ("alloc", "x", 512)]
    # without double quantization the float32 absmax is the kept one, made before the packed weight
    plain = [PACKED[0], LoadTensor("absmax", "constant", 0, 4096), LoadTensor("code", "constant", 0, 512)]
    assert load_ops(plain, LoadSettings(2, False, False, False)) == [
        ("alloc", ("copy", "q", 2), 131072), ("alloc", "absmax", 4096), ("alloc", "q", 32768),
        ("alloc", "code", 512), ("free", ("copy", "q", 2))]


def test_an_int8_weight_is_quantized_as_it_loads_worked_by_hand():
    """Int8Params._quantize: the weight copied to the device in float16 whatever the load dtype
    (a 256 x 256 weight: 131,072 B), int8_vectorwise_quant's float32 row scales (256 x 4 B: 1,024)
    before the int8 weight (65,536 B), then the float16 copy goes."""
    weight = [LoadTensor("w8", "int8", 65536, 65536), LoadTensor("scb", "constant", 0, 1024)]
    for settings in (CASTS, LoadSettings(4, False, False, False)):
        assert load_ops(weight + [LoadTensor("x", "later", 0, 512)], settings) == [
            ("alloc", ("copy", "w8", 2), 131072), ("alloc", "scb", 1024), ("alloc", "w8", 65536),
            ("free", ("copy", "w8", 2)), ("alloc", "x", 512)]


def test_load_with_recast_worked_by_hand():
    """from_pretrained (16-bit copies, the packed weight); prepare_model_for_kbit_training in
    model.parameters() order (embed_tokens first, lm_head last: the norm between them although
    listed after the head), each float32 copy made before its 16-bit one goes, then empty_cache;
    get_peft_model's float32 LoRA; the recast in named_modules() order (embed_tokens, the LoRA
    layers, lm_head), each bf16 tensor made before its float32 one goes; the batch."""
    c = lambda key, n: ("copy", key, n)  # noqa: E731
    assert load_ops(TENSORS, CASTS) == [
        ("alloc", c("embed", 2), 2048), ("alloc", c("head", 2), 2048), ("alloc", c("norm", 2), 512),
        ("alloc", "w", 5120),
        ("alloc", c("embed", 4), 4096), ("free", c("embed", 2)),
        ("alloc", "norm", 1024), ("free", c("norm", 2)),
        ("alloc", c("head", 4), 4096), ("free", c("head", 2)),
        ("empty_cache",),
        ("alloc", c("a", 4), 1024),
        ("alloc", "embed", 2048), ("free", c("embed", 4)),
        ("alloc", "a", 512), ("free", c("a", 4)),
        ("alloc", "head", 2048), ("free", c("head", 4)),
        ("alloc", "x", 512)]


def test_load_without_recast_keeps_the_float32_copies():
    fp32 = [replace(t, nbytes=4096) if t.role in ("embed", "head") else
            replace(t, nbytes=1024) if t.role == "adapter" else t for t in TENSORS]
    ops = load_ops(fp32, LoadSettings(2, False, True, False))
    assert ops[4:11] == [("alloc", "embed", 4096), ("free", ("copy", "embed", 2)),
                         ("alloc", "norm", 1024), ("free", ("copy", "norm", 2)),
                         ("alloc", "head", 4096), ("free", ("copy", "head", 2)), ("empty_cache",)]
    assert ops[11:] == [("alloc", "a", 1024), ("alloc", "x", 512)]


@pytest.mark.parametrize("settings", [CASTS, LoadSettings(2, True, True, False), LoadSettings(2, True, False, False),
                                      LoadSettings(4, False, False, False)])
def test_every_tensor_ends_as_it_stays_and_no_copy_outlives_the_load(settings):
    live = {}
    for op in load_ops(TENSORS + PACKED, settings):
        if op[0] == "alloc":
            assert op[1] not in live
            live[op[1]] = op[2]
        elif op[0] == "free":
            del live[op[1]]
    assert live == {t.key: t.nbytes for t in TENSORS + PACKED}


def test_casts_only_where_something_is_cast_and_the_load_is_modelled():
    from vramplan.core._models import resolve
    llama, setup = resolve("meta-llama/Meta-Llama-3-8B"), make_setup("qlora-paper")
    assert casts(llama, setup)
    assert not casts(llama, setup.with_(prepare_kbit=False, recast=False))
    assert not casts(llama, setup.with_(dtype="fp32", amp="none", recast=False))
    assert not casts(resolve("google/gemma-3-12b-pt"), setup)                  # a vision tower
    assert not casts(resolve("Qwen/Qwen3-30B-A3B"), setup.with_(recast=False))  # MoE experts


SNAPSHOTS = sorted((Path(__file__).resolve().parents[1] / "profiles").rglob("*.snapshot.pickle.gz"))


def _real_load(snapshot: Path) -> tuple[int, int]:
    """(peak reserved during the load, reserved when the first forward starts): the allocator's
    own segment events up to the first forward's embedding lookup."""
    snap = _unpickle(_gunzip(snapshot.read_bytes(), snapshot.name, 1 << 31), snapshot.name)
    reserved = peak = 0
    for e in snap["device_traces"][0]:
        names = [f.get("name") for f in e.get("frames") or ()]
        if e["action"] == "alloc" and names[:2] == ["embedding", "forward"]:
            return peak, reserved
        reserved += {"segment_alloc": e["size"], "segment_free": -e["size"]}.get(e["action"], 0)
        peak = max(peak, reserved)
    raise AssertionError("the snapshot has no forward")


def _estimated_load(record) -> tuple[int, int]:
    spec, setup = spec_from_record(record.model), setup_from_record(record.setup)
    static = replace(static_memory(spec, setup), **record_load(record.run, spec, setup))
    program = _events.compiled(spec, setup, static, target_arch(None, None), exact_layers=None)
    stream = program.stream(program.sizes(setup), False)
    first = next(i for i, phase, _m in stream.places if phase != "load")
    allocator, held, peak = CachingAllocator(AllocConf.parse("")), {}, 0
    for e in stream.events[:first]:
        if e[0] == "alloc":
            held[e[1]] = allocator.malloc(e[2])
        elif e[0] == "free":
            allocator.free(held.pop(e[1]))
        else:
            allocator.empty_cache()
        peak = max(peak, allocator.total_reserved)
    return peak, allocator.total_reserved


@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=[p.name.split("_cuda_")[0] + p.name[-25:-19] for p in SNAPSHOTS])
def test_estimated_load_matches_the_h200_snapshots(snapshot):
    """The estimate's load phase against the allocator's own history of real runs on an H200: the
    reserved bytes when the first forward starts and the load's peak, each within one small-pool
    segment (measured: every large-pool segment the same, one 2 MiB small-pool segment more in the
    estimate, in every run but qlora-paper's, whose end agrees to the byte). Without each 4-bit weight's load-dtype copy
    and quantize_4bit's float32 absmax the estimate ended 134 MiB under on Llama-3-8B, 114 MiB on
    Qwen3-8B, 18 MiB on Gemma-3-1B: the cached segments of the 112 MiB MLP copies. Under
    qlora-paper (Meta-Llama-3-8B, paged_adamw) the allocator holds 9,598,664,704 B when the first
    forward starts: the float32 embeddings' and lm_head's segments the recast left cached, and the
    LoRA layers' 20 MiB segments half free after their bf16 copies; without
    prepare_model_for_kbit_training's load the estimate held 3,382 MiB less. Its load peaks at
    10,047,455,232 B, both float32 copies beside their 16-bit ones before empty_cache. One
    snapshot's history starts after its load; it is skipped."""
    record = read_record(snapshot.with_name(snapshot.name.removesuffix(".snapshot.pickle.gz") + ".json"))
    real_peak, real_end = _real_load(snapshot)
    if not real_end:
        pytest.skip("the allocator history starts after the load")
    est_peak, est_end = _estimated_load(record)
    assert abs(est_end - real_end) <= SMALL_BUFFER
    assert abs(est_peak - real_peak) <= SMALL_BUFFER


def test_a_card_too_small_for_the_load_alone_is_told_so():
    """Llama-3-8B under qlora-paper at 1 x 512 on a 9 GB card (8.38 GiB): the step's peak allocated
    (7.02 GiB) and the context fit, but prepare_model_for_kbit_training's float32 lm_head (a
    2,101,346,304 B request) is made while 6.29 GiB are allocated, the float32 embeddings and the
    16-bit lm_head among them. That is out of memory in the load, not fragmentation."""
    from vramplan.core._gpus import resolve_gpu
    from vramplan.core._models import resolve
    from vramplan.estimate._estimator import estimate
    from vramplan.render._tables import verdict

    est = estimate(resolve("meta-llama/Meta-Llama-3-8B"), make_setup("qlora-paper", seq=512), gpu=resolve_gpu("9GB"))
    oom = est.allocator_oom
    assert (est.status, oom["phase"], oom["nbytes"], oom["fragmentation"]) == ("no", "load", 2_101_346_304, False)
    assert oom["allocated_bytes"] + oom["nbytes"] > 9_000_000_000 - est.cuda_context_bytes > est.peak_allocated_bytes
    assert "the load runs out of memory (a 1.96 GiB request with 6.29 GiB allocated" in verdict(est)


@pytest.mark.parametrize("model", ["google/gemma-3-4b-pt", "google/gemma-3-12b-pt"])
@pytest.mark.parametrize("flags", [{}, {"method": "lora"}, {"double_quant": False}, {"quant": "int8"}])
def test_the_vision_tower_lists_every_parameter_once(model, flags):
    """estimate/_inventory.py vision_tensors, the one list the load and the inventory both read:
    every parameter of the SigLIP tower and projector once (VisionTower.num_params, counted from
    the shapes), each tensor rounded to 512 B on its own, plus the int64 position_ids buffer; under
    4-bit quantization each Linear weight packed two to a byte, with its constants after it."""
    from vramplan.core._components import Component
    from vramplan.core._models import resolve
    from vramplan.core._setup import TrainSetup
    from vramplan.estimate._inventory import vision_static, vision_tensors

    spec, setup = resolve(model), TrainSetup(**flags)
    v, listed = spec.vision, vision_tensors(spec, setup)
    W, Q = Component.WEIGHTS.value, Component.QUANT_CONSTANTS.value
    linears = sum(linear.numel for linear in v.linears) * v.layers
    packed = [(count, n) for _c, role, count, n in listed if role == "packed"]
    rest = 2 * (v.num_params - linears) + 8 * v.positions    # every other tensor, unrounded
    if setup.quantized and setup.quant != "int8":
        assert sum(count for count, _n in packed) == linears
        assert all(n == -(-count // 2 // 512) * 512 for count, n in packed)
        others = sum(n for c, role, _count, n in listed if c == W and role != "packed")
        assert rest <= others <= rest + 512 * len(listed)
        assert any(c == Q for c, *_ in listed)
    elif setup.quantized:   # int8: Linear8bitLt's int8 weight and its SCB, loaded as they are
        assert not packed and any(c == Q for c, *_ in listed)
    else:
        assert not packed and not any(c == Q for c, *_ in listed)
        total = sum(n for *_, n in listed)
        assert 2 * linears + rest <= total <= 2 * linears + rest + 512 * len(listed)
    vis = vision_static(spec, setup)
    assert (sum(vis.weights), sum(vis.quant_constants)) == (sum(n for c, *_, n in listed if c == W),
                                                            sum(n for c, *_, n in listed if c == Q))
