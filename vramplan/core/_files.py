"""Where a command writes a file it was asked for (`--csv`): a regular file, or a new one in an
existing folder. The file is written whole or not at all, through a temporary file renamed over
the path, and a rename replaces whatever the path names: a link is therefore followed to the file
it points to (the link stays), and a device, a named pipe or a folder is refused."""
from __future__ import annotations

import errno
from pathlib import Path

from vramplan.core._errors import UsageError


def file_destination(dest: str, flag: str, example: str = "table.csv") -> Path:
    """The path to rename the finished file onto, or a UsageError naming `flag` (its hint shows
    `flag example`)."""
    path = Path(dest)
    try:
        if path.is_symlink():
            path = path.resolve()
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file (a device or a named pipe)"
            raise UsageError(f"{flag} {dest} is {what}", hint=f"give a file name, e.g. {flag} {example}")
        if not path.parent.is_dir():
            what = "is not a folder" if path.parent.exists() else "does not exist"
            raise UsageError(f"{flag} {dest}: {path.parent} {what}", hint="write the file into an existing folder")
    except (OSError, RuntimeError) as exc:
        # Path.resolve() raises RuntimeError("Symlink loop ...") on a loop of links before Python
        # 3.13, OSError(ELOOP) from 3.13; exists() and is_file() raise OSError for a name too long
        # or a folder that may not be searched
        loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
        reason = "a loop of symbolic links" if loop else (exc.strerror or str(exc))
        raise UsageError(f"{flag} {dest} cannot be written: {reason}",
                         hint=f"give a file name, e.g. {flag} {example}") from None
    return path
