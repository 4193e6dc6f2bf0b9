"""The lean install: ``bs-kernels`` (``kernels/pyproject.toml``) installs into a fresh virtual environment that holds
only torch and triton (and numpy, which Triton's CPU interpreter needs), and its README's examples run there.

What it guards: ``bs_kernels`` needs none of transformers, peft, scipy, matplotlib or anything of ``bs_train``, and
the distribution built from this repository installs with pip's dependency check and no index (so nothing can be
fetched: a missing dependency fails, it is not downloaded). The wheel is built from a copy of ``kernels/`` and
``bs_kernels/``, so the checkout is left as it was.

How torch and triton get into the fresh environment. By default the running environment's installed distributions of
torch, triton and numpy, with their dependency closure, are linked into the new environment's site-packages, files
and metadata: the same files pip would unpack, with no network and no chance of pip resolving ``torch`` to a CUDA
build (the whole test: 11 s of CPU time, 50 s wall on the project's loaded 2-core machine, most of it building the
wheel and importing torch). ``BS_LEAN_INSTALL=pip`` installs them with
pip instead, pinned to the running versions (torch's ``+cpu`` build included), as a user would: about a minute more
and 1.6 GB, from the configured index (``/opt/wheels`` on the project's machines).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("transformers", "peft", "scipy", "matplotlib", "bs_train", "accelerate", "yaml")


def _closure(names: list[str]) -> list[md.Distribution]:
    """The installed distributions of ``names`` and of everything they require (markers evaluated, no extras)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        dist = md.distribution(name)
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_installed(names: list[str], site: Path) -> list[str]:
    """Link each distribution's top-level files and its metadata folder into ``site``; returns their names."""
    linked = []
    for dist in _closure(names):
        tops = {Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].startswith("..")}
        root = Path(dist.locate_file(""))
        for top in sorted(tops):
            if top == "__pycache__" or not (root / top).exists():
                continue
            dest = site / top
            if not dest.exists():
                dest.symlink_to(root / top)
        linked.append(dist.metadata["Name"])
    return linked


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_kernels_install_alone_and_run_their_examples(tmp_path):
    for name in ("torch", "triton", "numpy"):
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here to place in the fresh environment")
    src = tmp_path / "src"
    shutil.copytree(REPO / "kernels", src / "kernels", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    shutil.copytree(REPO / "bs_kernels", src / "bs_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp_path / "dist"), str(src / "kernels")])
    wheel = next((tmp_path / "dist").glob("bs_kernels-*.whl"))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    pip = [sys.executable, "-m", "pip", "--python", py]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON"))}
    if os.environ.get("BS_LEAN_INSTALL") == "pip":
        _run([*pip, "install", "-q", f"torch=={md.version('torch')}", f"triton=={md.version('triton')}",
              "numpy<2.4"])
    else:
        _link_installed(["torch", "triton", "numpy"], site)
    _run([*pip, "install", "-q", "--no-index", str(wheel)])  # no index: its dependencies must already be there

    installed = {line.split("==")[0].lower() for line in _run([*pip, "freeze"]).stdout.split()}
    assert {"bs-kernels", "torch", "triton"} <= installed
    assert not installed & {"transformers", "peft", "scipy", "matplotlib", "bs-unlearn", "accelerate", "pyyaml"}

    readme = (REPO / "kernels" / "README.md").read_text()
    blocks = re.findall(r"<!-- example:kernels-\d[^>]*-->\s*```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 3, "kernels/README.md lost its examples"
    script = tmp_path / "examples.py"
    check = ("import importlib.util, sys\n"
             "import bs_kernels, bs_kernels.open_unlearning\n"
             f"assert bs_kernels.__file__.startswith({str(site)!r}), bs_kernels.__file__\n"
             f"assert not any(importlib.util.find_spec(m) for m in {FORBIDDEN!r})\n"
             f"assert not any(m.split('.')[0] in {FORBIDDEN!r} for m in sys.modules)\n")
    script.write_text(check + "\n".join(blocks) + "\nprint('examples ok', bs_kernels.__version__)\n")
    out = _run([py, str(script)], cwd=tmp_path, env=env).stdout
    assert "examples ok" in out
    import tomllib

    from bs_kernels import __version__

    main_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name.startswith(f"bs_kernels-{__version__}-") and __version__ != main_version  # its own version
