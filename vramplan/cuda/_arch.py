"""The target GPU's CUDA architecture: compute capability (sm = major.minor) and SM count, the two
properties the kernel rules in vramplan/cuda/ decide on (docs/cuda-kernels.md#summary-table).

A catalog GPU carries its own (vramplan/core/catalog/gpus.toml); a bare size (`--gpu 24GB`) or no
GPU at all gets ASSUMED (an H100 SXM, the GPU vramplan's rules were first written for) unless
`--arch` names one.
"""
from __future__ import annotations


from vramplan.core._errors import UsageError
from vramplan.core._record import record


@record
class CudaArch:
    """The target GPU's compute capability and SM count: what every kernel rule in cuda/ keys on
    (docs/cuda-kernels.md)."""
    major: int
    minor: int
    sms: int          # streaming multiprocessors (torch.cuda.get_device_properties().multi_processor_count)
    name: str         # the GPU the numbers are those of

    @property
    def sm(self) -> int:
        """75 for compute capability 7.5 (the number in `sm_75`)."""
        return self.major * 10 + self.minor

    @property
    def label(self) -> str:
        return f"sm{self.sm}"

    @property
    def bf16(self) -> bool:
        """bf16 tensor-core math exists from sm80 (docs/cuda-kernels.md#bf16-on-sm70-and-sm75)."""
        return self.major >= 8

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.major}.{self.minor}, {self.sms} SMs)"

    def to_dict(self) -> dict:
        return {"name": self.name, "compute_capability": f"{self.major}.{self.minor}", "sms": self.sms,
                "bf16": self.bf16}


# No --gpu, or a bare size: the H100 SXM (sm90, 132 SMs; NVIDIA H100 datasheet / Hopper whitepaper).
ASSUMED = CudaArch(9, 0, 132, "H100 SXM")

# --arch with a bare size: one representative card per compute capability, for its SM count (which
# only the bitsandbytes gemm_4bit tiers read). SM counts: docs/gpus.md#compute-capability-and-sm-count.
REPRESENTATIVE = {
    70: CudaArch(7, 0, 80, "V100"),
    75: CudaArch(7, 5, 40, "T4"),
    80: CudaArch(8, 0, 108, "A100"),
    86: CudaArch(8, 6, 72, "A10"),
    89: CudaArch(8, 9, 128, "RTX 4090"),
    90: ASSUMED,
    100: CudaArch(10, 0, 148, "B200"),
    120: CudaArch(12, 0, 170, "RTX 5090"),
}


def parse_arch(text: str) -> CudaArch:
    """'sm75', 'sm_75', '7.5' or '75' -> the representative CudaArch of that compute capability."""
    raw = str(text).strip().lower()
    key = raw.removeprefix("sm").removeprefix("_")
    if "." in key:
        major, _, minor = key.partition(".")
        key = major + minor if major.isdigit() and minor.isdigit() else ""
    if key.isdigit() and int(key) in REPRESENTATIVE:
        return REPRESENTATIVE[int(key)]
    raise UsageError(f"unknown --arch {text!r}",
                     hint="--arch takes one of: " + ", ".join(f"sm{k}" for k in REPRESENTATIVE))


def target_arch(gpu=None, arch: str | CudaArch | None = None) -> CudaArch:
    """The architecture the rules emulate: `arch` if given (only with a bare size or no GPU), else
    the catalog GPU's, else ASSUMED. `gpu` is a core.gpus.Gpu or None."""
    own = getattr(gpu, "cuda", None)
    if arch is not None:
        wanted = arch if isinstance(arch, CudaArch) else parse_arch(arch)
        if own is not None and own.sm != wanted.sm:
            raise UsageError(f"--arch {wanted.label} contradicts --gpu {gpu.name} ({own.label})",
                             hint="give --arch only with a bare size such as --gpu 16GB")
        return own or wanted
    return own or ASSUMED


def default_dtype(arch: CudaArch) -> str:
    """The compute dtype when none is given: bf16 where the hardware has it, else fp16."""
    return "bf16" if arch.bf16 else "fp16"


def hardware_name(arch: CudaArch) -> str:
    """The GPU a statement about `arch` is about: the catalog card (`T4 (sm75)`), or, where --arch
    chose it for a bare size, any GPU of that compute capability (`an sm75 GPU`): the
    representative card only lends its SM count."""
    if any(arch is chosen for chosen in REPRESENTATIVE.values()) and arch is not ASSUMED:
        return f"an {arch.label} GPU"
    return f"{arch.name} ({arch.label})"


def check_dtype(arch: CudaArch, dtype: str, setup=None) -> None:
    """bf16 below sm80 runs without tensor-core support and refuses every fused attention kernel
    (docs/cuda-kernels.md#bf16-on-sm70-and-sm75): refused rather than planned, as weights (`dtype`)
    and as the autocast dtype of `setup` (a TrainSetup: its matmuls and attention run in bf16)."""
    if dtype == "bf16" and not arch.bf16:
        raise UsageError(f"{hardware_name(arch)} has no bf16 hardware; bf16 training is not planned there",
                         hint="use --dtype fp16 (or dtype='fp16')")
    if setup is not None and setup.amp == "bf16" and not arch.bf16:
        raise UsageError(f"{hardware_name(arch)} has no bf16 hardware; {setup.flag_text('amp')} is not planned there",
                         hint="use --amp fp16 (or amp='fp16')")
