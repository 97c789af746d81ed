"""Which files the kernel opens to exec a program: what a ``proc:exec`` grant must make
executable under Landlock.

``execve`` opens the program and, for an ELF file, its interpreter (``PT_INTERP``, the
dynamic loader), or for a ``#!`` script the interpreter named on its first line: each needs
Landlock's EXECUTE right, or the exec fails with EACCES although the program itself was
granted. Shared libraries are opened and mapped by the loader afterwards (read rights, the
worker's implicit reads). Standard library only; reads at most a few hundred bytes.
"""

from __future__ import annotations

import os
import shutil
import struct


def elf_interpreter(path: str) -> str | None:
    """PT_INTERP of a 64- or 32-bit ELF file (the loader the kernel opens to run it), else
    None. Also the MCP guard's, for the server it confines."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2):
                return None
            end = "<" if head[5] == 1 else ">"
            wide = head[4] == 2
            if wide:
                (phoff,) = struct.unpack_from(end + "Q", head, 0x20)
                entsize, count = struct.unpack_from(end + "HH", head, 0x36)
            else:
                (phoff,) = struct.unpack_from(end + "I", head, 0x1C)
                entsize, count = struct.unpack_from(end + "HH", head, 0x2A)
            if count > 256 or entsize < (56 if wide else 32):
                return None
            f.seek(phoff)
            table = f.read(entsize * count)
            for i in range(count):
                at = i * entsize
                if len(table) < at + entsize or struct.unpack_from(end + "I", table, at)[0] != 3:
                    continue
                if wide:
                    offset, size = struct.unpack_from(end + "Q", table, at + 8)[0], \
                        struct.unpack_from(end + "Q", table, at + 32)[0]
                else:
                    offset, size = struct.unpack_from(end + "II", table, at + 4)[0], \
                        struct.unpack_from(end + "I", table, at + 16)[0]
                if size > 4096:
                    return None
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode("utf-8", "replace") or None
    except (OSError, struct.error):
        return None
    return None


def _script_interpreter(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


def program_files(program: str, search_path: str | None = None) -> list[str]:
    """The files the kernel opens to exec ``program``: the program, its ELF interpreter,
    or for a ``#!`` script its interpreter and that one's ELF interpreter. A bare name is
    looked up on ``search_path`` (the worker's PATH; default: this process's)."""
    if "/" in program:
        resolved: str | None = os.path.realpath(program)
    else:
        found = shutil.which(program, path=search_path)
        resolved = os.path.realpath(found) if found else None
    if resolved is None or not os.path.isfile(resolved):
        return []
    files = [resolved]
    script = _script_interpreter(resolved)
    if script is not None and os.path.isfile(script):
        files.append(os.path.realpath(script))
    for target in list(files):
        interp = elf_interpreter(target)
        if interp is not None and os.path.exists(interp):
            files.append(os.path.realpath(interp))
    return files
