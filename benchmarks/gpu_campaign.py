"""The GPU validation campaign: profile a matrix of QLoRA setups with random weights, every
configuration in its own child process, within a time budget, most valuable first.

    python benchmarks/gpu_campaign.py run --out profiles/h200 --bundle $OUT/campaign.jsonl --budget 480
    python benchmarks/gpu_campaign.py run --dry-run --device cpu --budget 120   # the same path on a CPU
    python benchmarks/gpu_campaign.py list [--dry-run]                          # the matrix, in run order
    python benchmarks/gpu_campaign.py unpack $OUT/campaign.jsonl profiles/h200  # bundle -> record files

Matrix (issue 4): Llama-2-7b, Llama-3-8B, Mistral-7B x seq {512, 2048, 8192} x gradient
checkpointing on/off x {adamw, paged_adamw8bit}, plus Llama-2-13b and Llama-2-70b at seq 2048
with checkpointing and adamw: 38 runs, QLoRA NF4 + double quantization, bf16, LoRA r=16 on all
linear layers, batch 1, sdpa, 1 warm-up + 2 measured steps (70B: 1 + 1).

Random weights (no download, no network): vramplan.profile.materialize builds the model on the
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

FAMILIES = ("meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1")
SEQS = (512, 2048, 8192)
OPTIMIZERS = ("adamw", "paged_adamw8bit")
BIG = (("meta-llama/Llama-2-13b-hf", 2048), ("meta-llama/Llama-2-70b-hf", 2048))
# Value order of a dimension's values: the default recipe first, then what stresses the model most.
SEQ_RANK = {2048: 0, 8192: 1, 512: 2}
TIMEOUT_S = {"7b": 120.0, "13b": 150.0, "70b": 300.0}
MIN_START_S = {"7b": 25.0, "13b": 35.0, "70b": 90.0}   # do not start with less than this left
MAX_SETUP_FAILURES = 3   # consecutive configurations failing before they measure anything: stop

# Tiny stand-ins for --dry-run (CPU): same families and shapes of the matrix, seconds per run.
TINY = {
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                                 "vocab_size": 512},
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 448,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 1024, "rope_theta": 500000.0},
    "mistralai/Mistral-7B-v0.1": {"model_type": "mistral", "hidden_size": 128, "intermediate_size": 448,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 512, "sliding_window": 64},
    "meta-llama/Llama-2-13b-hf": {"model_type": "llama", "hidden_size": 160, "intermediate_size": 432,
                                  "num_hidden_layers": 3, "num_attention_heads": 5, "num_key_value_heads": 5,
                                  "vocab_size": 512},
    "meta-llama/Llama-2-70b-hf": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
                                  "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 1,
                                  "vocab_size": 512},
}
TINY_SEQ = {512: 32, 2048: 64, 8192: 128}


@dataclass(frozen=True)
class Config:
    model: str            # hub id (real) or path to a tiny config folder (dry run)
    label: str            # the real model this stands for
    size: str             # 7b | 13b | 70b
    seq: int
    grad_ckpt: bool
    optimizer: str
    warmup: int = 1
    steps: int = 2

    @property
    def name(self) -> str:
        return (f"{self.label.rsplit('/', 1)[-1]} s{self.seq} {'gc' if self.grad_ckpt else 'nogc'} "
                f"{self.optimizer}")

    def setup(self):
        from vramplan.core.setup import TrainSetup
        return TrainSetup(seq=self.seq, grad_ckpt=self.grad_ckpt, optimizer=self.optimizer)


def matrix(dry_run: bool = False, tiny_dir: Path | None = None) -> list[Config]:
    """The 38 configurations, most valuable first: the default recipe on each 7-8B model, then
    13B / 70B, then each single change from the recipe, then pairs of changes, and so on."""
    def model_for(label: str) -> str:
        return str(tiny_dir / label.replace("/", "__")) if dry_run else label

    def seq_for(seq: int) -> int:
        return TINY_SEQ[seq] if dry_run else seq

    small = []
    for i, label in enumerate(FAMILIES):
        for seq in SEQS:
            for gc in (True, False):
                for opt in OPTIMIZERS:
                    rank = (SEQ_RANK[seq] > 0) + (not gc) + (opt != "adamw")
                    key = (rank, SEQ_RANK[seq], not gc, opt != "adamw", i)
                    small.append((key, Config(model_for(label), label, "7b", seq_for(seq), gc, opt)))
    small.sort(key=lambda kv: kv[0])
    configs = [c for key, c in small if key[0] == 0]
    for label, seq in BIG:
        size = "70b" if "70b" in label else "13b"
        configs.append(Config(model_for(label), label, size, seq_for(seq), True, "adamw",
                              warmup=1, steps=1 if size == "70b" else 2))
    configs += [c for key, c in small if key[0] > 0]
    return configs


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
    from vramplan.profile.session import ForkServerLauncher, SubprocessLauncher
    return ForkServerLauncher() if kind == "forkserver" else SubprocessLauncher()


def run_campaign(args) -> int:
    from vramplan.core.errors import VramplanError
    from vramplan.profile.compare import compare_record, error_table_markdown
    from vramplan.profile.session import ProfileOptions, profile, skipped_record
    from vramplan.profile.store import write_record

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
    launcher_kind = args.launcher
    launcher = make_launcher(launcher_kind)
    log(f"campaign: {len(configs)} configurations, budget {args.budget:.0f} s, device {args.device}, "
        f"launcher {launcher_kind}{', DRY RUN (tiny stand-ins)' if args.dry_run else ''}")
    comparisons, counts = [], {}
    failures_in_a_row = 0
    for n, cfg in enumerate(configs, 1):
        left = deadline - time.monotonic()
        scale = 0.25 if args.dry_run else 1.0
        options = ProfileOptions(device=args.device, steps=cfg.steps, warmup=cfg.warmup, random_weights=True,
                                 timeout_s=max(1.0, min(TIMEOUT_S[cfg.size] * scale, left)), model_ref=cfg.label,
                                 nvml_hz=args.nvml_hz,
                                 # the allocator's own history, for `vramplan replay --check` (cuda cases)
                                 snapshot=args.device != "cpu")
        if left < MIN_START_S[cfg.size] * scale:
            record = skipped_record(cfg.model, cfg.setup(), options,
                                    f"campaign budget: {max(left, 0):.0f} s left, this configuration needs "
                                    f"{MIN_START_S[cfg.size] * scale:.0f} s to start")
            log(f"[{n}/{len(configs)}] {cfg.name}: skipped ({max(left, 0):.0f} s left)")
        else:
            t = time.monotonic()
            record = None
            for attempt in (1, 2):
                try:
                    record, _ = profile(cfg.model, cfg.setup(), options, out=None, launcher=launcher)
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
    shutil.move(record.snapshot, dest)
    return dataclasses.replace(record, snapshot=dest.name)


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
    from vramplan.profile.record import Record
    from vramplan.profile.store import write_record

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
    from vramplan.estimate.estimator import estimate
    from vramplan.core.models import resolve
    from vramplan.profile.session import ForkServerLauncher, ProfileOptions, profile
    from vramplan.core.setup import TrainSetup
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
    if args.cmd == "unpack":
        return unpack(args.bundle, args.folder)
    return run_campaign(args)


if __name__ == "__main__":
    sys.exit(main())
