"""The fused layer's sign kernel: compiled and eager give the same bits; failures fall back loudly."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from xnorpp.engine.memory import MALLOC_POLICIES, find_jemalloc, set_malloc_policy
from xnorpp.nn import binary_sign, kernels


@pytest.fixture
def compiled() -> Iterator[None]:
    """Compiled kernels for one test, then back to the mode and state before it."""
    old = kernels.get_kernels()
    kernels.set_kernels("compiled")
    yield
    kernels.set_kernels(old)


def planted(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Gaussian values on both sides of the window, with the boundary values -1, 1, 0 and -0.0 planted."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5
    x.view(-1)[:6] = torch.tensor([-1.0, 1.0, 0.0, -0.0, -1.0000001, 1.0000001])
    return x


def reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """The definition: sign with sign(0) = +1, code = sign * (1 + [|x| <= 1])."""
    s = torch.where(x >= 0, 1.0, -1.0)
    window = (x.abs() <= 1).to(torch.int8)
    return s, (s.to(torch.int8) * (1 + window)).to(torch.int8)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_sign_code_matches_its_definition(mode: str) -> None:
    old = kernels.get_kernels()
    kernels.set_kernels(mode)
    try:
        x = planted((3, 5, 7, 7))
        s, code = kernels.sign_code(x, torch.float32)
        assert kernels.get_kernels() == mode  # compiling worked where it was asked for
    finally:
        kernels.set_kernels(old)
    ref_s, ref_code = reference(x)
    assert torch.equal(s, ref_s) and torch.equal(code, ref_code)
    assert code.view(-1)[:6].tolist() == [-2, 2, 2, 2, -1, 1]
    assert torch.equal(binary_sign(x), ref_s)


@pytest.mark.parametrize(
    ("shape", "channels_last", "dtype"),
    [((4, 8, 9, 9), False, torch.float32), ((4, 8, 9, 9), True, torch.float32),
     ((16, 8, 1, 1), False, torch.float32), ((2, 3, 5, 5), False, torch.bfloat16), ((37,), False, torch.float32)],
)  # fmt: skip
def test_compiled_sign_code_is_bit_identical_to_eager_and_keeps_the_layout(
    compiled: None, shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype
) -> None:
    x = planted(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s, code = kernels.sign_code(x, dtype)
    eager_s, eager_code = kernels._sign_code(x, dtype)
    assert s.dtype == dtype and code.dtype == torch.int8
    assert torch.equal(s, eager_s) and torch.equal(code, eager_code)
    assert s.stride() == x.stride() and code.stride() == x.stride()  # channels-last stays channels-last


def test_compiled_kernels_take_views_with_offsets_and_the_uint8_variant(compiled: None) -> None:
    base = planted((4, 8, 9, 9))
    for x in (base[1:3], base[:, :, 1:, 2:], base.contiguous(memory_format=torch.channels_last)[2:]):
        s, code = kernels.sign_code(x, torch.float32)
        u, code_u = kernels.sign_code_u8(x)
        ref_s, ref_code = reference(x)
        assert torch.equal(s, ref_s) and torch.equal(code, ref_code) and torch.equal(code_u, ref_code)
        assert u.dtype == torch.uint8 and torch.equal(u, (ref_s + 1).to(torch.uint8))  # 0 or 2
    assert kernels.get_kernels() == "compiled"


def test_warm_up_compiles_every_kernel_a_model_needs_without_touching_the_rng(compiled: None) -> None:
    from torch._dynamo.utils import counters

    from xnorpp.nn.fused import binary_input_conv2d, warm_up_fused

    torch._dynamo.reset()  # forget earlier tests' graphs: the warm-up must compile them
    rng, before = torch.get_rng_state(), counters["stats"]["unique_graphs"]
    warm_up_fused("cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before >= 2  # the input's and the weight's kernels
    for cin, cout, size, cl in [(8, 8, 9, False), (16, 32, 5, True), (64, 64, 1, False), (3, 5, 7, False)]:
        x = planted((2, cin, size, size)).requires_grad_()
        if cl:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(cout, cin, 3, 3, requires_grad=True)
        gamma = torch.ones(cout, 1, 1, requires_grad=True)
        binary_input_conv2d(x, w, None, gamma, (1, 1), (1, 1), (1, 1), 1, True, True).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs  # no compilation (or recompilation) after it


def test_compiled_kernels_resolve_a_lazily_negated_view(compiled: None) -> None:
    x = planted((2, 3, 5, 5))
    neg = torch._neg_view(x)  # reads as -x, stored as x
    assert torch.equal(kernels.sign_code(neg, torch.float32)[1], reference(-x)[1])


def test_kernels_in_a_bf16_input_map_rounded_zeros_to_plus_one() -> None:
    x = torch.tensor([1e-30, -1e-30, 0.0, -0.5], dtype=torch.bfloat16)  # +-1e-30 survive in bf16
    s, code = kernels.sign_code(x, torch.bfloat16)
    assert s.tolist() == [1.0, -1.0, 1.0, -1.0] and code.tolist() == [2, -2, 2, -2]


def test_code_readers_give_the_sign_and_the_window() -> None:
    code = torch.tensor([-2, -1, 1, 2], dtype=torch.int8)
    assert kernels.code_sign(code, torch.float32).tolist() == [-1.0, -1.0, 1.0, 1.0]
    grad = torch.tensor([3.0, 4.0, 5.0, 6.0])
    assert kernels.masked_grad(grad, code, torch.float32).tolist() == [3.0, 0.0, 0.0, 6.0]


def test_a_failing_compiler_warns_once_and_falls_back_to_identical_eager_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        def fail(*a: object, **k: object) -> None:
            raise RuntimeError("no C++ compiler found\nsecond line")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "_mode", "compiled")
    x = planted((2, 4, 5, 5))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*trainer.kernels=eager"):
        s, code = kernels.sign_code(x, torch.float32)
    assert kernels.get_kernels() == "eager"
    assert torch.equal(code, reference(x)[1]) and torch.equal(s, reference(x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        kernels.sign_code(x, torch.float32)


def test_unknown_modes_list_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid choices: eager, compiled"):
        kernels.set_kernels("triton")
    with pytest.raises(ValueError, match="valid choices: auto, keep, system, jemalloc"):
        set_malloc_policy("tcmalloc")


def test_malloc_policies_apply_on_this_linux_machine() -> None:
    assert MALLOC_POLICIES == ("auto", "keep", "system", "jemalloc")
    assert set_malloc_policy("system") is True
    assert set_malloc_policy("keep") is True  # glibc's mallopt accepted both parameters
    assert set_malloc_policy("auto") is True  # keep, here (no jemalloc in this process)


def test_jemalloc_policy_without_the_preload_names_the_command() -> None:
    from xnorpp.engine.memory import jemalloc_loaded

    if jemalloc_loaded():
        pytest.skip("this pytest process runs on a preloaded jemalloc")
    with pytest.raises(ValueError, match=r"needs jemalloc loaded when the process starts: .*LD_PRELOAD="):
        set_malloc_policy("jemalloc")


@pytest.mark.skipif(
    find_jemalloc() is None, reason="libjemalloc is not installed (apt-get install libjemalloc2)"
)
def test_jemalloc_policy_under_the_preload_keeps_pages_and_trains() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import ctypes, torch, timm, xnorpp\n"
        "from xnorpp.engine.memory import jemalloc_loaded, set_malloc_policy\n"
        "assert jemalloc_loaded() and set_malloc_policy('jemalloc')\n"
        "v, n = ctypes.c_ssize_t(0), ctypes.c_size_t(8)\n"
        "assert ctypes.CDLL(None).mallctl(b'arenas.dirty_decay_ms', ctypes.byref(v), ctypes.byref(n), None, 0) == 0\n"
        "assert v.value == -1, v.value\n"
        "m = timm.create_model('resnet18_preact_bin', binarization='full_binary', num_classes=3, input_size=16)\n"
        "m(torch.randn(2, 3, 16, 16)).sum().backward()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "LD_PRELOAD": str(find_jemalloc())}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _preload_in_a_new_process(
    tmp_path: Path,
    env: dict[str, str | None],
    call: str = "preload_jemalloc(ENTRY)",
    how: str = "{script}",
    stdin: str = "",
) -> list[str]:
    """Start a fresh interpreter as ``python <how>`` (``{script}``: a file whose first thing is ``call``, with
    the memory module alone: no torch import), which then prints whether jemalloc is loaded and LD_PRELOAD;
    returns the lines it printed that way (once per run)."""
    import os
    import shlex
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "entry.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT / 'xnorpp' / 'engine')!r}); import memory\n"
        f"from memory import preload_jemalloc; ENTRY = {str(script)!r}; {call}\n"
        "import os; print('loaded:', memory.jemalloc_loaded(), os.environ.get('LD_PRELOAD', ''))\n"
    )
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    cmd = [sys.executable, *shlex.split(how.format(script=script))]
    out = subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [line.split("loaded: ")[1] for line in out.stdout.splitlines() if "loaded: " in line]


@pytest.mark.skipif(
    find_jemalloc() is None, reason="libjemalloc is not installed (apt-get install libjemalloc2)"
)
def test_preload_jemalloc_reruns_the_command_with_it_unless_told_not_to(tmp_path: Path) -> None:
    clean = {"LD_PRELOAD": None, "XNORPP_JEMALLOC": None, "_XNORPP_JEMALLOC_RERUN": None}
    lib = find_jemalloc()
    assert _preload_in_a_new_process(tmp_path, clean) == [f"True {lib}"]  # printed once: by the re-run
    assert _preload_in_a_new_process(tmp_path, clean, how="-X dev -u {script}") == [f"True {lib}"]
    assert _preload_in_a_new_process(tmp_path, {**clean, "XNORPP_JEMALLOC": "0"}) == ["False "]
    assert _preload_in_a_new_process(tmp_path, {**clean, "XNORPP_JEMALLOC": "false"}) == ["False "]
    glibc = "preload_jemalloc(ENTRY, keep_glibc=lambda: True)"  # the config asks for glibc
    assert _preload_in_a_new_process(tmp_path, clean, glibc) == ["False "]
    other = "/nonexistent/libtcmalloc.so"  # a preload of another allocator is left alone
    assert _preload_in_a_new_process(tmp_path, {**clean, "LD_PRELOAD": other}) == [f"False {other}"]
    # a preload that does not load (here a missing file) runs the command once more, never again
    bogus = "memory.find_jemalloc = lambda: '/nonexistent/libjemalloc.so.2'; preload_jemalloc(ENTRY)"
    assert _preload_in_a_new_process(tmp_path, clean, bogus) == ["False /nonexistent/libjemalloc.so.2"]


@pytest.mark.skipif(
    find_jemalloc() is None, reason="libjemalloc is not installed (apt-get install libjemalloc2)"
)
@pytest.mark.parametrize(
    "how, stdin",
    [
        ("-m pdb {script}", "continue\nquit\n"),  # a debugger keeps its breakpoints
        ("-i {script}", ""),  # an interactive interpreter after the script
        ("-c \"exec(open('{script}').read())\"", ""),  # run inside another program (a notebook's %run)
        ("- < /dev/null", "exec(open('{script}').read())"),  # a program read from stdin
    ],
)
def test_preload_jemalloc_never_reruns_an_interpreter_a_debugger_or_another_program(
    tmp_path: Path, how: str, stdin: str
) -> None:
    clean = {"LD_PRELOAD": None, "XNORPP_JEMALLOC": None, "_XNORPP_JEMALLOC_RERUN": None}
    script = tmp_path / "entry.py"
    lines = _preload_in_a_new_process(
        tmp_path, clean, how=how.split(" <")[0], stdin=stdin.format(script=script)
    )
    assert lines == ["False "]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 32, 257])
def test_batch_sum_over_the_batch_is_sum_to_size_bit_for_bit(batch: int, dtype: torch.dtype) -> None:
    t = (torch.randn(batch, 16, 7, 5, generator=torch.Generator().manual_seed(batch)) * 1000).to(dtype)
    got = kernels.batch_sum(t, torch.Size((16, 7, 5)))  # the column-sum path
    assert got.shape == (16, 7, 5) and got.dtype == dtype and torch.equal(got, t.sum_to_size(16, 7, 5))


@pytest.mark.parametrize(
    ("shape", "channels_last"), [((64, 1, 1), False), ((1, 7, 7), False), ((64, 7, 7), True)]
)
def test_batch_sum_other_reductions_and_layouts(shape: tuple[int, ...], channels_last: bool) -> None:
    t = torch.randn(32, 64, 7, 7, generator=torch.Generator().manual_seed(0)) * 1000
    if channels_last:  # (a column sum would add in another order than sum_to_size: not taken)
        t = t.contiguous(memory_format=torch.channels_last)
    assert torch.equal(kernels.batch_sum(t, torch.Size(shape)), t.sum_to_size(shape))


def test_layout_like_lays_a_scale_out_as_the_activation() -> None:
    g = torch.randn(8, 5, 5)
    y = torch.randn(2, 8, 5, 5)
    assert kernels.layout_like(g, y) is g  # contiguous activations: untouched
    y_cl = y.contiguous(memory_format=torch.channels_last)
    g_cl = kernels.layout_like(g, y_cl)
    assert g_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(g_cl[0], g)
    assert torch.equal(y_cl * g_cl, y * g) and (y_cl * g_cl).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(
    find_jemalloc() is None, reason="libjemalloc is not installed (apt-get install libjemalloc2)"
)
def test_train_py_honours_a_malloc_set_in_a_yaml_file(tmp_path: Path) -> None:
    """``trainer.malloc: keep`` in a config file (here a trainer option of its own) keeps glibc, as on the
    command line (the default re-runs train.py with jemalloc: test_ddp)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, TINY

    (tmp_path / "conf" / "trainer").mkdir(parents=True)
    (tmp_path / "conf" / "trainer" / "glibc.yaml").write_text("defaults:\n  - default\nmalloc: keep\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "XNORPP_JEMALLOC")}
    yaml_option = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "trainer=glibc"]
    cmd = [sys.executable, "train.py", *TINY, "trainer.checkpoint.save=false", *yaml_option,
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["malloc"], results["allocator"]) == ("keep", "glibc")
