import pytest

from vramplan.core._errors import UsageError
from vramplan.core._units import format_bytes, parse_size


@pytest.mark.parametrize("text, expected", [
    ("48GB", 48 * 10**9),
    ("48 GB", 48 * 10**9),
    ("24GiB", 24 * 2**30),
    ("24gib", 24 * 2**30),
    ("80G", 80 * 10**9),
    ("1.5TB", 15 * 10**11),
    ("512MiB", 512 * 2**20),
    ("1024", 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_gb_and_gib_differ():
    assert parse_size("48GB") != parse_size("48GiB")
    assert parse_size("48GiB") - parse_size("48GB") == 3_539_607_552


@pytest.mark.parametrize("text", ["", "GB", "48XB", "-4GB", "0GB", "four GB", "4..5GB"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_format_bytes_names_its_unit():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(3 * 10**9, "GB") == "3.00 GB"


def test_bad_units_and_amounts_are_the_projects_errors():
    from vramplan.core._errors import UsageError
    from vramplan.core._units import format_bytes

    with pytest.raises(UsageError, match=r"unknown unit 'XB' \(hint: B, KB, MB, GB, TB"):
        format_bytes(5, "XB")
    with pytest.raises(UsageError, match="bytes must be a number, got 'x'"):
        format_bytes("x")


def test_a_callers_gpu_with_no_memory_is_refused():
    from vramplan import Gpu, estimate
    from vramplan.core._errors import UsageError

    for memory in (-5, 0, 2.5e9, None):
        with pytest.raises(UsageError, match="memory_bytes must be a positive whole number"):
            estimate("Qwen/Qwen3-0.6B", gpu=Gpu("mine", memory))
    assert estimate("Qwen/Qwen3-0.6B", gpu=Gpu("mine", 24 * 2**30)).gpu.name == "mine"
