"""Ahead-of-time compile check: every Triton kernel of ``bs_kernels``, for the GPUs it will meet, without a GPU.

A lent GPU machine gives 15 minutes; a kernel that fails to compile, spills registers or asks for more shared memory
than the chip has would waste them. Triton compiles for a named target on any machine (its own ``ptxas`` and
``cuobjdump`` ship in the wheel), so this check does it here and in CI:

1. every module of ``bs_kernels`` that defines a ``@triton.jit`` function declares ``launch_cases(vocab, dtype,
   ...)`` beside its launchers: calls of the real launchers on empty ``meta`` tensors, one per combination of
   options that changes a constexpr or a Triton specialisation. Each call runs the launcher for real, except that
   the kernel launch is recorded instead of made; so the constexprs, ``num_warps`` and argument types checked are
   exactly the ones a GPU run would produce (the same binder Triton's JIT uses turns them into a specialisation);
2. the launches are recorded at the heads users meet (``SHAPES``: SmolLM2's and Llama-3's, and GPT-2's odd
   vocabulary, which loses Triton's multiple-of-16 specialisation), in bf16, fp16 and fp32, with int64 labels (int32
   at the odd vocabulary), plus the ``BLOCK_V`` values ``benchmarks/sweep_loss.py`` tries, through its own call;
3. every distinct specialisation is compiled for each target (sm_80: A100; sm_90: H100 / H200) in a process pool,
   with a fresh ``TRITON_CACHE_DIR`` (nothing is reused between runs), and its cubin read with ``cuobjdump
   --dump-resource-usage`` (registers, stack, local and shared memory) and ``ptxas -v``'s log (spill bytes).

It prints one table and exits 1 on a compile error, on spills, stack or local memory, on shared memory over the
target's per-block limit, on registers a block of ``num_warps`` warps cannot hold, and on a kernel or a boolean
constexpr the launch cases never reach (a flag launched only one way: add it to its module's ``launch_cases``).
The heads matter only through Triton's specialisations (the row kernels never see D, and V only through whether it
and the row stride are multiples of 16), so SmolLM2's and Llama-3's share their compiles; the table lists every head
that reached each variant.

The whole product (``--full``: 3 heads x 3 dtypes x 2 targets, ~510 compiles, 0.3-0.5 s of one core each) takes
minutes on 2 cores, so the default matrix, the one CI runs, is chosen (``plan``): every launch case in bf16 at the two
real heads on every target (the configuration every GPU run of this project uses), the sweep's tiles, and every case
once more in one of fp16, fp32 or bf16 at the odd vocabulary, dealt round-robin with the targets in turn. Every case,
dtype, vocabulary class and target is compiled, in ~130 compiles (~45 s of CPU). ``--full`` is what
``benchmarks/results/kernel_check.md`` records.

    python -m tools.kernel_check                     # the CI matrix and its table; exit 1 on a failure
    python -m tools.kernel_check --full --out benchmarks/results/kernel_check.json   # everything; JSON and .md
    python -m tools.kernel_check --targets sm_80,sm_86,sm_89,sm_90    # consumer Ampere / Ada too
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (D, V) of the heads users meet; D never reaches a row kernel (it is the GEMMs' inner dimension) but names the head.
SHAPES = {
    "smollm2": (576, 49152),  # SmolLM2-135M-Instruct, the model of the CPU experiments and the TOFU recipe
    "llama3": (4096, 128256),  # Llama-3 / Llama-3.1-8B, the GPU benchmarks' head (DESIGN.md)
    "gpt2": (768, 50257),  # an odd V (GPT-2's; OLMo's 50280 too): V and the row stride lose Triton's %16 specialisation
}
DTYPES = ("bfloat16", "float16", "float32")
# Per-block limits by compute capability (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): opt-in shared memory per block, shared memory per SM, resident warps per SM, registers per SM.
TARGETS = {
    "sm_80": dict(cc=80, smem_block=166912, smem_sm=167936, warps_sm=64),  # A100: 163 / 164 KiB
    "sm_86": dict(cc=86, smem_block=101376, smem_sm=102400, warps_sm=48),  # RTX 30xx, A10, A40: 99 / 100 KiB
    "sm_89": dict(cc=89, smem_block=101376, smem_sm=102400, warps_sm=48),  # RTX 40xx, L4, L40: 99 / 100 KiB
    "sm_90": dict(cc=90, smem_block=232448, smem_sm=233472, warps_sm=64),  # H100, H200: 227 / 228 KiB
}
DEFAULT_TARGETS = ("sm_80", "sm_90")
REGS_SM, REGS_THREAD = 65536, 255


@dataclass
class Variant:
    """One distinct compile: a kernel, its specialisation and a target, and every launch case that reached it."""

    module: str
    kernel: str
    target: str
    signature: dict
    constexprs: dict  # {argument index tuple: value}, as Triton's ASTSource takes them
    attrs: dict
    options: dict
    config: str
    dtype: str
    reached_by: list = field(default_factory=list)


@dataclass
class Result:
    """What the compile of one variant gave."""

    kernel: str
    config: str
    dtype: str
    target: str
    shapes: list
    cases: int
    ok: bool = False
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    stack_local_bytes: int | None = None
    shared_bytes: int | None = None
    warps_per_sm: int | None = None
    compile_s: float | None = None
    failures: list = field(default_factory=list)


# ---- step 1: the launches, recorded ------------------------------------------------------------------------------


def kernel_modules(package: str = "bs_kernels") -> list:
    """Every module of ``package`` whose source defines a ``@triton.jit`` function, imported."""
    pkg = importlib.import_module(package)
    mods = []
    for info in pkgutil.iter_modules(pkg.__path__):
        path = Path(pkg.__path__[0]) / f"{info.name}.py"
        if path.is_file() and "@triton.jit" in path.read_text():
            mods.append(importlib.import_module(f"{package}.{info.name}"))
    return mods


def launched_kernels(module) -> dict:
    """The ``@triton.jit`` functions ``module``'s launchers launch (``name[grid](...)`` in its source)."""
    from triton.runtime.jit import JITFunction

    src = Path(module.__file__).read_text()
    return {name: fn for name, fn in vars(module).items()
            if isinstance(fn, JITFunction) and re.search(rf"\b{re.escape(name)}\[", src)}


@contextlib.contextmanager
def recording(kernels: dict, into: list):
    """Within the block, launching one of ``kernels`` appends ``(name, args, kwargs)`` to ``into`` instead."""
    for name, fn in kernels.items():
        fn.run = (lambda n: lambda *args, grid, warmup, **kwargs: into.append((n, args, kwargs)))(name)
    try:
        yield
    finally:
        for fn in kernels.values():
            vars(fn).pop("run", None)


def record(module, kernels: dict, calls) -> list:
    """Run each ``(label, call)`` with the launches recorded; returns ``[(label, kernel, args, kwargs, index)]``,
    ``index`` the call's position in ``calls``."""
    got = []
    for index, (label, call) in enumerate(calls):
        into: list = []
        with recording(kernels, into):
            call()
        got += [(label, *launch, index) for launch in into]
    return got


# ---- step 2: Triton's specialisation of a launch, for a named target ---------------------------------------------


_BINDERS: dict = {}  # (kernel, cc) -> (backend, binder), as JITFunction keeps one per device


def specialise(fn, args, kwargs, cc: int):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` builds them, for target ``cc``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(fn), cc)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", cc, 32))
        _BINDERS[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[key]
    kwargs = {**kwargs, "debug": False}
    bound, spec, opts = binder(*args, **kwargs)
    # Triton 3.6's own packing (private; CI pins triton==3.6.0): options parsed, constexpr and attribute paths.
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, options.__dict__


def describe(fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> tuple[str, str]:
    """``(config, dtype)``: the constexprs (flags by name when on, ``~NAME`` when off), the integer arguments Triton
    specialised (``V%16`` when V is a multiple of 16; an int of 1 as a constant), ``num_warps`` and ``maxnreg``; and
    the logits dtype."""
    names = fn.arg_names
    parts = []
    for (i, *_), v in sorted(constexprs.items()):
        if fn.params[i].is_constexpr:
            parts.append(names[i] if v is True else f"~{names[i]}" if v is False else f"{names[i]}={v}")
        else:
            parts.append(f"{names[i]}={v}(const)")
    if "V" in names:
        iv = names.index("V")
        parts.append("V%16" if ["tt.divisibility", 16] in attrs.get((iv,), []) else "V%16!=0")
    parts.append(f"warps={options['num_warps']}")
    if options.get("maxnreg"):
        parts.append(f"maxnreg={options['maxnreg']}")
    dtype = next((t[1:] for t in signature.values() if isinstance(t, str) and t.startswith(("*f", "*bf"))), "?")
    return " ".join(parts), dtype


@dataclass(frozen=True)
class Cell:
    """A slice of the matrix: the launch cases of every module at one head and dtype, compiled for ``targets``.

    With ``deal=(i, n)`` only every n-th case from the i-th is taken, each for one target in turn (round-robin)."""

    shape: str
    dtype: str
    targets: tuple
    deal: tuple | None = None

    def targets_of(self, index: int) -> tuple:
        if self.deal is None:
            return self.targets
        i, n = self.deal
        if index % n != i:
            return ()
        return (self.targets[(index // n) % len(self.targets)],)


def plan(targets, dtypes=DTYPES, full: bool = False) -> list[Cell]:
    """The matrix. ``full``: every head x dtype x target. Otherwise (CI) every launch case at the configuration every
    GPU run uses (bf16, the SmolLM2 and Llama-3 heads) on every target, and each case once more in one of fp16, fp32
    or bf16 at the odd vocabulary, dealt round-robin with the targets in turn: about a quarter of the full product,
    with every case, dtype, vocabulary class and target in it."""
    targets = tuple(targets)
    if full:
        return [Cell(shape, dtype, targets) for shape in SHAPES for dtype in dtypes]
    main = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    extras = [("llama3", d) for d in dtypes if d != main] + [("gpt2", main)]
    return ([Cell(shape, main, targets) for shape in ("smollm2", "llama3")]
            + [Cell(shape, d, targets, (i, len(extras))) for i, (shape, d) in enumerate(extras)])


def collect_variants(cells: list[Cell], package: str = "bs_kernels", with_sweep: bool = True) -> tuple[list, list]:
    """Every distinct ``Variant`` the launch cases reach in ``cells``, and the coverage problems (a kernel never
    launched, a boolean constexpr only ever launched one way, a module without ``launch_cases``)."""
    import torch

    variants: dict = {}
    seen: dict = {}  # (module, kernel) -> {constexpr name: set of values}
    problems = []

    def add(module, kernels, recorded, shape, dtype_name, targets_of):
        for label, kname, args, kwargs, index in recorded:
            fn = kernels[kname]
            for t in targets_of(index):
                sig, const, attrs, opts = specialise(fn, args, kwargs, TARGETS[t]["cc"])
                key = (module.__name__, kname, t, repr(sorted(sig.items())), repr(sorted(const.items())),
                       repr(sorted(attrs.items())), repr(sorted(opts.items())))
                if key not in variants:
                    config, dt = describe(fn, sig, const, attrs, opts)
                    variants[key] = Variant(module.__name__, kname, t, sig, const, attrs, opts, config, dt)
                variants[key].reached_by.append((shape, dtype_name, label))
                vals = seen.setdefault((module.__name__, kname), {})
                for p in fn.params:
                    if p.is_constexpr and p.name in kwargs:
                        vals.setdefault(p.name, set()).add(kwargs[p.name])

    for module in kernel_modules(package):
        kernels = launched_kernels(module)
        if not hasattr(module, "launch_cases"):
            problems.append(f"{module.__name__} defines Triton kernels but no launch_cases(): declare its launches")
            continue
        for cell in cells:
            labels = torch.int32 if cell.shape == "gpt2" else torch.int64
            calls = module.launch_cases(SHAPES[cell.shape][1], getattr(torch, cell.dtype), labels_dtype=labels)
            add(module, kernels, record(module, kernels, calls), cell.shape, cell.dtype, cell.targets_of)
        for kname in kernels:
            if (module.__name__, kname) not in seen:
                problems.append(f"{module.__name__}.{kname} is never launched by launch_cases()")
    if with_sweep:  # the BLOCK_V sweep, through the sweep's own call, on every target
        from benchmarks import sweep_loss
        from bs_kernels import triton_rows

        _, _, v, dtype_name, _, blocks, rows = sweep_loss.PRESETS["gpu"]
        dt = getattr(torch, dtype_name)
        kernels = launched_kernels(triton_rows)
        z = torch.empty(rows, v, dtype=dt, device="meta")
        labels = torch.empty(rows, dtype=torch.int64, device="meta")
        grad = torch.empty(rows, dtype=torch.float32, device="meta")
        calls = [(f"sweep_loss.row_kernel_call(block_v={bv})",
                  lambda bv=bv: sweep_loss.row_kernel_call(z, labels, grad, bv)) for bv in blocks]
        targets = cells[0].targets if cells else ()
        add(triton_rows, kernels, record(triton_rows, kernels, calls), "sweep_loss", dtype_name, lambda i: targets)
    for (mname, kname), vals in seen.items():
        for name, got in vals.items():
            if got <= {True, False} and len(got) == 1:
                problems.append(f"{mname}.{kname}: constexpr {name} is only ever launched as {next(iter(got))}; "
                                f"launch_cases() must reach both values")
    return list(variants.values()), problems


# ---- step 3: compile and read the cubin --------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _resources(cubin: bytes, kernel: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    line = out.split(f"Function {kernel}:", 1)[1].splitlines()[1]
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def compile_one(v: Variant) -> Result:
    """Compile ``v`` for its target and read its resources (run in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(v.module), v.kernel)
    t = TARGETS[v.target]
    shapes = sorted({s for s, _, _ in v.reached_by})
    res = Result(v.kernel, v.config, v.dtype, v.target, shapes, len(v.reached_by))
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v's report
            k = triton.compile(ASTSource(fn, v.signature, v.constexprs, v.attrs),
                               target=GPUTarget("cuda", t["cc"], 32), options=v.options)
    except Exception as e:  # noqa: BLE001 - any compile failure is a finding, reported by name
        res.compile_s = round(time.perf_counter() - t0, 2)
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        res.failures.append("compile error")
        return res
    res.compile_s = round(time.perf_counter() - t0, 2)
    use = _resources(k.asm["cubin"], k.metadata.name)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                                      log.getvalue())]
    warps = v.options["num_warps"]
    res.registers = use["REG"]
    res.spill_bytes = sum(spills) if spills else None
    res.stack_local_bytes = use["STACK"] + use["LOCAL"]
    res.shared_bytes = use["SHARED"] + k.metadata.shared  # static + the dynamic size Triton launches with
    regs_warp = -(-res.registers * 32 // 256) * 256  # allocated per warp in units of 256
    blocks = min(REGS_SM // (regs_warp * warps), t["warps_sm"] // warps,
                 t["smem_sm"] // res.shared_bytes if res.shared_bytes else 32)
    res.warps_per_sm = blocks * warps
    if res.spill_bytes:
        res.failures.append(f"spills {res.spill_bytes} B")
    if res.stack_local_bytes:
        res.failures.append(f"stack/local {res.stack_local_bytes} B")
    if res.shared_bytes > t["smem_block"]:
        res.failures.append(f"shared {res.shared_bytes} B > {t['smem_block']} B")
    if res.registers > REGS_THREAD or regs_warp * warps > REGS_SM:
        res.failures.append(f"{res.registers} registers x {warps} warps do not fit")
    res.ok = not res.failures
    return res


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


# ---- the table ---------------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "config", "dtype", "target", "regs", "spill B", "stack+local B", "shared B", "warps/SM",
           "compile s", "status", "shapes")


def _cells(r: Result) -> list[str]:
    def n(x):
        return "-" if x is None else str(x)

    status = "ok" if r.ok else "; ".join(r.failures + ([r.error] if r.error else []))
    return [r.kernel, r.config, r.dtype, r.target, n(r.registers), n(r.spill_bytes), n(r.stack_local_bytes),
            n(r.shared_bytes), n(r.warps_per_sm), n(r.compile_s), status, ",".join(r.shapes)]


def table(results: list[Result], markdown: bool = False) -> str:
    rows = [list(COLUMNS)] + [_cells(r) for r in results]
    if markdown:
        return "\n".join("| " + " | ".join(c.replace("|", "/") for c in row) + " |"
                         + ("\n|" + " --- |" * len(COLUMNS) if i == 0 else "") for i, row in enumerate(rows))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def environment(argv) -> dict:
    import torch
    import triton

    return {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cores": os.cpu_count(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(["python", "-m", "tools.kernel_check", *(sys.argv[1:] if argv is None else argv)])}


def run(targets=DEFAULT_TARGETS, jobs: int | None = None, dtypes=DTYPES, full: bool = False,
        package: str = "bs_kernels") -> dict:
    """Record, compile and check the matrix; returns ``{"results", "problems", "ok", "seconds", ...}``."""
    t0 = time.perf_counter()
    variants, problems = collect_variants(plan(targets, dtypes, full), package, with_sweep=package == "bs_kernels")
    if not variants:
        problems.append(f"no Triton kernel launch recorded in {package}")
    jobs = max(1, jobs or min(len(variants), os.cpu_count() or 1))
    # a fresh cache, removed afterwards: nothing is reused between runs. fork: the workers inherit the imported
    # kernels; the parent has no CUDA context to inherit
    with tempfile.TemporaryDirectory(prefix="kernel_check_cache_") as cache, \
            ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init,
                                initargs=(cache,)) as pool:
        results = list(pool.map(compile_one, variants, chunksize=1))
    results.sort(key=lambda r: (r.kernel, r.target, r.dtype, r.config))
    ok = not problems and all(r.ok for r in results)
    return {"ok": ok, "problems": problems, "results": results, "variants": len(variants), "jobs": jobs,
            "launches": sum(r.cases for r in results), "seconds": round(time.perf_counter() - t0, 1),
            "kernels": sorted({f"{v.module}.{v.kernel}" for v in variants})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=f"comma-separated, of {sorted(TARGETS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated logits dtypes")
    p.add_argument("--full", action="store_true", help="every head x dtype x target (default: the CI matrix)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per core)")
    p.add_argument("--package", default="bs_kernels", help="the package whose kernels are checked")
    p.add_argument("--out", type=Path, help="write the results as JSON here and the table as Markdown beside it")
    args = p.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"kernel_check: unknown target(s) {bad}; known: {sorted(TARGETS)}", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"kernel_check: unknown dtype(s) {bad}; known: {list(DTYPES)}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_check: TRITON_INTERPRET is set, so Triton has no compiler here; run without it",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    try:
        importlib.import_module(args.package)
    except ModuleNotFoundError as e:
        print(f"kernel_check: cannot import --package {args.package!r} ({e})", file=sys.stderr)
        return 2
    res = run(targets, args.jobs, dtypes, args.full, args.package)
    env = environment(argv)
    text = table(res["results"])
    print(text)
    for prob in res["problems"]:
        print(f"kernel_check: {prob}")
    bad = [r for r in res["results"] if not r.ok]
    summary = (f"{len(res['results'])} compiles ({res['variants']} variants of {len(res['kernels'])} kernels from "
               f"{res['launches']} launches) for {','.join(targets)} in {res['seconds']} s on {res['jobs']} "
               f"process(es), triton {env['triton']}: "
               + ("ok" if res["ok"] else f"{len(bad)} failed, {len(res['problems'])} coverage problem(s)"))
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {**env, "targets": {t: TARGETS[t] for t in targets}, "kernels": res["kernels"], "ok": res["ok"],
               "problems": res["problems"], "seconds": res["seconds"], "results": [asdict(r) for r in res["results"]]}
        rows = ",\n".join("  " + json.dumps(r) for r in doc.pop("results"))  # one line per compile
        args.out.write_text(json.dumps(doc, indent=1)[:-2] + ',\n "results": [\n' + rows + "\n ]\n}\n")
        md = args.out.with_suffix(".md")
        md.write_text(f"# Ahead-of-time compile check of the Triton kernels\n\n`{env['command']}` on {env['date']}, "
                      f"triton {env['triton']}, torch {env['torch']} ({env['cores']} cores, no GPU).\n\n{summary}\n\n"
                      + table(res["results"], markdown=True) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
