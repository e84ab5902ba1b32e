"""One line for people when a memory-mapped model file cannot be read.

The commands read weights through memory maps (``ModelReader.map``; safetensors and mergekit map
files too). If such a file is truncated or replaced while a run reads it, or the disk returns an
I/O error for one of its pages, the access raises SIGBUS, which Python cannot catch: the process
would die with nothing but the shell's "Bus error". The C++ extension's handler writes the line set
here and then lets the signal end the process as before. Importing the extension needs no torch.
"""

from __future__ import annotations


def bus_error_line(prog: str, outcome: str | None) -> str:
    """What a command says when it dies of SIGBUS; ``outcome``: what that leaves of its output."""
    tail = f"; {outcome}" if outcome else ""
    return (f"{prog}: error: a model file could not be read where this run had mapped it (SIGBUS: it was "
            f"truncated or replaced during the run, or the disk returned an I/O error){tail}; run again once "
            "the files are whole")


def explain_bus_errors(line: str) -> bool:
    """Have a SIGBUS write ``line`` to stderr before it ends the process (an empty line: nothing);
    False where it cannot (no C++ extension, or a system without SIGBUS handlers)."""
    try:
        from safemerge_ext import _cpu
    except ImportError:
        return False
    # (bytes: a path that is not valid UTF-8, held with surrogate escapes, is shown escaped)
    try:
        return bool(_cpu.set_fault_message((line + "\n" if line else "").encode("utf-8", "backslashreplace")))
    except (TypeError, ValueError):  # (an extension older than this module: it never stops a run)
        return False
