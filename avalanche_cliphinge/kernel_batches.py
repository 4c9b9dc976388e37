"""A captured graph's CPU kernels built as a few shared libraries instead of one each.

Inductor builds every C++ kernel of a graph as its own library. On a small CPU most of each
build is fixed cost: g++ loads inductor's precompiled header (about 160 MB) and parses
Python's header for the kernel's binding, about 0.5 s a kernel of a typical 0.6 s, on one
core. ``batched_cpu_kernels`` gathers the kernels a graph's code asks for and builds them as
one library per compile thread (largest first, sizes balanced): the fixed cost is paid once
a library. The kernels' code and compiler flags are inductor's; each kernel sits in a
namespace of its own, under a name of its own, and the library's Python binding passes each
its tensors' data and its integers as inductor's own binding does. A kernel whose code does
not have the one entry point inductor writes is left to inductor; so is a library whose build
fails (each of its kernels is built alone, as inductor does), and every kernel where inductor
compiles on one thread (``TORCHINDUCTOR_COMPILE_THREADS=1``: its code then calls each kernel
as it is returned, with no wait for the lot).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ENTRY = re.compile(r'extern "C"\s+void\s+kernel\s*\(')
PREFIX = "#include <torch/csrc/inductor/cpp_prefix.h>"


def argument(kind: str, index: int) -> str:
    """C++ that reads positional argument ``index`` of a binding as C++ type ``kind``
    (inductor's kinds: a pointer, ``int64_t``, ``uintptr_t`` or ``float``)."""
    kind = kind.replace("const ", "").strip()
    item = f"PyTuple_GET_ITEM(args, {index})"
    if kind.endswith("*"):
        return f"static_cast<{kind}>(tensor_data({item}))"
    if kind == "int64_t":
        return f"checked<int64_t>(PyLong_AsSsize_t({item}))"
    if kind == "uintptr_t":
        return f"reinterpret_cast<uintptr_t>(checked<void*>(PyLong_AsVoidPtr({item})))"
    if kind == "float":
        return f"static_cast<float>(checked<double>(PyFloat_AsDouble({item})))"
    raise ValueError(f"no binding for a kernel argument of type {kind!r}")


BINDING_HEAD = """
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cstdlib>
#include <stdexcept>

static void* (*tensor_data)(PyObject*);

template <typename T> static inline T checked(T value) {
    if (PyErr_Occurred()) [[unlikely]] throw std::runtime_error("a kernel argument has the wrong type");
    return value;
}
"""

BINDING_CALL = """
static PyObject* call_{i}(PyObject*, PyObject* args) {{
    try {{
        if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != {count}) [[unlikely]]
            throw std::runtime_error("kernel_{i} takes {count} arguments");
        kernel_batch_{i}::kernel_{i}({arguments});
        Py_RETURN_NONE;
    }} catch (std::exception const& error) {{
        PyErr_SetString(PyExc_RuntimeError, error.what());
        return nullptr;
    }}
}}
"""

BINDING_MODULE = """
static PyMethodDef methods[] = {{
{methods}
    {{nullptr, nullptr, 0, nullptr}}}};

static struct PyModuleDef module_def = {{PyModuleDef_HEAD_INIT, "kernels", nullptr, -1, methods}};

PyMODINIT_FUNC PyInit_kernels(void) {{
    const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    if (address == nullptr) {{
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR is not set");
        return nullptr;
    }}
    tensor_data = reinterpret_cast<void* (*)(PyObject*)>(std::strtoull(address, nullptr, 10));
    return PyModule_Create(&module_def);
}}
"""


def library_source(kernels: Sequence[Tuple[int, List[str], str]]) -> str:
    """One C++ source for ``kernels`` ((number, argument types, inductor's kernel source)):
    each kernel in namespace ``kernel_batch_<number>`` as ``kernel_<number>``, then a Python
    module ``kernels`` whose function ``kernel_<number>`` calls it."""
    parts = [PREFIX]
    calls = []
    methods = []
    for number, kinds, code in kernels:
        body = ENTRY.sub(f'extern "C" void kernel_{number}(', code.replace(PREFIX, ""), count=1)
        parts.append(f"namespace kernel_batch_{number} {{\n{body}\n}}")
        arguments = ", ".join(argument(kind, index) for index, kind in enumerate(kinds))
        calls.append(BINDING_CALL.format(i=number, count=len(kinds), arguments=arguments))
        methods.append(f'    {{"kernel_{number}", call_{number}, METH_VARARGS, nullptr}},')
    return "\n".join(
        parts + [BINDING_HEAD] + calls + [BINDING_MODULE.format(methods="\n".join(methods))]
    )


def batchable(kinds: Sequence[str], code: str) -> bool:
    """Whether a kernel's code can go into a library of several: one entry point as inductor
    writes it, no other C linkage, no include but inductor's prefix, arguments of kinds the
    binding reads."""
    rest = ENTRY.sub("", code, count=1)
    if len(ENTRY.findall(code)) != 1 or 'extern "C"' in rest:
        return False
    if "#include" in rest.replace(PREFIX, ""):
        return False
    try:
        for kind in kinds:
            argument(kind, 0)
    except ValueError:
        return False
    return True


def split(sizes: Sequence[int], groups: int) -> List[List[int]]:
    """Indices of ``sizes`` in at most ``groups`` groups of about equal total size (largest
    first, each to the lightest group; ties by index), each group's indices ascending."""
    groups = max(1, min(groups, len(sizes)))
    loads = [0] * groups
    members: List[List[int]] = [[] for _ in range(groups)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(groups), key=lambda g: (loads[g], g))
        loads[lightest] += sizes[index]
        members[lightest].append(index)
    return [sorted(group) for group in members if group]


class Batch:
    """The kernels one graph's code asked for, built together at the first kernel it needs."""

    def __init__(self, compiler):
        self.compiler = compiler
        self.kernels: List[Tuple[List[str], str]] = []
        self.built: Dict[int, Callable] = {}

    def add(self, kinds: List[str], code: str) -> int:
        self.kernels.append((list(kinds), code))
        return len(self.kernels) - 1

    def kernel(self, index: int) -> Callable:
        if not self.built:
            self.build()
        return self.built[index]

    def build(self) -> None:
        from torch._inductor.async_compile import get_compile_threads

        groups = split([len(code) for _, code in self.kernels], get_compile_threads())
        started = [
            (group, start_library([(i, *self.kernels[i]) for i in group])) for group in groups
        ]
        for group, loaded in started:
            try:
                module = loaded()
            except Exception as error:
                warnings.warn(
                    f"compile_step: building {len(group)} CPU kernels as one library failed "
                    f"({type(error).__name__}: {str(error)[:300]}); building each alone, as "
                    "inductor does",
                    stacklevel=2,
                )
                module = None
            for i in group:
                if module is not None:
                    self.built[i] = getattr(module, f"kernel_{i}")
                else:
                    self.built[i] = self.compiler(*self.kernels[i])


@functools.cache
def library_cache():
    """Inductor's cache of C++ libraries with a Python binding, for modules named ``kernels``
    (``library_source``'s): its compiler flags, precompiled header, locks and files."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class Batched(CppPythonBindingsCodeCache):
        cache: dict = {}
        entry_function = "kernels"

    return Batched


def start_library(kernels) -> Callable:
    """Start building ``library_source(kernels)`` on inductor's compile threads; returns what
    gives the loaded module (and raises what stopped the build)."""
    from torch._inductor.async_compile import AsyncCompile

    try:
        return library_cache().load_async(library_source(kernels), submit_fn=AsyncCompile.submit)
    except Exception as error:
        problem = error  # the except clause unbinds ``error`` at its end

    def failed():
        raise problem

    return failed


@contextlib.contextmanager
def batched_cpu_kernels():
    """While open, inductor's CPU kernels of each graph's code are built as
    ``batched_cpu_kernels``' libraries (Linux only; elsewhere, as inductor builds them)."""
    if sys.platform != "linux":
        yield
        return
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads
    from torch._inductor.codecache import LambdaFuture

    original = AsyncCompile.cpp_pybinding
    open_batch: Optional[Batch] = None

    def cpp_pybinding(self, argtypes, source_code):
        nonlocal open_batch
        if get_compile_threads() <= 1 or not batchable(argtypes, source_code):
            return original(self, argtypes, source_code)
        if open_batch is None or open_batch.built:
            open_batch = Batch(lambda kinds, code: alone(self, kinds, code))
        batch = open_batch
        index = batch.add(argtypes, source_code)
        return LambdaFuture(lambda: batch.kernel(index))

    def alone(self, argtypes, source_code):
        built = original(self, argtypes, source_code)
        return built.result() if hasattr(built, "result") else built

    AsyncCompile.cpp_pybinding = cpp_pybinding
    try:
        yield
    finally:
        AsyncCompile.cpp_pybinding = original
