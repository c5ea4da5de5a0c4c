"""Compile and run a small C program: how tests prove that a Python mirror of
a C constant or struct layout agrees with the header it comes from."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def c_program_output(workdir: Path, source: str, *cc_args: str) -> str:
    """Build ``source`` in ``workdir`` with the system C compiler (extra
    ``cc_args``), run it, and return what it printed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check C headers"
    program, path = workdir / "probe", workdir / "probe.c"
    path.write_text(source)
    subprocess.run([cc, *cc_args, "-o", str(program), str(path)], check=True)
    return subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout
