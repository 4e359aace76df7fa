"""The C kernel (kernels/icv_shift_cpu.c) against the §2 transcription and
the torch version, and its refusals of bad inputs."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest
import torch

from icv_vllm.kernels import cpu_kernel, icv_shift_cpu, icv_shift_torch

from .test_icv_shift import DTYPES, TOL, bits, check, hand_case, make_case

needs_c_kernel = pytest.mark.skipif(not cpu_kernel.AVAILABLE, reason="C kernel off: not built (no C compiler?) or ICV_VLLM_CPU_KERNEL=0")


def test_c_kernel_is_built_where_a_compiler_exists():
    """Installing the package builds it whenever a C compiler is on the PATH;
    a silent fallback to the slower torch path would otherwise go unnoticed."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the torch path is expected")
    if os.environ.get(cpu_kernel.DISABLE_ENV) == "0":
        pytest.skip(f"switched off by {cpu_kernel.DISABLE_ENV}=0")
    try:
        importlib.metadata.distribution("icv-vllm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kernels imported from a bare checkout (benchmarks/gpu_check.sh): nothing was built")
    assert cpu_kernel.AVAILABLE, "C compiler present but icv_vllm.kernels._icv_shift_cpu is missing: reinstall"


@needs_c_kernel
def test_hand_computation():
    (hidden, *rest), expected = hand_case()
    icv_shift_cpu(hidden, *rest)
    torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=1e-6)


@needs_c_kernel
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d in cpu_kernel._DTYPE_CODES], ids=str)
@pytest.mark.parametrize("D", [576, 64, 33])
def test_matches_reference_and_torch(dtype, D):
    """Every awkward feature of make_case (K = 1..4 with gaps, negative scales,
    zero x, zero v, -1 tokens, x near +-v); D = 33 leaves a tail after the
    32-wide partial sums."""
    case = make_case(T=40, D=D, dtype=dtype, seed=D)
    out = check(icv_shift_cpu, case)[0]
    torch_out = case[0].clone()
    icv_shift_torch(torch_out, *case[1:])
    torch.testing.assert_close(out, torch_out, **TOL[dtype])


@needs_c_kernel
def test_fp16_available_with_a_modern_compiler():
    assert torch.float16 in cpu_kernel._DTYPE_CODES  # GCC >= 12 / clang >= 15 know _Float16


@needs_c_kernel
def test_rows_with_a_stride_and_untouched_rest():
    """hidden may be a view with row stride > D (vLLM slices a padded buffer)."""
    hidden, rows, slots, scales, layer_bits, bank, layer = make_case(T=16, D=64)
    wide = torch.randn(16, 80)
    wide[:, :64] = hidden
    view = wide[:, :64]
    before = wide.clone()
    icv_shift_cpu(view, rows, slots, scales, layer_bits, bank, layer)
    expected = hidden.clone()
    icv_shift_torch(expected, rows, slots, scales, layer_bits, bank, layer)
    torch.testing.assert_close(view, expected, **TOL[torch.float32])
    assert torch.equal(bits(wide[:, 64:]), bits(before[:, 64:]))


@needs_c_kernel
def test_bad_tables_are_errors_not_wild_reads():
    """Refused before anything is written (token 0 is fine, a later one is not)."""
    hidden, rows, slots, scales, layer_bits, bank, layer = make_case(T=8, D=32)
    out = hidden.clone()
    with pytest.raises(IndexError, match="token 1 names row 99; the tables have 11"):
        icv_shift_cpu(out, torch.tensor([0, 99] + [-1] * 6, dtype=torch.int32), slots, scales, layer_bits, bank, layer)
    assert torch.equal(bits(out), bits(hidden))
    bad_slots = slots.clone()
    bad_slots[2, 6] = 6  # an add column
    with pytest.raises(IndexError, match="row 2 names slot 6; the bank has 6"):
        icv_shift_cpu(out, rows, bad_slots, scales, layer_bits, bank, layer)
    assert torch.equal(bits(out), bits(hidden))
    with pytest.raises(ValueError, match="layer 3 of 3"):
        icv_shift_cpu(hidden.clone(), rows, slots, scales, layer_bits, bank, 3)
    with pytest.raises(TypeError, match="int32"):
        icv_shift_cpu(hidden.clone(), rows.long(), slots, scales, layer_bits, bank, layer)
    with pytest.raises(ValueError, match="tables do not fit"):
        icv_shift_cpu(hidden.clone(), rows, slots[:, :4], scales[:, :4], layer_bits, bank, layer)
    with pytest.raises(ValueError, match="tables do not fit"):
        icv_shift_cpu(hidden.clone(), rows, slots, scales, layer_bits[:4], bank, layer)
    with pytest.raises(ValueError, match="contiguous"):
        icv_shift_cpu(hidden.clone(), rows, slots, scales, layer_bits, bank[:, :, :16], layer)
    with pytest.raises(ValueError, match="cannot take"):
        icv_shift_cpu(hidden.t(), rows, slots, scales, layer_bits, bank, layer)


def test_switched_off_by_environment():
    code = ("import torch; from icv_vllm.kernels import cpu_kernel; "
            "assert not cpu_kernel.AVAILABLE and not cpu_kernel.supports(torch.zeros(2, 2))")
    env = {**os.environ, cpu_kernel.DISABLE_ENV: "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_portable_build_matches_too(tmp_path):
    """The installed module picks AVX2+FMA code where the CPU has it; build the
    baseline (SSE2) code alone, as other CPUs run it, and compare."""
    import importlib.util
    import sysconfig
    from pathlib import Path

    source = Path(cpu_kernel.__file__).with_name("icv_shift_cpu.c")
    target = tmp_path / ("_icv_shift_cpu" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["cc", "-O3", "-fno-math-errno", "-Wno-psabi", "-DICV_PORTABLE_ONLY", "-shared", "-fPIC",
                    f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target)], check=True)
    spec = importlib.util.spec_from_file_location("_icv_shift_cpu", target)
    portable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    for dtype in (torch.float32, torch.bfloat16):
        hidden, rows, slots, scales, layer_bits, bank, layer = make_case(T=40, D=576, dtype=dtype, seed=5)
        out = hidden.clone()
        portable.shift(out.data_ptr(), 40, 576, 576, cpu_kernel._DTYPE_CODES[dtype], rows.data_ptr(),
                       slots.data_ptr(), 8, scales.data_ptr(), 8, layer_bits.data_ptr(), 8, 1, 1, len(slots),
                       bank.data_ptr(), bank.shape[0], bank.shape[1], layer, 1)
        expected = hidden.clone()
        icv_shift_torch(expected, rows, slots, scales, layer_bits, bank, layer)
        torch.testing.assert_close(out, expected, **TOL[dtype])


@needs_c_kernel
def test_bound_tables_follow_refills_and_a_regrown_bank():
    """The plugin binds its persistent buffers once; each call must read the
    tables' current contents and whatever bank tensor it is given."""
    hidden, rows, slots, scales, layer_bits, bank, layer = make_case(T=16, D=64, seed=3)
    token_rows, entry_slots, entry_scales = rows.clone(), torch.full_like(slots, -1), torch.zeros_like(scales)
    bound = cpu_kernel.BoundTables(token_rows, entry_slots, entry_scales, layer_bits)
    out = hidden.clone()
    bound(out, bank, layer)  # tables still empty: nothing to do
    assert torch.equal(bits(out), bits(hidden))
    entry_slots.copy_(slots)
    entry_scales.copy_(scales)
    grown = torch.cat([bank, torch.randn(6, *bank.shape[1:])])  # a new, larger tensor
    bound(out, grown, layer)
    expected = hidden.clone()
    icv_shift_torch(expected, rows, slots, scales, layer_bits, bank, layer)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    with pytest.raises(ValueError, match="tables do not fit: 22 tokens, token_rows has 21"):
        bound(torch.zeros(22, 64), bank, layer)


@needs_c_kernel
def test_bound_tables_decline_what_they_cannot_take():
    hidden, rows, slots, scales, layer_bits, bank, layer = make_case(T=8, D=32)
    bound = cpu_kernel.BoundTables(rows, slots, scales, layer_bits)
    strided = hidden.t().contiguous().t()
    assert bound(strided, bank, layer) is False and torch.equal(strided, hidden)
    assert bound(hidden.clone(), bank, layer) is True


@needs_c_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_in_a_later_bit_word(dtype):
    """Layer 35 of 40: its switch is bit 3 of the second int32 word."""
    case = make_case(T=30, D=48, dtype=dtype, seed=11, layer=35, L=40)
    out = check(icv_shift_cpu, case)[0]
    torch_out = case[0].clone()
    icv_shift_torch(torch_out, *case[1:])
    torch.testing.assert_close(out, torch_out, **TOL[dtype])


@needs_c_kernel
def test_threads_come_from_torch_and_one_openmp_runtime():
    """Built with OpenMP and bound to the runtime torch loaded: one pool. A
    large call split over threads equals the one-thread result bit for bit
    (each token is computed alone, in the same order)."""
    assert cpu_kernel._ext.HAVE_OPENMP, "built without OpenMP: the kernel would use one core"
    assert cpu_kernel.torch_omp_entry() == cpu_kernel._ext.OMP_ENTRY and cpu_kernel.THREADED, cpu_kernel.THREADS_NOTE
    T = cpu_kernel._ext.MIN_PARALLEL_ELEMENTS // 64 + 7  # large enough to split, with a remainder
    hidden, rows, slots, scales, layer_bits, bank, layer = make_case(T=T, D=64, dtype=torch.bfloat16, seed=4)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out = hidden.clone()
            icv_shift_cpu(out, rows, slots, scales, layer_bits, bank, layer)
            outs.append(out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(outs[0]), bits(outs[1])) and not torch.equal(outs[0], hidden)
