"""A stdout that loses the output: closed (`>&-`), full (`> /dev/full`), or a reader that stops
early (`| head`). The first two are one `Error:` line and exit 1 (cli/_flags.py Stdout, cli/_app.py
main), the last ends with 0 and nothing on stderr. Each runs a real process: the interpreter's own
flush at exit is part of what is checked."""
import os
import subprocess
import sys

import pytest

from vramplan.profile import _store as store

TINY = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
CLOSED = "Error: cannot write the output: stdout is closed (hint: run it with stdout open, or redirect it to a file)\n"
FULL = ("Error: cannot write the output: No space left on device (hint: check where stdout goes (a full disk?), or "
        "redirect it elsewhere)\n")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from test_compare import gpu_shaped

    folder = tmp_path_factory.mktemp("records")
    store.write_record(gpu_shaped(1.10), folder)
    return str(folder)


# print_json, a rich table, and the compare tables written with sys.stdout.write
COMMANDS = [["estimate", TINY, "--json"], ["models"], ["compare", "{records}", "--markdown"]]


def vramplan(argv, redirect: str) -> subprocess.CompletedProcess:
    cmd = " ".join([sys.executable, "-m", "vramplan.cli", *argv, redirect])
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"})


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_closed_stdout_is_one_error_line(argv, records):
    done = vramplan([a.format(records=records) for a in argv], ">&-")
    assert (done.returncode, done.stderr) == (1, CLOSED)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", COMMANDS)
def test_a_full_stdout_is_one_error_line(argv, records):
    done = vramplan([a.format(records=records) for a in argv], "> /dev/full")
    assert (done.returncode, done.stderr) == (1, FULL)


def test_without_stderr_either_it_still_fails():
    done = vramplan(["models"], ">&- 2>&-")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "")


@pytest.mark.parametrize("reader", ["head -1 > /dev/null", "true"])
def test_json_to_a_reader_that_stops_early_ends_with_0(reader):
    """`true` reads nothing and is gone before the interpreter has started: the write (or the
    flush main() makes before it returns) meets a closed pipe, whatever the output's size."""
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m vramplan.cli gpus --json | {reader}; "
                                         "echo ${PIPESTATUS[0]}"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (done.stdout, done.stderr) == ("0\n", "")


def test_an_error_of_the_command_is_not_an_output_error():
    done = vramplan(["estimate", "no-such-model"], ">&-")
    assert done.returncode == 1 and done.stderr.startswith("Error: unknown model 'no-such-model'")
