"""The ahead-of-time compile check (``tools/kernel_check.py``): every Triton kernel compiles for sm_80 and sm_90 with
no spills, no local memory and shared memory within the chip's limit, with no GPU needed.

The check runs in a subprocess: this test session runs Triton on its CPU interpreter (``conftest.py``), which has no
compiler. The kernels it must cover are found here independently, from the source (``@triton.jit`` functions that
their module launches as ``name[grid](...)``). About 30-60 s on 2 cores (the CI matrix); the second test ~10 s.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), **extra}


def launched_kernels_in_source(package: Path) -> set[str]:
    """``module.kernel`` for every ``@triton.jit`` function its own module launches as ``kernel[grid](...)``."""
    found = set()
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        jitted = {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
                  and any("triton.jit" in ast.unparse(d) for d in f.decorator_list)}
        launched = {n.func.value.id for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Subscript) and isinstance(n.func.value, ast.Name)}
        found |= {f"{package.name}.{path.stem}.{name}" for name in jitted & launched}
    return found


def test_every_kernel_compiles_for_every_target_without_spills_or_oversized_shared_memory(tmp_path):
    out = tmp_path / "kernel_check.json"
    done = subprocess.run([sys.executable, "-m", "tools.kernel_check", "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    print(done.stdout.splitlines()[-1])  # the summary: compiles, seconds, processes
    doc = json.loads(out.read_text())
    kernels = launched_kernels_in_source(REPO / "bs_kernels")
    assert len(kernels) >= 4 and set(doc["kernels"]) == kernels  # every kernel, found two ways
    results = doc["results"]
    assert results and all(r["ok"] and not r["failures"] for r in results)
    assert all(r["spill_bytes"] == 0 and r["stack_local_bytes"] == 0 for r in results)
    assert all(r["shared_bytes"] <= doc["targets"][r["target"]]["smem_block"] for r in results)
    names = {k.rsplit(".", 1)[1] for k in kernels}
    # every kernel on every target; every dtype, both vocabulary classes and the sweep's tiles somewhere
    assert {(r["kernel"], r["target"]) for r in results} == {(k, t) for k in names for t in ("sm_80", "sm_90")}
    assert {r["dtype"] for r in results} == {"bf16", "fp16", "fp32"}
    assert {s for r in results for s in r["shapes"]} == {"smollm2", "llama3", "gpt2", "sweep_loss"}
    assert any("V%16!=0" in r["config"] for r in results) and any(" V%16 " in r["config"] for r in results)
    assert doc["triton"] and doc["command"].startswith("python -m tools.kernel_check")
    assert out.with_suffix(".md").read_text().count("| _") == len(results)  # the Markdown table, one row each


FAKE = '''
"""A kernel module with two mistakes: a flag launched one way only, and a tile that is not a power of two."""
from functools import partial

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, NEGATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if NEGATE:
        x = -x
    tl.store(y_ptr + offs, x, mask=offs < n)


def copy(x, y, *, negate=False, block=1024):
    _copy_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block, NEGATE=negate, num_warps=4)


def launch_cases(vocab, dtype, *, labels_dtype=torch.int64, block_v=None, device="meta", rows=16):
    x = torch.empty(rows, vocab, dtype=dtype, device=device)
    return [("copy()", partial(copy, x, x)), ("copy(block=1000)", partial(copy, x, x, block=1000))]
'''


def test_a_flag_launched_one_way_and_a_compile_error_fail_the_check_by_name(tmp_path):
    pkg = tmp_path / "fake_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "triton_copy.py").write_text(textwrap.dedent(FAKE))
    done = subprocess.run([sys.executable, "-m", "tools.kernel_check", "--package", "fake_kernels", "--targets",
                           "sm_90", "--dtypes", "float32"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)])))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fake_kernels.triton_copy._copy_kernel: constexpr NEGATE is only ever launched as False" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("_copy_kernel")]
    assert any("BLOCK=1000" in r and "compile error" in r for r in rows), done.stdout
    assert any("BLOCK=1024" in r and " ok " in r for r in rows), done.stdout
