"""The GPU validation campaign: profile a matrix of QLoRA setups with random weights, every
configuration in its own child process, within a time budget, most valuable first.

    python benchmarks/gpu_campaign.py run --out profiles/h200 --bundle $OUT/campaign.jsonl --budget 480
    python benchmarks/gpu_campaign.py run --dry-run --device cpu --budget 120   # the same path on a CPU
    python benchmarks/gpu_campaign.py list [--dry-run]                          # the matrix, in run order
    python benchmarks/gpu_campaign.py unpack $OUT/campaign.jsonl profiles/h200  # bundle -> record files
    python benchmarks/gpu_campaign.py pack-snapshots FOLDER OUT --part-mib 15 --parts 3

Matrix, in run order (QLoRA NF4 + double quantization, bf16, LoRA r=16 on all linear layers,
batch 1, sdpa, 1 warm-up + 2 measured steps; 70B: 1 + 1):
  1. the plain default (seq 2048, non-reentrant checkpointing, torch AdamW) on one model of each
     family: Llama-3-8B, Qwen3-8B, OLMo-2-7B, Gemma-3-1B (gemma3_text), Mistral-7B, Llama-2-7B;
  2. the training libraries' recipes on Llama-3-8B and Qwen3-8B: trainer (autocast, fused AdamW),
     trl-sft (chunked loss), qlora-paper (recast, paged 32-bit AdamW);
  3. allocator settings on Llama-3-8B: expandable_segments:True, max_split_size_mb:128,
     garbage_collection_threshold:0.6 (with max_split_size_mb:512);
  4. larger models: Llama-2-13b, Gemma-3-12B, Qwen3-30B-A3B (MoE, 16-bit experts), Llama-2-70b;
  4b. a sequence of exactly Mistral-7B's sliding window (4096) without checkpointing: transformers
     builds the window mask from there on, so SDPA runs the memory-efficient kernel on repeated
     k/v instead of flash (estimate/_ops.py _sliding);
  5. issue 4's grid: Llama-2-7b, Llama-3-8B, Mistral-7B x seq {512, 2048, 8192} x checkpointing
     on/off x {adamw, paged_adamw8bit}, each single change from the default first.

Random weights (no download, no network): vramplan.profile._materialize builds the model on the
meta device, then creates each weight directly on the GPU and quantizes it there one tensor at
a time (Params4bit(...).to("cuda"), as transformers' Bnb4bitQuantize does for a checkpoint), so
70B never exists in bf16, neither in host RAM nor on the GPU: the largest bf16 tensor alive is
one 8192 x 28672 MLP weight (470 MB).

Budget: configurations run in order until the budget is spent; each gets min(its timeout, the
budget left) and one that cannot start with enough time left is written as a `skipped` record
(estimate only, no measurement). After every configuration its record is appended to the JSONL
bundle (flushed), so a campaign cut short still returns what it measured.

Child processes come from a fork server that imported torch / transformers / peft once (about
5 s saved per configuration); if a forked child cannot initialize CUDA the campaign falls back to
fresh interpreters (`--launcher subprocess`) and retries that configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA3 = "meta-llama/Meta-Llama-3-8B"
QWEN3 = "Qwen/Qwen3-8B"
FAMILY_DEFAULTS = (LLAMA3, QWEN3, "allenai/OLMo-2-1124-7B", "google/gemma-3-1b-pt", "mistralai/Mistral-7B-v0.1",
                   "meta-llama/Llama-2-7b-hf")
RECIPES = ((LLAMA3, "trainer"), (LLAMA3, "trl-sft"), (LLAMA3, "qlora-paper"), (QWEN3, "trainer"),
           (QWEN3, "trl-sft"))
ALLOC_CONFS = ("expandable_segments:True", "max_split_size_mb:128",
               "garbage_collection_threshold:0.6,max_split_size_mb:512")
BIG = (("meta-llama/Llama-2-13b-hf", "13b"), ("google/gemma-3-12b-pt", "13b"), ("Qwen/Qwen3-30B-A3B", "moe"),
       ("meta-llama/Llama-2-70b-hf", "70b"))
GRID_MODELS = ("meta-llama/Llama-2-7b-hf", LLAMA3, "mistralai/Mistral-7B-v0.1")
WINDOW_EDGE = ("mistralai/Mistral-7B-v0.1", 4096)    # its sliding_window
SEQS = (512, 2048, 8192)
OPTIMIZERS = ("adamw", "paged_adamw8bit")
# Value order of a dimension's values: the default recipe first, then what stresses the model most.
SEQ_RANK = {2048: 0, 8192: 1, 512: 2}
TIMEOUT_S = {"7b": 120.0, "13b": 150.0, "moe": 240.0, "70b": 300.0}
MIN_START_S = {"7b": 25.0, "13b": 35.0, "moe": 60.0, "70b": 90.0}   # do not start with less than this left
MAX_SETUP_FAILURES = 3   # consecutive configurations failing before they measure anything: stop

# Tiny stand-ins for --dry-run (CPU): same families and shapes of the matrix, seconds per run.
_LLAMA_TINY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512}
TINY = {
    "meta-llama/Llama-2-7b-hf": _LLAMA_TINY,
    LLAMA3: {**_LLAMA_TINY, "intermediate_size": 448, "num_key_value_heads": 2, "vocab_size": 1024,
             "rope_theta": 500000.0},
    "mistralai/Mistral-7B-v0.1": {**_LLAMA_TINY, "model_type": "mistral", "intermediate_size": 448,
                                  "num_key_value_heads": 2, "sliding_window": 64},
    QWEN3: {**_LLAMA_TINY, "model_type": "qwen3", "head_dim": 32, "num_key_value_heads": 2, "vocab_size": 1024},
    "allenai/OLMo-2-1124-7B": {**_LLAMA_TINY, "model_type": "olmo2"},
    "google/gemma-3-1b-pt": {**_LLAMA_TINY, "model_type": "gemma3_text", "head_dim": 32, "num_key_value_heads": 1,
                             "sliding_window": 16, "sliding_window_pattern": 2, "query_pre_attn_scalar": 32,
                             "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "google/gemma-3-12b-pt": {**_LLAMA_TINY, "model_type": "gemma3_text", "head_dim": 32, "num_key_value_heads": 2,
                              "sliding_window": 16, "sliding_window_pattern": 2, "query_pre_attn_scalar": 32,
                              "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "Qwen/Qwen3-30B-A3B": {**_LLAMA_TINY, "model_type": "qwen3_moe", "head_dim": 32, "num_key_value_heads": 2,
                           "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
                           "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "meta-llama/Llama-2-13b-hf": {**_LLAMA_TINY, "hidden_size": 160, "intermediate_size": 432,
                                  "num_hidden_layers": 3, "num_attention_heads": 5, "num_key_value_heads": 5},
    "meta-llama/Llama-2-70b-hf": {**_LLAMA_TINY, "hidden_size": 256, "intermediate_size": 688,
                                  "num_attention_heads": 8, "num_key_value_heads": 1},
}
TINY_SEQ = {512: 32, 2048: 64, 4096: 64, 8192: 128}    # 4096: the tiny Mistral's window, as 4096 is the real one's


@dataclass(frozen=True)
class Config:
    model: str            # hub id (real) or path to a tiny config folder (dry run)
    label: str            # the real model this stands for
    size: str             # 7b | 13b | moe | 70b: its time limits
    seq: int
    grad_ckpt: bool = True
    optimizer: str | None = None    # None: the recipe's (torch AdamW without one)
    recipe: str | None = None       # core/_recipes.py
    alloc_conf: str | None = None   # PYTORCH_CUDA_ALLOC_CONF of the run (None: defaults)
    warmup: int = 1
    steps: int = 2

    @property
    def name(self) -> str:
        parts = [self.label.rsplit("/", 1)[-1], f"s{self.seq}", "gc" if self.grad_ckpt else "nogc"]
        parts += [f"recipe {self.recipe}"] if self.recipe else []
        parts += [self.optimizer or ("" if self.recipe else "adamw")]
        parts += [f"[{self.alloc_conf}]"] if self.alloc_conf else []
        return " ".join(p for p in parts if p)

    def setup(self):
        from vramplan.core._setup import make_setup
        flags = {"seq": self.seq}
        if self.optimizer is not None:
            flags["optimizer"] = self.optimizer
        if not self.grad_ckpt:
            flags["grad_ckpt"] = False
        return make_setup(self.recipe, **flags)


def matrix(dry_run: bool = False, tiny_dir: Path | None = None) -> list[Config]:
    """Every configuration, most valuable first (see the module text)."""
    def model_for(label: str) -> str:
        return str(tiny_dir / label.replace("/", "__")) if dry_run else label

    def seq_for(seq: int) -> int:
        return TINY_SEQ[seq] if dry_run else seq

    def config(label, size="7b", seq=2048, **kw) -> Config:
        return Config(model_for(label), label, size, seq_for(seq), **kw)

    configs = [config(label) for label in FAMILY_DEFAULTS]
    configs += [config(label, recipe=name) for label, name in RECIPES]
    configs += [config(LLAMA3, alloc_conf=conf) for conf in ALLOC_CONFS]
    configs += [config(label, size, steps=1 if size in ("70b", "moe") else 2) for label, size in BIG]
    configs.append(config(WINDOW_EDGE[0], seq=WINDOW_EDGE[1], grad_ckpt=False))
    grid = []
    for i, label in enumerate(GRID_MODELS):
        for seq in SEQS:
            for gc in (True, False):
                for opt in OPTIMIZERS:
                    rank = (SEQ_RANK[seq] > 0) + (not gc) + (opt != "adamw")
                    if rank:   # the default itself ran in step 1
                        grid.append(((rank, SEQ_RANK[seq], not gc, opt != "adamw", i),
                                     config(label, seq=seq, grad_ckpt=gc, optimizer=opt)))
    grid.sort(key=lambda kv: kv[0])
    return configs + [c for _, c in grid]


def _ranges(text: str, n: int) -> list[int]:
    """'1-14,41-51' -> [1, ..., 14, 41, ..., 51] (1-based positions in the matrix)."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    if not out or min(out) < 1 or max(out) > n:
        raise SystemExit(f"--select {text}: positions run from 1 to {n}")
    return out


def write_tiny_models(folder: Path) -> None:
    for label, cfg in TINY.items():
        d = folder / label.replace("/", "__")
        d.mkdir(parents=True, exist_ok=True)
        config = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "_name_or_path": f"tiny-{label.rsplit('/', 1)[-1]}", **cfg}
        (d / "config.json").write_text(json.dumps(config, indent=1))


class Log:
    def __init__(self, path: str | None):
        self.f = open(path, "a", buffering=1) if path else None

    def __call__(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")


def append_bundle(path: str | None, record) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_launcher(kind: str):
    from vramplan.profile._session import ForkServerLauncher, SubprocessLauncher
    return ForkServerLauncher() if kind == "forkserver" else SubprocessLauncher()


def run_campaign(args) -> int:
    from vramplan.core._errors import VramplanError
    from vramplan.profile._compare import compare_record, error_table_markdown
    from vramplan.profile._session import ProfileOptions, profile, skipped_record
    from vramplan.profile._store import write_record

    log = Log(args.log)
    start = time.monotonic()
    deadline = start + args.budget
    tiny_dir = None
    if args.dry_run:
        tiny_dir = Path(tempfile.mkdtemp(prefix="vramplan-campaign-"))
        write_tiny_models(tiny_dir)
    configs = matrix(args.dry_run, tiny_dir)
    if args.only:
        configs = configs[:args.only]
    if args.select:
        configs = [configs[i - 1] for i in _ranges(args.select, len(configs))]
    launcher_kind = args.launcher
    launcher = make_launcher(launcher_kind)
    log(f"campaign: {len(configs)} configurations, budget {args.budget:.0f} s, device {args.device}, "
        f"launcher {launcher_kind}{', DRY RUN (tiny stand-ins)' if args.dry_run else ''}")
    comparisons, counts = [], {}
    failures_in_a_row = 0
    for n, cfg in enumerate(configs, 1):
        left = deadline - time.monotonic()
        # a dry run's tiny models take seconds, but its first child imports torch and transformers:
        # on a loaded 2-core machine that alone passed 30 s
        scale = 0.5 if args.dry_run else 1.0
        options = ProfileOptions(device=args.device, steps=cfg.steps, warmup=cfg.warmup, random_weights=True,
                                 timeout_s=max(1.0, min(TIMEOUT_S[cfg.size] * scale, left)), model_ref=cfg.label,
                                 nvml_hz=args.nvml_hz, alloc_conf=cfg.alloc_conf,
                                 # the allocator's own history, for `vramplan replay --check` (cuda cases)
                                 snapshot=args.device != "cpu")
        setup = cfg.setup()
        if args.dry_run and setup.autocast:
            # CPU autocast has other op lists (docs/recipes.md#cpu-autocast-differs): profile refuses it
            log(f"[{n}/{len(configs)}] {cfg.name}: not run in a dry run (autocast is measured on a GPU only)")
            continue
        if left < MIN_START_S[cfg.size] * scale:
            record = skipped_record(cfg.model, setup, options,
                                    f"campaign budget: {max(left, 0):.0f} s left, this configuration needs "
                                    f"{MIN_START_S[cfg.size] * scale:.0f} s to start")
            log(f"[{n}/{len(configs)}] {cfg.name}: skipped ({max(left, 0):.0f} s left)")
        else:
            t = time.monotonic()
            record = None
            for attempt in (1, 2):
                try:
                    record, _ = profile(cfg.model, setup, options, out=None, launcher=launcher)
                    break
                except VramplanError as exc:
                    text = str(exc)
                    if attempt == 1 and launcher_kind == "forkserver" and _fork_cuda_failure(text):
                        log(f"forked child cannot use CUDA ({text[:120]}); switching to fresh interpreters")
                        launcher_kind, launcher = "subprocess", make_launcher("subprocess")
                        continue
                    log(f"[{n}/{len(configs)}] {cfg.name}: setup error: {text}")
                    if getattr(exc, "details", None):
                        log("child traceback:\n" + exc.details)
                    break
            if record is None:
                counts["setup-error"] = counts.get("setup-error", 0) + 1
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_SETUP_FAILURES:
                    log(f"{failures_in_a_row} configurations in a row failed before measuring: stopping, so the "
                        "device time left can go to a fixed rerun")
                    break
                continue
            failures_in_a_row = 0
            record = keep_snapshot(record, args.out)
            c = compare_record(record)
            comparisons.append(c)
            log(f"[{n}/{len(configs)}] {cfg.name}: {record.status} in {time.monotonic() - t:.1f} s; "
                f"alloc {_gib(c.measured_allocated)} vs predicted {_gib(c.predicted_allocated)} "
                f"({_pct(c.error_allocated)}), device {_gib(c.measured_device_total)} vs "
                f"{_gib(c.predicted_device_total)} ({_pct(c.error_device_total)})"
                + (f"; {c.failure}" if c.failure else ""))
        counts[record.status] = counts.get(record.status, 0) + 1
        append_bundle(args.bundle, record)
        if args.out:
            write_record(record, args.out)
    log(f"campaign done in {time.monotonic() - start:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.summary:
        text = "# vramplan GPU campaign\n\n" + error_table_markdown(comparisons)
        Path(args.summary).write_text(text)
        log(f"summary: {args.summary}")
    return 0


def keep_snapshot(record, folder: str | None):
    """Move the run's memory snapshot next to its record (`<id>.snapshot.pickle`), so that
    `vramplan replay --check` can verify the allocator model on it."""
    import dataclasses
    import shutil

    if not record.snapshot or not folder or not Path(record.snapshot).is_file():
        return record
    dest = Path(folder) / f"{record.id}.snapshot.pickle"
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = Path(record.snapshot)
    shutil.move(source, dest)
    if source.parent.name.startswith("vramplan-profile-"):   # the run's own work folder
        shutil.rmtree(source.parent, ignore_errors=True)
    return dataclasses.replace(record, snapshot=dest.name)


def reserved_miss(record: dict) -> float:
    """|predicted - measured| / measured peak reserved of a bundle record (its own prediction,
    made when it ran); -1 where the record has no measured reserved peak."""
    measured = (record.get("measured") or {}).get("peak_reserved_bytes")
    predicted = (record.get("estimate") or {}).get("peak_reserved_bytes")
    if not measured or predicted is None:
        return -1.0
    return abs(predicted - measured) / measured


def pack_snapshots(bundle: str, folder: str, out: str, part_mib: float, parts: int) -> int:
    """Gzip the runs' snapshots into at most `parts` tar files of at most `part_mib` MiB each, so
    they fit what a machine may send back: the run whose peak reserved the estimate missed most
    first (its allocator history is what shows where the predicted stream differs; about four
    7B snapshots fit), then in the campaign's order. A snapshot that does not fit is named in the
    output and left out."""
    import gzip
    import io
    import tarfile

    found = []
    with open(bundle) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                snap = record.get("snapshot")
                if snap and (Path(folder) / snap).is_file():
                    found.append((-reserved_miss(record), len(found), snap))
    names = [snap for _miss, _order, snap in sorted(found)]
    limit = int(part_mib * 2**20) - 64 * 1024   # tar headers and padding
    part, used, tar = 0, 0, None
    for name in names:
        data = gzip.compress((Path(folder) / name).read_bytes(), compresslevel=6)
        if len(data) > limit:
            print(f"left out {name}: {len(data) / 2**20:.1f} MiB compressed, over one part")
            continue
        if tar is None or used + len(data) + 1024 > limit:
            if tar is not None:
                tar.close()
            part += 1
            if part > parts:
                print(f"left out {name} and what follows: {parts} parts are full")
                tar = None
                break
            tar, used = tarfile.open(Path(out) / f"snapshots-{part}.tar", "w"), 0
        info = tarfile.TarInfo(name + ".gz")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        used += len(data) + 1024
        print(f"snapshots-{part}.tar: {name}.gz ({len(data) / 2**20:.1f} MiB)")
    if tar is not None:
        tar.close()
    return 0


def _fork_cuda_failure(text: str) -> bool:
    text = text.lower()
    return "initialization error" in text or "re-initialize cuda in forked" in text or "cudaerrorinitializationerror" in text


def _gib(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _pct(x) -> str:
    return "—" if x is None else f"{x:+.1%}"


def unpack(bundle: str, folder: str) -> int:
    """Write every record of a JSONL bundle as its own file (atomically) under `folder`."""
    from vramplan.profile._record import Record
    from vramplan.profile._store import write_record

    n = 0
    with open(bundle) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            path = write_record(Record.from_dict(json.loads(line)), folder)
            print(path)
            n += 1
    print(f"{n} records written to {folder}")
    return 0


# --- cpu-check: measured (CPU, tracker) vs estimate vs simulate, for the closing note ------------------

SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "_name_or_path": "small-llama-256"}
CPU_CHECKS = (dict(), dict(grad_ckpt=False), dict(optimizer="paged_adamw8bit"), dict(optimizer="adamw8bit"),
              dict(method="lora"), dict(attn="eager"), dict(batch=2, seq=128), dict(targets=("q_proj", "v_proj")),
              dict(quant="int8"), dict(method="full", optimizer="adamw"))


def cpu_check(args) -> int:
    """Profile a small Llama on the CPU under several setups and put the measurement next to the
    estimate and to simulate on the meta device (CUDA emulation) and on the CPU (same tracker)."""
    from vramplan.estimate._estimator import estimate
    from vramplan.core._models import resolve
    from vramplan.profile._session import ForkServerLauncher, ProfileOptions, profile
    from vramplan.core._setup import TrainSetup
    from vramplan.simulate import simulate

    folder = Path(tempfile.mkdtemp(prefix="vramplan-cpu-check-"))
    (folder / "config.json").write_text(json.dumps(SMALL))
    spec = resolve(str(folder))
    launcher = ForkServerLauncher()
    rows = ["| setup | measured (CPU) | estimate | error | simulate meta | vs measured | simulate cpu | vs measured |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for change in CPU_CHECKS[:args.only or None]:
        setup = TrainSetup(seq=256, **change) if "seq" not in change else TrainSetup(**change)
        rec, _ = profile(str(folder), setup, ProfileOptions(device="cpu", random_weights=True, steps=1),
                         launcher=launcher)
        meas = rec.measured.peak_allocated_bytes
        est = estimate(spec, setup).peak_allocated_bytes
        meta = simulate(spec, setup, device="meta").peak_allocated_bytes
        cpu = simulate(spec, setup, device="cpu").peak_allocated_bytes if args.simulate_cpu else None
        label = ", ".join(f"{k}={v}" for k, v in change.items()) or "default (qlora nf4+dq, seq 256, gc, adamw)"
        rows.append(f"| {label} | {meas:,} | {est:,} | {_pct((est - meas) / meas)} | {meta:,} | "
                    f"{_pct((meta - meas) / meas)} | {'—' if cpu is None else f'{cpu:,}'} | "
                    f"{'—' if cpu is None else _pct((cpu - meas) / meas)} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the campaign")
    r.add_argument("--dry-run", action="store_true", help="tiny stand-in models (for a CPU)")
    r.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    r.add_argument("--budget", type=float, default=480.0, help="seconds for the whole matrix (default 480)")
    r.add_argument("--only", type=int, help="run only the first N configurations")
    r.add_argument("--select", help="positions in the matrix to run, e.g. 1-14,41-51 (see `list`)")
    r.add_argument("--out", help="folder for one record file per configuration")
    r.add_argument("--bundle", help="JSONL file every record is appended to")
    r.add_argument("--log", help="progress log file")
    r.add_argument("--summary", help="Markdown error table written at the end")
    r.add_argument("--launcher", default="forkserver", choices=("forkserver", "subprocess"))
    r.add_argument("--nvml-hz", type=float, default=200.0)
    ls = sub.add_parser("list", help="print the matrix in run order")
    ls.add_argument("--dry-run", action="store_true")
    u = sub.add_parser("unpack", help="JSONL bundle -> one record file each")
    u.add_argument("bundle")
    u.add_argument("folder")
    k = sub.add_parser("pack-snapshots", help="the bundle's snapshots -> tar parts that fit a transfer limit")
    k.add_argument("bundle")
    k.add_argument("folder", help="where the records and snapshots were written (run --out)")
    k.add_argument("out")
    k.add_argument("--part-mib", type=float, default=15.0)
    k.add_argument("--parts", type=int, default=3)
    c = sub.add_parser("cpu-check", help="measured on the CPU vs estimate vs simulate (small Llama)")
    c.add_argument("--only", type=int, help="first N setups")
    c.add_argument("--simulate-cpu", action="store_true", help="also run simulate on the CPU (slow)")
    args = p.parse_args(argv)
    if args.cmd == "cpu-check":
        return cpu_check(args)
    if args.cmd == "list":
        for i, c in enumerate(matrix(args.dry_run, Path("tiny")), 1):
            print(f"{i:2d}. {c.name}  (warm-up {c.warmup} + {c.steps} steps, timeout {TIMEOUT_S[c.size]:.0f} s)")
        return 0
    if args.cmd == "pack-snapshots":
        return pack_snapshots(args.bundle, args.folder, args.out, args.part_mib, args.parts)
    if args.cmd == "unpack":
        return unpack(args.bundle, args.folder)
    return run_campaign(args)


if __name__ == "__main__":
    sys.exit(main())
