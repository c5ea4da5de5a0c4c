"""The Python protocol constants must equal the UAPI header the kernel uses.

The header is compiled with the host C compiler, so values, struct sizes,
field offsets and field widths are what C sees, not what a regex guesses.
"""

from __future__ import annotations

import re
from enum import IntEnum, IntFlag
from pathlib import Path

import pytest

from netblk.protocol import constants
from tests.c_program import c_program_output

HEADER = Path(__file__).resolve().parents[2] / "kmod/include/uapi/linux/netblk.h"

#: C name prefix -> the Python enum holding those names (longest prefix wins).
ENUM_PREFIXES: dict[str, type[IntEnum] | type[IntFlag]] = {
    "NETBLK_GENL_CMD_": constants.GenlCmd,
    "NETBLK_GENL_A_": constants.GenlAttr,
    "NETBLK_CMD_FLAG_": constants.CmdFlag,
    "NETBLK_CMD_": constants.Cmd,
    "NETBLK_EXPORT_": constants.ExportFlag,
    "NETBLK_LOGIN_": constants.LoginStatus,
    "NETBLK_E": constants.Errno,
}
STRUCTS = {s.c_name: s for s in constants.WIRE_STRUCTS}


def header_defines() -> list[str]:
    """Integer constants: #defines and enumerators (not the __*_MAX sentinels)."""
    text = HEADER.read_text()
    names = re.findall(r"^#define\s+(NETBLK_\w+)\s+[^\s\"]", text, re.MULTILINE)
    for body in re.findall(r"^enum netblk_\w+ \{(.*?)^\};", text, re.S | re.M):
        names += re.findall(r"^\s*(NETBLK_\w+)", body, re.M)
    return names


def header_strings() -> dict[str, str]:
    """String #defines, with their literal values."""
    return dict(re.findall(r'^#define\s+(NETBLK_\w+)\s+"([^"]*)"', HEADER.read_text(), re.M))


def header_structs() -> dict[str, list[str]]:
    text = HEADER.read_text()
    found = {}
    for name, body in re.findall(r"^struct (netblk_\w+) \{(.*?)^\};", text, re.S | re.M):
        found[name] = re.findall(r"^\s*__\w+\s+(\w+);", body, re.M)
    return found


def python_value(c_name: str) -> int:
    """The Python mirror of one C constant; KeyError/AttributeError if missing."""
    for prefix, enum in sorted(ENUM_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        member = c_name.removeprefix(prefix)
        if c_name.startswith(prefix) and member in enum.__members__:
            return int(enum[member])
    return int(getattr(constants, c_name.removeprefix("NETBLK_")))


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Compile a program that prints every constant and struct layout fact."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/netblk.h>"]
    lines.append("int main(void) {")
    for name in header_defines():
        lines.append(f'printf("{name} %lld\\n", (long long)({name}));')
    for name in header_strings():
        lines.append(f'printf("{name} %s\\n", {name});')
    for struct, fields in header_structs().items():
        lines.append(f'printf("sizeof:{struct} %zu\\n", sizeof(struct {struct}));')
        for field in fields:
            lines.append(
                f'printf("offsetof:{struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));'
            )
            lines.append(
                f'printf("width:{struct}.{field} %zu\\n", sizeof(((struct {struct} *)0)->{field}));'
            )
    lines.append("return 0; }")
    include = str(HEADER.parents[1])
    out = c_program_output(
        tmp_path_factory.mktemp("uapi"), "\n".join(lines), "-Wall", "-Werror", "-I", include
    )
    return dict(line.split() for line in out.splitlines())


def test_header_has_constants_and_structs() -> None:
    assert len(header_defines()) > 40
    assert set(header_structs()) == set(STRUCTS)


@pytest.mark.parametrize("c_name", header_defines())
def test_every_c_constant_is_mirrored(c_facts: dict[str, str], c_name: str) -> None:
    assert str(python_value(c_name)) == c_facts[c_name]


@pytest.mark.parametrize("c_name", sorted(header_strings()))
def test_every_c_string_is_mirrored(c_facts: dict[str, str], c_name: str) -> None:
    assert getattr(constants, c_name.removeprefix("NETBLK_")) == c_facts[c_name]


def test_every_python_enum_member_is_in_the_header(c_facts: dict[str, str]) -> None:
    for prefix, enum in ENUM_PREFIXES.items():
        for member in enum.__members__:
            assert f"{prefix}{member}" in c_facts, f"{enum.__name__}.{member} is not in the header"


@pytest.mark.parametrize("c_name", sorted(STRUCTS))
def test_struct_layout_matches(c_facts: dict[str, str], c_name: str) -> None:
    wire = STRUCTS[c_name]
    assert list(wire.fields) == header_structs()[c_name]
    assert str(wire.size) == c_facts[f"sizeof:{c_name}"]
    codes = wire.layout.format.lstrip(">")
    for (field, offset), code in zip(wire.offsets().items(), codes, strict=True):
        assert str(offset) == c_facts[f"offsetof:{c_name}.{field}"], field
        assert str(constants.struct.calcsize(code)) == c_facts[f"width:{c_name}.{field}"], field
