"""`vramplan profile`'s checks and messages around the run: the --out folder is checked before
any child starts, and a run that ends early says what happened. The training child is replaced
by a stand-in process (no torch here)."""
import json
import multiprocessing
import subprocess
import sys
import time

import pytest

from vramplan.cli import main
from vramplan.profile import _session

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture
def tiny(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    return str(d)


class SilentLauncher:
    """Starts a process that sends `events` and then nothing: the run stays where they leave it."""

    def __init__(self, events=()):
        self.events = events

    def start(self, job, workdir):
        reader, writer = multiprocessing.Pipe(duplex=False)
        for event in self.events:
            writer.send(dict(event, t=time.monotonic()))
        child = _session._Child(reader, proc=subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        child.writer = writer   # the open end keeps the pipe quiet rather than closed
        return child


class NoRun:
    def start(self, job, workdir):
        raise AssertionError("the run started")


@pytest.mark.parametrize("out, code, message", [
    ("{tmp}/file", 2, "Error: --out {tmp}/file is a file, not a folder (hint: give the folder records go to, e.g. profiles/)\n"),
    ("{tmp}/file/sub", 1, "Error: cannot write records to {tmp}/file/sub: Not a directory (hint: pick another --out folder)\n"),
])
def test_the_out_folder_is_checked_before_the_run(tmp_path, tiny, capsys, monkeypatch, out, code, message):
    monkeypatch.setattr(_session, "SubprocessLauncher", NoRun)
    (tmp_path / "file").write_text("x")
    got = main(["profile", tiny, "--random-weights", "--device", "cpu", "--out", out.replace("{tmp}", str(tmp_path))])
    assert got == code and capsys.readouterr().err == message.replace("{tmp}", str(tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file", "tiny"]


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "nan"], "Error: --timeout must be a positive number of seconds, got nan (hint: e.g. --timeout "
                           "600, or leave it out for no limit)\n"),
    (["--timeout", "inf"], "Error: --timeout must be a positive number of seconds, got inf (hint: e.g. --timeout "
                           "600, or leave it out for no limit)\n"),
    (["--gpu", "300MB"], "Error: --gpu 300,000,000 bytes is less than the CUDA context (524,288,000 bytes) "
                         "(hint: give a larger GPU size)\n"),
    (["--out", ""], "Error: --out needs a folder name (hint: e.g. --out profiles/, or --no-record)\n"),
    (["--plot", "{tmp}/folder.png"], "Error: --plot {tmp}/folder.png is a folder (hint: give a file name, e.g. "
                                     "--plot memory.png)\n"),
    (["--plot", "{tmp}/missing/p.png"], "Error: --plot {tmp}/missing/p.png: {tmp}/missing does not exist (hint: "
                                        "write the file into an existing folder)\n"),
])
def test_bad_run_flags_are_refused_before_the_run(tmp_path, tiny, capsys, monkeypatch, flags, message):
    """Nothing runs, nothing is written: the run's time limit, a CPU-emulated card smaller than
    the CUDA context, and the record's and the plot's destinations are checked first."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(_session, "SubprocessLauncher", NoRun)
    (tmp_path / "folder.png").mkdir()
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    got = main(["profile", tiny, "--random-weights", "--device", "cpu", *flags])
    assert got == 2
    assert capsys.readouterr().err == message.replace("{tmp}", str(tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["folder.png", "tiny"]


@pytest.mark.parametrize("events, where", [
    ((), "before the first step"),
    (({"event": "phase", "stage": "start", "phase": "load", "step": None, "allocated": 0},),
     "while loading the model, before the first step"),
    (({"event": "phase", "stage": "start", "phase": "forward", "step": 0, "allocated": 4096},), "at step 0, forward"),
])
def test_a_timeout_says_when_it_struck(tmp_path, tiny, capsys, monkeypatch, events, where):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(_session, "SubprocessLauncher", lambda: SilentLauncher(events))
    out = tmp_path / "records"
    got = main(["profile", tiny, "--random-weights", "--device", "cpu", "--timeout", "0.2", "--out", str(out)])
    captured = capsys.readouterr()
    [record] = out.iterdir()
    assert got == 1
    assert captured.err == (f"Error: the run passed its --timeout of 0.2 s {where} and was ended (record: {record}) "
                            "(hint: the record keeps the last measured values; allow it more time with a larger "
                            "--timeout)\n")
    assert f"TIMEOUT {where}: the run passed its time limit and was ended" in captured.out
    assert json.loads(record.read_text())["status"] == "timeout"   # the record is written, as documented


@pytest.mark.parametrize("kind", ["link", "fifo", "device", "no folder"])
def test_csv_never_replaces_a_link_a_pipe_or_a_device(tmp_path, capsys, kind):
    """The CSV is renamed into place: a link is followed to its file (the link stays), a named
    pipe or a device is refused rather than replaced by a regular file."""
    import os
    from pathlib import Path

    pytest.importorskip("pandas")
    record = sorted((Path(__file__).parent.parent / "profiles" / "h200").glob("gemma-3-1b-pt*.json"))[0]
    target = tmp_path / "target.csv"
    target.write_text("old")
    dest = {"link": tmp_path / "link.csv", "fifo": tmp_path / "fifo.csv", "device": "/dev/null",
            "no folder": tmp_path / "none" / "x.csv"}[kind]
    if kind == "link":
        os.symlink(target, dest)
    elif kind == "fifo":
        os.mkfifo(dest)
    for argv in (["compare", str(record), "--csv", str(dest)],
                 ["sweep", "tests/configs/llama-gqa.json", "--gpu", "24GB", "--csv", str(dest)]):
        code = main(argv)
        _out, err = capsys.readouterr()
        if kind == "link":
            assert code == 0 and os.path.islink(dest) and target.read_text().startswith(("model", "id", "record"))
            target.write_text("old")
        else:
            assert code == 2 and err.count("\n") == 1, err
            message = "is not a regular file (a device or a named pipe)" if kind != "no folder" else "does not exist"
            assert message in err, err
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
