"""The CUDA facts of vramplan/cuda/, one home per fact, per GPU architecture (issue #11).

Expected values are worked out by hand from docs/cuda-kernels.md (the sdp_utils.cpp checks, the
flash/mem-efficient workspaces, the cuBLAS workspace) and docs/gpus.md; the gemm_4bit port is
checked against the installed bitsandbytes function itself."""
import ast
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._gpus import catalog, resolve_gpu
from vramplan.cuda import _cublas as cublas, _sdpa as sdpa
from vramplan.cuda._arch import ASSUMED, CudaArch, check_dtype, default_dtype, parse_arch, target_arch
from vramplan.cuda._gemm_4bit import gemm_4bit_uses_fused_kernel

SM70, SM75, SM80, SM86, SM89, SM90 = (parse_arch(a) for a in ("sm70", "sm75", "sm80", "sm86", "sm89", "sm90"))
SM120 = parse_arch("sm120")


def call(dtype="bf16", hd=128, heads=32, kv=8, mask=False, gqa=True, grad=True, dropout=0.0, seq=4096):
    return sdpa.SdpaCall(dtype=dtype, head_dim=hd, head_dim_v=hd, heads=heads, kv_heads=kv, seq_q=seq, seq_k=seq,
                         has_mask=mask, is_causal=not mask, enable_gqa=gqa, requires_grad=grad, dropout=dropout)


# --- SDPA dispatch per architecture -----------------------------------------------------------------

@pytest.mark.parametrize("arch, c, expected", [
    # sm80+: 16-bit, no mask, GQA with enable_gqa -> flash
    (SM80, call("bf16"), "flash"),
    (SM90, call("fp16"), "flash"),
    (SM86, call("bf16"), "flash"),
    # a mask: flash refuses; transformers repeated k/v, so equal heads -> efficient
    (SM90, call("bf16", kv=32, mask=True, gqa=False), "efficient"),
    # fp32 (prepare_kbit): flash refuses; efficient on equal heads with hd % 4 == 0 on sm80+
    (SM80, call("fp32", kv=32), "efficient"),
    (SM80, call("fp32", hd=66, kv=32), "math"),          # 66 % 4 != 0
    # T4 / V100: no flash; efficient takes fp16/fp32, not bf16, and needs equal head counts
    (SM75, call("fp16", kv=32), "efficient"),
    (SM75, call("fp16"), "math"),                         # GQA
    (SM75, call("bf16", kv=32), "math"),                  # bf16 below sm80
    (SM70, call("fp16", hd=68, kv=32), "math"),           # 68 % 8 != 0 (tensor cores for fp16)
    (SM70, call("fp32", hd=66, kv=32), "efficient"),      # fp32 below sm80: alignment 1
    # head dims: no multiple-of-8 rule for flash (padded); > 256 refused
    (SM90, call("bf16", hd=36), "flash"),
    # flash refuses hd > 256; mem-efficient has no head-dim cap in sdp_utils.cpp, only alignment
    (SM90, call("bf16", hd=320, kv=32), "efficient"),
    # sm86/sm89/sm120 in training: hd in (192, 224] refused, > 224 only without dropout
    (SM86, call("bf16", hd=200, kv=32), "efficient"),
    (SM80, call("bf16", hd=200, kv=32), "flash"),
    (SM89, call("bf16", hd=256), "flash"),
    (SM89, call("bf16", hd=256, kv=32, dropout=0.1), "efficient"),
    (SM120, call("bf16", hd=208, kv=32), "efficient"),
    (SM86, call("bf16", hd=200, kv=32, grad=False), "flash"),   # inference: no such limit
])
def test_sdpa_dispatch_per_arch(arch, c, expected):
    assert sdpa.backend(arch, c) == expected


def test_efficient_alignment_per_arch():
    # minimum_gemm_alignment: 128 bits with tensor cores, at least 4 on sm80+
    assert sdpa.efficient_alignment(SM80, "bf16") == 8 and sdpa.efficient_alignment(SM80, "fp32") == 4
    assert sdpa.efficient_alignment(SM75, "fp16") == 8 and sdpa.efficient_alignment(SM75, "fp32") == 1
    assert sdpa.efficient_alignment(CudaArch(6, 1, 28, "P40"), "fp16") == 1


@pytest.mark.parametrize("hd, rounded", [(64, 64), (80, 96), (96, 96), (128, 128), (160, 192), (200, 256),
                                         (256, 256)])
def test_flash_dq_accum_head_dim_rounding(hd, rounded):
    # flash_api.cpp: round to 32 up to 128, to 64 above
    (softmax_d, e1), (dq_accum, e2) = sdpa.flash_backward_workspace(2, 8, 1000, hd)
    assert softmax_d == (2, 8, 1024) and dq_accum == (2, 1024, 8, rounded) and e1 == e2 == 4


def test_efficient_backward_workspace_counts_delta_and_dq_accumulator():
    b, H, s, d = 2, 8, 1000, 64
    parts = sdpa.efficient_backward_workspace(b, H, s, d)
    assert sum(sdpa.nbytes(*p) for p in parts) == 4 * b * H * s + 4 * b * H * s * d
    assert sdpa.efficient_logsumexp(b, H, 1000) == ((b, H, 1024), 4)


def test_cublas_workspace_per_arch():
    assert cublas.workspace_bytes(SM90) == 32 * 2**20
    # a training step keeps two (the H200 snapshots hold two 32 MiB workspace blocks at the end)
    assert cublas.step_workspace_bytes(SM90) == 64 * 2**20
    for arch in (SM70, SM75, SM80, SM86, SM89):
        assert cublas.workspace_bytes(arch) == 4096 * 1024 * 2 + 16 * 1024 * 8 == 8_519_680


# --- architecture, dtype and the catalog -----------------------------------------------------------

@pytest.mark.parametrize("text", ["sm75", "SM_75", "7.5", "75"])
def test_parse_arch_spellings(text):
    assert (parse_arch(text).major, parse_arch(text).minor) == (7, 5)


def test_parse_arch_rejects_unknown():
    with pytest.raises(UsageError, match="unknown --arch 'sm99'"):
        parse_arch("sm99")


def test_target_arch_comes_from_the_catalog_or_is_assumed():
    assert target_arch(None) is ASSUMED and ASSUMED.label == "sm90"
    assert target_arch(resolve_gpu("24GB")) is ASSUMED
    assert target_arch(resolve_gpu("24GB"), "sm75").label == "sm75"
    assert target_arch(resolve_gpu("T4")).label == "sm75"
    assert target_arch(resolve_gpu("T4"), "sm75").label == "sm75"
    with pytest.raises(UsageError, match="contradicts"):
        target_arch(resolve_gpu("T4"), "sm90")


@pytest.mark.parametrize("name, cc", [("T4", "7.5"), ("V100-16GB", "7.0"), ("A10", "8.6"), ("A10G", "8.6"),
                                      ("RTX3090", "8.6"), ("A6000", "8.6"), ("A100-80GB", "8.0"), ("L4", "8.9"),
                                      ("RTX4090", "8.9"), ("L40S", "8.9"), ("H100", "9.0"), ("H200", "9.0"),
                                      ("RTX5090", "12.0"), ("rtx6000-ada", "8.9")])
def test_catalog_compute_capability(name, cc):
    assert resolve_gpu(name).compute_capability == cc


def test_every_catalog_gpu_has_an_architecture():
    for gpu in catalog():
        assert gpu.cuda is not None and gpu.sms > 0, gpu.name


def test_rtx6000_ada_is_not_an_a6000():
    assert resolve_gpu("rtx6000-ada").name != resolve_gpu("A6000").name


def test_dtype_rule():
    assert default_dtype(SM75) == "fp16" and default_dtype(SM80) == "bf16"
    check_dtype(SM75, "fp16")
    with pytest.raises(UsageError, match="no bf16 hardware"):
        check_dtype(SM70, "bf16")


# --- bitsandbytes gemm_4bit: the port against the installed function ------------------------------

def _bnb_rule():
    """bitsandbytes' own _gemm_4bit_use_custom_cuda, compiled from its installed source with the
    device query replaced (its module needs a CUDA torch to import)."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:
        pytest.skip("bitsandbytes not installed")
    import torch

    src = (Path(spec.submodule_search_locations[0]) / "backends" / "cuda" / "ops.py").read_text()
    fn = next(n for n in ast.parse(src).body
              if isinstance(n, ast.FunctionDef) and n.name == "_gemm_4bit_use_custom_cuda")
    fn.decorator_list = []
    floor = next(n.value.value for n in ast.parse(src).body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "_GEMM_4BIT_CUSTOM_FLOOR_M")
    ns = {"torch": torch, "_GEMM_4BIT_CUSTOM_FLOOR_M": floor}
    exec(compile(ast.Module([fn], []), "bitsandbytes/backends/cuda/ops.py", "exec"), ns)
    return ns, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def test_gemm_4bit_port_matches_bitsandbytes_on_every_arch():
    ns, dtypes = _bnb_rule()
    rng = random.Random(11)
    archs = [(7, 0, 80), (7, 5, 40), (8, 0, 108), (8, 6, 72), (8, 6, 28), (8, 7, 16), (8, 9, 58), (8, 9, 142),
             (9, 0, 132), (9, 0, 114), (10, 0, 148), (11, 0, 20), (12, 0, 170), (12, 1, 48)]
    sizes = [64, 256, 512, 1024, 2048, 2560, 3072, 4096, 5120, 8192, 11008, 12288, 14336, 128256]
    for major, minor, sms in archs:
        ns["_gpu_dispatch_props"] = lambda _i, p=(sms, major, minor): p
        arch = CudaArch(major, minor, sms, "test")
        for _ in range(1500):
            M = rng.randint(5, 1536)
            N = rng.choice(sizes + [64 * rng.randint(1, 300)])
            K = rng.choice(sizes + [64 * rng.randint(1, 300)])
            dt = rng.choice(list(dtypes))
            ours = gemm_4bit_uses_fused_kernel(M, N, K, dt, arch)
            theirs = ns["_gemm_4bit_use_custom_cuda"](0, dtypes[dt], M, N, K)
            assert ours == theirs, (major, minor, sms, M, N, K, dt)


def test_gemm_4bit_per_arch_examples():
    # sm75 fp16 large weight, M in [8, 512]: >= 3 waves K < N -> 128, else 64 / 32 by wave
    assert gemm_4bit_uses_fused_kernel(128, 14336, 4096, "fp16", SM75)       # 224 blocks >= 120
    assert not gemm_4bit_uses_fused_kernel(129, 14336, 4096, "fp16", SM75)
    assert not gemm_4bit_uses_fused_kernel(9, 14336, 4096, "bf16", SM75)    # bf16 on sm75: M < 8 only
    # sm90 (132 SMs): 224 blocks >= 1 wave -> 32; 128 blocks, half to one wave, K < N -> 16
    assert gemm_4bit_uses_fused_kernel(32, 14336, 4096, "bf16", SM90) and \
        not gemm_4bit_uses_fused_kernel(33, 14336, 4096, "bf16", SM90)
    assert gemm_4bit_uses_fused_kernel(16, 8192, 4096, "bf16", SM90) and \
        not gemm_4bit_uses_fused_kernel(17, 8192, 4096, "bf16", SM90)


# --- the vramplan/cuda package stays torch-free ----------------------------------------------------

def test_cuda_package_imports_no_torch():
    code = ("import sys, vramplan.cuda._arch, vramplan.cuda._sdpa, vramplan.cuda._cublas, vramplan.cuda._gemm_4bit, "
            "vramplan.cuda._context; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- the estimate per GPU ---------------------------------------------------------------------------

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_t4_and_h100_differ_where_the_kernels_differ(capsys):
    base = ("estimate", "llama-3-8b", "--seq", "4096", "--dtype", "fp16", "--json")
    _, t4_out, _ = run(capsys, *base, "--gpu", "T4")
    _, h100_out, _ = run(capsys, *base, "--gpu", "H100")
    t4, h100 = json.loads(t4_out), json.loads(h100_out)
    assert t4["kernels"]["sdpa"].startswith("math") and h100["kernels"]["sdpa"].startswith("flash")
    assert t4["kernels"]["gpu_arch"]["compute_capability"] == "7.5"
    assert h100["kernels"]["cublas_workspace_bytes"] == 32 * 2**20
    assert t4["kernels"]["cublas_workspace_bytes"] == 8_519_680
    # the math fallback materializes float32 scores: 32 heads x 4096^2 x 4 B = 2 GiB per tensor
    from vramplan import estimate

    layer = {gpu: estimate("llama-3-8b", gpu=gpu, seq=4096, dtype="fp16").moments["backward.top_layer"]
             for gpu in ("T4", "H100")}
    assert layer["T4"]["activations"] - layer["H100"]["activations"] > 2 * 32 * 4096 * 4096 * 4
    assert any("math fallback on sm75" in a for a in t4["assumptions"])
    assert any("flash-attention" in a for a in h100["assumptions"])
    assert any("gemm_4bit on sm75" in a for a in t4["assumptions"])


def test_t4_without_dtype_trains_in_fp16_and_says_so(capsys):
    code, out, _ = run(capsys, "estimate", "llama-3-8b", "--gpu", "T4", "--json")
    data = json.loads(out)
    assert code == 0 and data["setup"]["dtype"] == "fp16"
    assert "compute dtype fp16: T4 (sm75) has no bf16 hardware" in data["assumptions"]


def test_bf16_on_t4_is_refused(capsys):
    code, _, err = run(capsys, "estimate", "llama-3-8b", "--gpu", "T4", "--dtype", "bf16")
    assert code == 2
    assert err.strip() == ("Error: T4 (sm75) has no bf16 hardware; bf16 training is not planned there "
                           "(hint: use --dtype fp16 (or dtype='fp16'))")


def test_bf16_under_arch_names_the_compute_capability_not_its_representative_card(capsys):
    # --arch sm75 with a bare size borrows the T4's SM count; the refusal is about every sm75 GPU
    code, _, err = run(capsys, "estimate", "llama-3-8b", "--gpu", "24GB", "--arch", "sm75", "--dtype", "bf16")
    assert code == 2
    assert err.strip() == ("Error: an sm75 GPU has no bf16 hardware; bf16 training is not planned there "
                           "(hint: use --dtype fp16 (or dtype='fp16'))")
    _, out, _ = run(capsys, "estimate", "llama-3-8b", "--gpu", "24GB", "--arch", "sm75", "--json")
    assert "compute dtype fp16: an sm75 GPU has no bf16 hardware" in json.loads(out)["assumptions"]


@pytest.mark.parametrize("flags, amp", [
    (("--dtype", "fp32", "--amp", "bf16", "--method", "lora"), "--amp bf16"),
    (("--recipe", "trainer", "--dtype", "fp32", "--method", "lora"), "--amp bf16 (--recipe trainer's)"),
])
@pytest.mark.parametrize("command", ["estimate", "plan", "simulate"])
def test_bf16_autocast_below_sm80_is_refused_as_bf16_weights_are(capsys, command, flags, amp):
    code, _, err = run(capsys, command, "llama-3-8b", "--gpu", "T4", *flags)
    assert code == 2
    assert err.strip() == (f"Error: T4 (sm75) has no bf16 hardware; {amp} is not planned there "
                           "(hint: use --amp fp16 (or amp='fp16'))")


def test_bare_size_states_the_assumed_arch_and_arch_flag_sets_it(capsys):
    _, out, _ = run(capsys, "estimate", "llama-3-8b", "--gpu", "16GB", "--json")
    data = json.loads(out)
    assert data["kernels"]["gpu_arch"]["compute_capability"] == "9.0"
    assert data["assumptions"][0].startswith("CUDA kernels assumed of an H100 SXM")
    _, out, _ = run(capsys, "estimate", "llama-3-8b", "--gpu", "16GB", "--arch", "sm75", "--json")
    data = json.loads(out)
    assert data["kernels"]["gpu_arch"]["compute_capability"] == "7.5" and data["setup"]["dtype"] == "fp16"


def test_arch_contradicting_a_catalog_gpu_is_an_error(capsys):
    code, _, err = run(capsys, "estimate", "llama-3-8b", "--gpu", "T4", "--arch", "sm90")
    assert code == 2 and err.startswith("Error: --arch sm90 contradicts --gpu T4 (sm75)")


def test_library_default_dtype_follows_the_gpu():
    from vramplan import TrainSetup, estimate

    assert estimate("llama-3-8b", gpu="T4").setup.dtype == "fp16"
    assert estimate("llama-3-8b", gpu="A100-80GB").setup.dtype == "bf16"
    with pytest.raises(UsageError, match="no bf16 hardware"):
        estimate("llama-3-8b", TrainSetup(), gpu="V100-16GB")


def test_simulate_cli_emulates_the_gpu_given(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    config = str(Path(__file__).parent / "configs" / "llama-gqa.json")
    code, out, _ = run(capsys, "simulate", config, "--gpu", "T4", "--seq", "256")
    text = " ".join(out.split())
    assert code == 0
    assert "attention kernels: 8 math" in text               # grouped KV heads, fp16, sm75: 8 calls
    assert "CUDA emulated: the kernels of the T4 (compute capability 7.5, 40 SMs)" in text
