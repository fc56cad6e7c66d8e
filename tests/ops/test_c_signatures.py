"""The ctypes signature tables (``peer.ops.cpu.LIB``, ``peer.train.adamw_kernel.LIB``) match the C functions
they bind, argument by argument: a mismatch would pass wrong values to the kernels without any error, so
this reads the C sources (no compiler needed) and fails on any difference in count, width or kind."""

from __future__ import annotations

import ctypes
import re

import pytest

from peer.ops import cpu
from peer.train import adamw_kernel

_C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double}


def _c_functions(source: str) -> dict[str, tuple[list[object], object]]:
    """name -> (ctypes argtypes, restype) of every function defined in the ``extern "C"`` blocks."""
    out = {}
    for block in re.findall(r'extern "C" \{(.*?)\}\s*//\s*extern "C"', source, flags=re.S):
        body = re.sub(r"//[^\n]*", "", block)
        for ret, name, args in re.findall(r"^(\w+)\s+(peer_\w+)\(([^)]*)\)\s*\{", body, flags=re.M):
            types = []
            for arg in " ".join(args.split()).split(","):
                decl = arg.strip().removeprefix("const ").strip()
                kind = decl.rsplit(" ", 1)[0].strip() if " " in decl else decl
                types.append(ctypes.c_void_p if "*" in decl else _C_TYPES[kind])
            out[name] = (types, _C_TYPES[ret])
    return out


@pytest.mark.parametrize("lib", [cpu.LIB, adamw_kernel.LIB], ids=lambda lib: lib.name)
def test_every_ctypes_signature_matches_its_c_function(lib):
    declared = {}
    for src in lib.sources:
        declared.update(_c_functions(src.read_text(encoding="utf-8")))
    assert set(lib.signatures) == set(declared), 'bound functions and the sources\' extern "C" functions differ'
    for name, (argtypes, restype) in lib.signatures.items():
        c_args, c_ret = declared[name]
        assert len(argtypes) == len(c_args), f"{name}: {len(argtypes)} ctypes arguments, {len(c_args)} in C"
        for i, (a, b) in enumerate(zip(argtypes, c_args, strict=True)):
            assert a is b, f"{name} argument {i}: ctypes {a.__name__}, C {b.__name__}"
        assert restype is c_ret, f"{name}: returns {c_ret.__name__} in C, {restype.__name__} in the table"


def test_the_check_fails_on_a_wrong_table():
    # the test above can fail: a table with one argument too few, or a float where C takes int64_t
    source = 'extern "C" {\nint peer_f(const float* x, int64_t n, float lr) {\n  return 0;\n}\n}  // extern "C"\n'
    declared = _c_functions(source)
    assert declared == {"peer_f": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_float], ctypes.c_int)}
    assert declared["peer_f"][0] != [ctypes.c_void_p, ctypes.c_float, ctypes.c_float]
