"""A graph's CPU kernels built as a few libraries (``kernel_batches``): the same results as
inductor's one library a kernel, at most one library per compile thread, and inductor's own
build wherever a kernel or a library does not fit."""

import sys
import warnings

import pytest
import torch

from avalanche_cliphinge import kernel_batches
from avalanche_cliphinge.kernel_batches import argument, batchable, batched_cpu_kernels, split

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="kernels are batched on Linux only")

KERNEL = """#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0, float* out_ptr0, const int64_t ks0)
{
    for (int64_t i = 0; i < ks0; ++i) out_ptr0[i] = in_ptr0[i] * 2.0f;
}
"""


def test_kernels_are_split_largest_first_into_groups_of_about_equal_size():
    # sizes 9, 7, 5, 3, 1 into 2 groups: 9 -> g0, 7 -> g1, 5 -> g1 (7 < 9), 3 -> g0 (9 < 12),
    # 1 -> g0 (12 = 12, the lower group): g0 = {0, 3, 4} (13), g1 = {1, 2} (12)
    assert split([9, 7, 5, 3, 1], 2) == [[0, 3, 4], [1, 2]]
    assert split([4, 4], 8) == [[0], [1]]
    assert split([1, 2, 3], 1) == [[0, 1, 2]]


def test_only_kernels_as_inductor_writes_them_are_batched():
    assert batchable(["const float*", "float*", "const int64_t"], KERNEL)
    assert not batchable(["const float*", "float*", "const double"], KERNEL)
    assert not batchable(["const float*"], KERNEL + KERNEL)
    assert not batchable(["const float*"], KERNEL.replace("{\n", '{\n#include "x.h"\n', 1))
    assert not batchable(["const float*"], KERNEL + 'extern "C" int helper() { return 1; }\n')
    with pytest.raises(ValueError, match="double"):
        argument("const double", 0)


def test_a_library_holds_each_kernel_in_its_namespace_under_its_number():
    source = kernel_batches.library_source(
        [(3, ["const float*", "float*", "const int64_t"], KERNEL), (5, ["float*"], KERNEL)]
    )
    assert source.count("#include <torch/csrc/inductor/cpp_prefix.h>") == 1
    assert 'namespace kernel_batch_3 {\n\nextern "C" void kernel_3(' in source
    assert 'namespace kernel_batch_5 {\n\nextern "C" void kernel_5(' in source
    assert "kernel_batch_3::kernel_3(static_cast<const float*>" not in source
    assert (
        "kernel_batch_3::kernel_3(static_cast<float*>(tensor_data(PyTuple_GET_ITEM(args, 0)))"
        in source
    )
    assert "checked<int64_t>(PyLong_AsSsize_t(PyTuple_GET_ITEM(args, 2)))" in source
    assert '{"kernel_5", call_5, METH_VARARGS, nullptr}' in source


def several_kernels(x, w):
    a = torch.softmax(x, dim=-1)
    b = torch.relu(a @ w) * 3.0
    return b.sum(dim=0), a.amax(dim=1), (x - x.mean()).abs().cumsum(dim=0)


def compiled(batched: bool, x, w, cache, monkeypatch):
    """``several_kernels`` compiled by inductor with an empty compile cache of its own (a
    folder the process has not loaded generated code from)."""
    from avalanche_cliphinge.capture import fresh

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    graph = torch.compile(fresh(several_kernels), fullgraph=True, dynamic=False)
    if batched:
        with batched_cpu_kernels():
            return graph(x, w)
    return graph(x, w)


@pytest.fixture
def built(monkeypatch):
    """The kernel count of each library ``kernel_batches`` writes, in order."""
    counts = []
    real = kernel_batches.library_source
    monkeypatch.setattr(
        kernel_batches,
        "library_source",
        lambda kernels: counts.append(len(kernels)) or real(kernels),
    )
    return counts


def test_batched_kernels_give_inductors_results_bit_for_bit(built, tmp_path, monkeypatch):
    from torch._inductor.async_compile import get_compile_threads

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 19, generator=generator)
    w = torch.randn(19, 11, generator=generator)
    alone = compiled(False, x, w, tmp_path / "alone", monkeypatch)
    assert built == []
    together = compiled(True, x, w, tmp_path / "together", monkeypatch)
    assert sum(built) >= 2
    assert len(built) == min(get_compile_threads(), sum(built))
    for mine, theirs, eager in zip(together, alone, several_kernels(x, w)):
        assert torch.equal(mine, theirs)
        torch.testing.assert_close(mine, eager)


def test_a_library_that_fails_to_build_leaves_its_kernels_to_inductor(tmp_path, monkeypatch):
    real = kernel_batches.library_source
    monkeypatch.setattr(
        kernel_batches, "library_source", lambda kernels: real(kernels) + "\nthis is not C++;\n"
    )
    x = torch.linspace(-2, 2, 60).reshape(6, 10)
    w = torch.linspace(1, -1, 30).reshape(10, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(True, x, w, tmp_path, monkeypatch)
    messages = [
        str(item.message) for item in caught if "as one library failed" in str(item.message)
    ]
    assert messages and "building each alone, as inductor does" in messages[0]
    for mine, eager in zip(out, several_kernels(x, w)):
        torch.testing.assert_close(mine, eager)


def test_with_one_compile_thread_inductor_builds_each_kernel(built, tmp_path, monkeypatch):
    x = torch.linspace(-1, 3, 40).reshape(8, 5)
    w = torch.linspace(2, -2, 15).reshape(5, 3)
    # inductor's config patch (monkeypatch's undo deletes a config module's attribute)
    with torch._inductor.config.patch(compile_threads=1):
        out = compiled(True, x, w, tmp_path, monkeypatch)
    assert built == []
    for mine, eager in zip(out, several_kernels(x, w)):
        torch.testing.assert_close(mine, eager)


def test_inductors_own_build_is_back_once_the_batching_is_closed():
    from torch._inductor.async_compile import AsyncCompile

    before = AsyncCompile.cpp_pybinding
    with batched_cpu_kernels():
        assert AsyncCompile.cpp_pybinding is not before
    assert AsyncCompile.cpp_pybinding is before
