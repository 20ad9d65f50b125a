"""Records on disk: one JSON file per run, written atomically, read back from a file or a folder.

Atomic: the JSON goes to a hidden temporary file in the destination folder (same file system),
is flushed and fsync'ed, then os.replace()d onto its final name (POSIX rename is atomic). A
reader therefore sees either no record or a whole one; an interruption (Ctrl-C, a kill) can at
worst leave a hidden `.*.tmp` file, which every reader here skips and the next write removes
when it is older than an hour.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from vramplan.core._errors import UsageError, VramplanError
from vramplan.profile._record import NotARecord, Record

SUFFIX = ".json"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600


def slug(text: str) -> str:
    """A file-name-safe form of a model id or path: 'meta-llama/Llama-2-7b-hf' -> 'Llama-2-7b-hf'."""
    base = str(text).rstrip("/").rsplit("/", 1)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)[:60].strip("._-") or "model"


def ckpt_label(setup: dict) -> str:
    """A record's gradient checkpointing in one word, as its id, tables and plots write it: gc,
    gcr (reentrant) or nogc."""
    return ("gcr" if setup.get("reentrant") else "gc") if setup.get("grad_ckpt") else "nogc"


def record_id(model_id: str, setup: dict, device: str, created: str) -> str:
    """<model>_<method>[-<quant>]_b<batch>_s<seq>_<gc|gcr|nogc>_<optimizer>_<device>_<UTC time>
    (gcr: reentrant checkpointing)."""
    method = setup["method"] + (f"-{setup['quant']}" if setup.get("quant") else "")
    stamp = re.sub(r"[^0-9T]", "", created)[:15]
    dev = device.split(":")[0]
    ckpt = ckpt_label(setup)
    return f"{slug(model_id)}_{method}_b{setup['batch']}_s{setup['seq']}_{ckpt}_{setup['optimizer']}_{dev}_{stamp}"


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that `path` is either absent or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staged_bytes(path, data)
    try:
        return atomic_move(tmp, path)
    except BaseException:  # the rename failed or was interrupted: never leave the temporary behind
        _discard(tmp)
        raise


def staged_bytes(path: Path, data: bytes) -> Path:
    """The first half of atomic_write_bytes, for a command that writes more than one file and
    names none until all are written (`sweep --csv --plot`): `data` in a hidden temporary file
    beside `path`, flushed and fsync'ed; atomic_move puts it in place. Nothing is left behind
    if the write fails."""
    tmp = Path(path).parent / f"{TMP_PREFIX}{os.getpid()}-{Path(path).name}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # KeyboardInterrupt included: never leave the temporary behind
        _discard(tmp)
        raise
    return tmp


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


def atomic_move(src: Path, dest: Path) -> Path:
    """Move a finished file (a staged one, or a memory snapshot written by the child) into place atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    _fsync_dir(dest.parent)
    return dest


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_folder(folder: str | os.PathLike) -> None:
    """Raise OSError unless a file can be written in `folder` (made if missing), leaving nothing
    behind: a long run checks where its result goes before it starts, not after."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():   # mkdir would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    made = []   # the folders this probe creates, deepest first, removed after it
    p = folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    finally:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass


def unique_path(folder: Path, stem: str, suffix: str = SUFFIX) -> Path:
    path = folder / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}{suffix}"
        n += 1
    return path


def check_out_folder(folder: str | os.PathLike) -> None:
    """Raise unless records can be written in `folder` (made if missing), leaving nothing behind:
    `vramplan profile` checks its --out before the run, so that a bad path does not cost the
    measurement (write_record checks again when it writes)."""
    folder = Path(folder)
    _refuse_a_file(folder)
    try:
        probe_folder(folder)
    except OSError as exc:
        raise VramplanError(f"cannot write records to {folder}: {exc.strerror or exc}",
                            hint="pick another --out folder") from None


def _refuse_a_file(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder", hint="give the folder records go to, e.g. profiles/")


def write_record(record: Record, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    _refuse_a_file(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VramplanError(f"cannot create {folder}: {exc.strerror}", hint="pick another --out folder") from None
    clean_stale_temporaries(folder)
    path = unique_path(folder, record.id)
    data = (json.dumps(record.to_dict(), indent=1, sort_keys=False) + "\n").encode()
    try:
        return atomic_write_bytes(path, data)
    except OSError as exc:
        raise VramplanError(f"cannot write {path}: {exc.strerror}", hint="check the --out folder") from None


def clean_stale_temporaries(folder: Path) -> None:
    now = time.time()
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                tmp.unlink()
        except OSError:
            pass


def record_files(path: str | os.PathLike) -> list[Path]:
    """The record files under `path`: the file itself, or every visible *.json below a folder."""
    p = Path(path)
    hint = "give a record file or a folder of records, e.g. profiles/"
    try:
        mode = p.stat().st_mode
    except OSError as exc:      # a name too long, a loop of links, a folder that may not be searched
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UsageError(f"no such file or folder: {path}", hint=hint) from None
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", hint=hint) from None
    if stat.S_ISREG(mode):
        return [p]
    if stat.S_ISDIR(mode):
        return sorted(f for f in p.rglob(f"*{SUFFIX}")
                      if not any(part.startswith(".") for part in f.relative_to(p).parts) and f.is_file())
    # a named pipe, a device, a socket: reading one could wait forever
    raise UsageError(f"{path} is not a regular file (a device or a named pipe)", hint=hint)


def read_record(path: Path) -> Record:
    """The record in the file `path`; any reason it cannot be read is one VramplanError naming the file."""
    try:
        return _read(path)
    except VramplanError as exc:
        raise _naming(path, exc) from None


def _read(path: Path) -> Record:
    # the errors here do not name the file: read_record and read_records' on_skip add it
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise VramplanError(exc.strerror or str(exc), hint="is it a vramplan profile record?") from None
    except UnicodeDecodeError:
        raise VramplanError("not UTF-8 text", hint="is it a vramplan profile record?") from None
    except json.JSONDecodeError as exc:
        raise VramplanError(f"not valid JSON ({exc})", hint="is it a whole vramplan profile record?") from None
    except RecursionError:
        raise VramplanError("nested too deeply to be a record", hint="is it a vramplan profile record?") from None
    return Record.from_dict(data)


def _naming(path: Path, exc: VramplanError) -> VramplanError:
    return type(exc)(f"cannot read record {path}: {exc.message}", hint=exc.hint)


def read_records(path: str | os.PathLike, strict: bool = False, on_skip=None) -> list[tuple[Path, Record]]:
    """(path, record) for each record under `path`. A file given by name must be a readable record.
    In a folder, JSON files that are no profile record at all (no vramplan schema) are skipped;
    a file that cannot be read as a record (not JSON, truncated, another schema version,
    malformed) is skipped too, and on_skip(file, error) is told why, unless strict, which raises
    on the first file of either sort. No readable record at all is an error."""
    files = record_files(path)
    strict = strict or Path(path).is_file()
    out, unreadable = [], []
    for f in files:
        try:
            out.append((f, _read(f)))
        except VramplanError as exc:
            if strict:
                raise _naming(f, exc) from None
            if not isinstance(exc, NotARecord):   # another kind of JSON file next to the records: no news
                unreadable.append((f, exc))
    if not out and unreadable:
        f, exc = unreadable[0]
        more = f" (and {len(unreadable) - 1} more unreadable)" if len(unreadable) > 1 else ""
        raise VramplanError(f"no readable profile records in {path}: {f}: {exc.message}{more}", hint=exc.hint)
    if not out:
        raise VramplanError(f"no profile records in {path}", hint="write some with `vramplan profile ... --out DIR`")
    if on_skip is not None:
        for f, exc in unreadable:
            on_skip(f, exc)
    return out
