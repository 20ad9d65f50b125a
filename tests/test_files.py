"""Paths a command writes to (core/_files.py file_destination) or reads records from
(profile/_store.py record_files) that are no plain file: a loop of symbolic links, a name too long,
a named pipe. Each is one `Error:` line, never a traceback or a read that waits forever."""
import os

import pytest

from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._files import file_destination
from vramplan.profile import _store as store

LOOP = "cannot be written: a loop of symbolic links (hint: give a file name, e.g. --csv table.csv)"


@pytest.fixture
def loop(tmp_path):
    """loop1 -> loop2 -> loop1: Path.resolve() raises RuntimeError on it before Python 3.13, OSError after."""
    os.symlink(tmp_path / "loop2", tmp_path / "loop1")
    os.symlink(tmp_path / "loop1", tmp_path / "loop2")
    return tmp_path / "loop1"


def test_a_loop_of_links_is_refused(loop):
    with pytest.raises(UsageError) as info:
        file_destination(str(loop), "--csv")
    assert str(info.value) == f"--csv {loop} {LOOP}"
    assert os.readlink(loop) == str(loop.parent / "loop2")      # left as it was


def test_a_name_too_long_is_refused(tmp_path):
    dest = str(tmp_path / ("x" * 300))
    with pytest.raises(UsageError, match=r"^--plot \S+ cannot be written: File name too long \(hint: give a file "
                                         r"name, e.g. --plot memory.png\)$"):
        file_destination(dest, "--plot", "memory.png")


def test_a_link_to_a_file_is_followed(tmp_path):
    (tmp_path / "real.csv").write_text("old")
    os.symlink(tmp_path / "real.csv", tmp_path / "link.csv")
    assert file_destination(str(tmp_path / "link.csv"), "--csv") == tmp_path / "real.csv"


@pytest.mark.pandas
def test_compare_csv_into_a_loop_is_one_line(loop, tmp_path, capsys):
    from test_compare import gpu_shaped

    store.write_record(gpu_shaped(1.10), tmp_path / "p")
    assert main(["compare", str(tmp_path / "p"), "--csv", str(loop)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"Error: --csv {loop} {LOOP}\n")


def test_compare_of_a_named_pipe_says_so(tmp_path, capsys):
    """Reading a FIFO would wait for a writer: refused as not a regular file, not as missing."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert main(["compare", str(fifo)]) == 2
    assert capsys.readouterr().err == (f"Error: {fifo} is not a regular file (a device or a named pipe) (hint: give "
                                       "a record file or a folder of records, e.g. profiles/)\n")


@pytest.mark.parametrize("name, reason", [("x" * 300, "cannot read {}: File name too long"),
                                          ("missing.json", "no such file or folder: {}")])
def test_compare_of_a_path_that_cannot_be_read(tmp_path, capsys, name, reason):
    path = tmp_path / name
    assert main(["compare", str(path)]) == 2
    assert capsys.readouterr().err == (f"Error: {reason.format(path)} (hint: give a record file or a folder of "
                                       "records, e.g. profiles/)\n")


def test_compare_of_a_loop_of_links(loop, capsys):
    assert main(["compare", str(loop)]) == 2
    assert capsys.readouterr().err.startswith(f"Error: cannot read {loop}: Too many levels of symbolic links (hint: ")
