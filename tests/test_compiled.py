"""The fused kernels give the same bytes compiled (torch.compile) as eager, so the row-chunk size,
which decides between them, never changes an output."""

from __future__ import annotations

import pytest
import torch

from workers.compiled import COMPILE_MIN_ELEMENTS, Compiler
from workers.kernels import linear, selection, ties


@pytest.fixture(scope="module")
def chunk():
    g = torch.Generator().manual_seed(0)
    n, t = COMPILE_MIN_ELEMENTS // 3 + 1, 3  # T·N just above the compile threshold
    base = torch.randn(n, generator=g).bfloat16()
    noise = torch.randn(t, n, generator=g) * 0.01 * (torch.rand(t, n, generator=g) < 0.5)
    return base, (base.float() + noise).bfloat16()


def _both(kernel, *args, numel, **kwargs):
    return kernel(*args, **kwargs), Compiler().run(kernel, *args, numel=numel, **kwargs)


@pytest.mark.parametrize("sign_by_count,normalize", [(False, True), (True, False)])
def test_ties_merge_compiled_equals_eager(chunk, sign_by_count, normalize):
    base, experts = chunk
    thr = torch.tensor([0.004, 0.006, 0.0])
    cut = torch.tensor([ties.ALL_TIES, 1000, -1])
    eager, fused = _both(ties.ties_merge, base, experts, thr, cut, torch.tensor([1.0, 0.5, 2.0]), torch.tensor(0.7),
                         torch.tensor(-1.0), sign_by_count=sign_by_count, normalize=normalize,
                         out_dtype=torch.float32, numel=experts.numel())
    assert torch.equal(eager, fused)


def test_task_arithmetic_and_histograms_compiled_equal_eager(chunk):
    base, experts = chunk
    eager, fused = _both(linear.task_arithmetic_merge, base, experts, torch.tensor([1.0, 0.5, 2.0]), torch.tensor(0.3),
                         torch.tensor(3.5), out_dtype=torch.bfloat16, numel=experts.numel())
    assert torch.equal(eager, fused)
    eager, fused = _both(selection.high_bucket_ids, base, experts, numel=experts.numel())
    assert torch.equal(eager, fused)


def test_tie_block_counts_compiled_equal_eager_and_the_mask(chunk):
    base, experts = chunk
    thr = torch.tensor([0.0, 0.0039, 0.0])  # a zero |τ| is tied at threshold 0: many ties in every block
    eager, fused = _both(ties.tied_block_counts, base, experts, thr, numel=experts.numel())
    assert torch.equal(eager, fused)
    mask = ties.tied_mask(base, experts, thr)
    whole = mask.shape[1] // ties.TIE_BLOCK * ties.TIE_BLOCK
    assert torch.equal(fused[:, :-1], mask[:, :whole].reshape(3, -1, ties.TIE_BLOCK).sum(2))
    assert torch.equal(fused[:, -1], mask[:, whole:].sum(1))


def test_run_into_writes_the_kernel_result_into_a_reused_buffer(chunk):
    base, experts = chunk
    eager = selection.low_bucket_ids(base, experts, torch.tensor([15300, 15310, 15320], dtype=torch.int32))
    buffer = torch.full((experts.numel() + 7,), -5, dtype=torch.int32)
    out = Compiler().run_into(selection.low_bucket_ids, buffer[: experts.numel()].view(experts.shape), base, experts,
                            torch.tensor([15300, 15310, 15320], dtype=torch.int32), numel=experts.numel())
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(out, eager)
    assert torch.equal(buffer[experts.numel():], torch.full((7,), -5, dtype=torch.int32))


def test_a_compile_failure_turns_off_only_its_own_task(chunk, monkeypatch):
    """A Compiler whose torch.compile fails runs its kernels eagerly; the environment and the next
    task's Compiler are untouched (Ray reuses worker processes)."""
    import os

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    base, experts = chunk
    environment = dict(os.environ)
    monkeypatch.setattr(torch, "compile", broken)
    first = Compiler()
    eager = selection.high_bucket_ids(base, experts)
    assert torch.equal(first.run(selection.high_bucket_ids, base, experts, numel=experts.numel()), eager)
    assert first.enabled is False and dict(os.environ) == environment
    assert Compiler().enabled is True


def test_compile_options_narrow_the_vectors_only_where_the_cpu_is_wider(monkeypatch):
    """Every kernel compiles without vectorised tail loops; a kernel asking for at most 256-bit
    vectors (row_gram) gets them on an AVX-512 CPU and nothing extra on an AVX2 one. The CPU's ISA
    comes from its flags unless the environment says otherwise."""
    from types import SimpleNamespace

    from torch._inductor import config, cpu_vec_isa

    from workers.compiled import COMPILE_OPTIONS, compile_options
    from workers.kernels.diagnostics import row_gram

    for width, expected in [(512, {**COMPILE_OPTIONS, "cpp.simdlen": 256}), (256, COMPILE_OPTIONS)]:
        monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda width=width: SimpleNamespace(bit_width=lambda: width))
        assert compile_options(row_gram) == expected
        assert compile_options(ties.ties_merge) == COMPILE_OPTIONS
    monkeypatch.setattr(config.cpp, "vec_isa_ok", None)
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    compile_options(ties.ties_merge)
    assert config.cpp.vec_isa_ok is None
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK")
    compile_options(ties.ties_merge)
    assert config.cpp.vec_isa_ok is True


def test_random_keep_mask_compiled_equals_eager():
    from workers.kernels.random_masks import keep_mask

    index = torch.arange(1000, 1000 + COMPILE_MIN_ELEMENTS + 5)
    key = torch.tensor(123456789, dtype=torch.int64)
    probability = torch.tensor(0.3, dtype=torch.float64)
    assert torch.equal(keep_mask(key, index, probability), Compiler().run(keep_mask, key, index, probability,
                                                                          numel=index.numel()))


def test_a_task_compiles_only_where_it_pays(tmp_path, monkeypatch):
    from workers.compiled import COMPILE_MIN_TASK_ELEMENTS, compiles

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache: cold
    cold, warm = COMPILE_MIN_TASK_ELEMENTS["cold"], COMPILE_MIN_TASK_ELEMENTS["warm"]
    assert not compiles("where_it_pays", cold - 1) and compiles("where_it_pays", cold)
    (tmp_path / "fxgraph" / "ab").mkdir(parents=True)  # a node whose workers compiled before
    assert not compiles("where_it_pays", warm - 1) and compiles("where_it_pays", warm)
    assert compiles("always", 0) and not compiles("never", 10 * cold)


def test_diagnostics_kernels_compiled_equal_eager(chunk):
    """The diagnostics (workers/diagnostics.py): a merge kernel's counted form writes the same bytes
    as the plain one, and its counts and the row sums are the same bits compiled as eager."""
    from workers.diagnostics import counted_into
    from workers.kernels.diagnostics import grid_bits, row_gram

    base, experts = chunk
    weights, lam = torch.tensor([1.0, 0.5, -2.0]), torch.tensor(0.7)
    ties_args = (torch.tensor([0.004, 0.006, 0.0]), torch.tensor([ties.ALL_TIES, 1000, -1]), weights, lam,
                 torch.tensor(1.0))
    for kernel, args, kwargs in [
            (ties.ties_merge, ties_args, {"sign_by_count": True, "normalize": True, "out_dtype": torch.bfloat16}),
            (linear.task_arithmetic_merge, (weights, lam, torch.tensor(3.5)), {"out_dtype": torch.bfloat16})]:
        plain = Compiler().run(kernel, base, experts, *args, numel=experts.numel(), **kwargs)
        outs = [torch.empty_like(plain), torch.empty_like(plain)]
        eager = counted_into(kernel)(outs[0], base, experts, *args, **kwargs)
        fused = Compiler().run(counted_into(kernel), outs[1], base, experts, *args, numel=experts.numel(), **kwargs)
        assert torch.equal(eager, fused) and torch.equal(outs[0], plain) and torch.equal(outs[1], plain)
    rows, p = 1, base.numel()
    eager, fused = _both(row_gram, base.view(rows, p), experts.view(3, rows, p), plain.view(rows, p), grid_bits(p),
                         numel=experts.numel())
    assert torch.equal(eager, fused)
