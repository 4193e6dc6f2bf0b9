"""What every benchmark script shares: the environment a result must name, JSON output, and the random-Llama presets.

One place for it, so the scripts never import each other. A benchmark prints one JSON object per measured case
(``emit``) and, as its last stdout line, all of them (``finish``), which ``--out`` also writes to a file under
``benchmarks/results/``. Every row carries ``environment()``: the date, the torch / triton / transformers / Python
versions, the CPU, its threads and load average at the time, and the command that reproduces it, as
``python -m benchmarks.<script> <arguments>`` run from the repository root. ``LiveBytes`` measures a CPU run's
live-tensor peak (every storage from the op that creates it until it is freed).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Model shapes for the benchmarks that run a whole decoder (sampler, train step).
MODEL_PRESETS = {
    # Llama-3.1-8B
    "gpu": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie=False, dtype="bfloat16", prompts=32, n=3, new=200),
    # SmolLM2-135M (its GGUF's config: tied embeddings, head_dim 64), the model the CPU experiments use; the
    # sampling round is BS-S's reference default (32 prompts x N=3 x 200 tokens, issue 14)
    "cpu": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie=True, dtype="float32", prompts=32, n=3, new=200),
    # ours: a few seconds on 2 cores, Llama's proportions kept; what the benchmark scripts' own test runs
    "smoke": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, tie=False, dtype="float32", prompts=4, n=3, new=32),
}


def pick_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``: the benchmarks pick their preset from it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or ``"cpu"``."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


GPU_MEMORY_ENV, HOST_MEMORY_ENV = "BENCH_GPU_MEMORY_GIB", "BENCH_HOST_MEMORY_GIB"
# What a run leaves unplanned of the GPU's memory: the CUDA context, cuBLAS workspaces, the caching allocator's
# fragmentation (ours: the context and workspaces are ~1 GiB on an H100; the rest is margin).
GPU_MEMORY_RESERVE_GIB = 4.0


def gpu_memory_gib() -> float | None:
    """The GPU's memory in GiB, read at run time (``torch.cuda.get_device_properties``), so that one job sizes itself
    to an H100 (79.6 GiB) or an H200 (~140 GiB). ``BENCH_GPU_MEMORY_GIB`` stands in for it where there is no GPU (the
    GPU job's dry run for a machine kind); None when there is neither."""
    if os.environ.get(GPU_MEMORY_ENV):
        return float(os.environ[GPU_MEMORY_ENV])
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return None


def host_memory_gib() -> float:
    """This machine's physical memory in GiB (Linux); ``BENCH_HOST_MEMORY_GIB`` stands in for it like
    ``BENCH_GPU_MEMORY_GIB`` does for the GPU's."""
    if os.environ.get(HOST_MEMORY_ENV):
        return float(os.environ[HOST_MEMORY_ENV])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def sync(device: str) -> None:
    """Wait for queued GPU work before reading a clock (a host sync, on CUDA only)."""
    if device == "cuda":
        torch.cuda.synchronize()


def environment(script: str, argv: list[str] | None) -> dict:
    """What a committed result must name: date, versions, and the command that reproduces it.

    ``script`` is the module name (``"benchmarks.bench_losses"``); ``argv`` the arguments given to its ``main`` (None:
    the process's own, ``sys.argv[1:]``).
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    args = sys.argv[1:] if argv is None else list(argv)
    try:  # the installed version, without importing it (bench_losses needs no transformers)
        transformers_version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers_version = None
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers_version, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(["python", "-m", script, *args])}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def emit(row: dict, rows: list[dict], device: str) -> None:
    """Print one case as a JSON line, keep it, and free what it left on the device."""
    print(json.dumps(row), flush=True)
    rows.append(row)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def finish(rows: list[dict] | dict, out: Path | None) -> list[dict] | dict:
    """Write all cases (or one result document) to ``out`` if given, and print them as the last stdout line."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows))
    return rows


def random_llama(spec: dict, device: str):
    """A Llama with random weights of ``spec``'s shape (a ``MODEL_PRESETS`` entry), built on the meta device and
    materialised directly on ``device``: an 8B model needs no download and no second copy in host memory."""
    import transformers  # lazily: bench_losses needs neither transformers nor bs_train

    from bs_train.model import cast_parameters

    cfg = transformers.LlamaConfig(**{k: spec[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "num_key_value_heads",
                                                            "vocab_size")},
                                   max_position_embeddings=4096, tie_word_embeddings=spec["tie"])
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    if spec["tie"]:
        model.tie_weights()  # to_empty may give the tied pair two storages
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.fill_(1.0)
    with torch.device(device):  # to_empty left the rotary buffers uninitialised: rebuild them
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    return cast_parameters(model, getattr(torch, spec["dtype"])).eval()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss_reset() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes (Linux).

    With ``peak_rss_delta`` after the measured call, the peak RSS the call added. Run the process with
    ``MALLOC_MMAP_THRESHOLD_`` set (e.g. 4 MiB) so freed tensors leave the RSS and it follows the live ones."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def peak_rss_delta(before: int) -> int:
    """Bytes the peak RSS rose above ``before`` (``rss_reset``'s value) since that reset."""
    return _status_bytes("VmHWM") - before


class LiveBytes(TorchDispatchMode):
    """Tensor storages allocated (and freed) on the CPU while active, as a list of (storage address, +/- bytes)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.events: list[tuple[int, int]] = []

    def _freed(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.events.append((key, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self.live:  # empty, a view / in-place result, or known
                continue
            self.live[key] = storage.nbytes()
            self.events.append((key, storage.nbytes()))
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def peak(self, exclude: tuple[torch.Tensor, ...] = ()) -> int:
        """Peak live bytes, leaving out the storages of ``exclude`` (still alive: their last allocation)."""
        skip = set()
        for t in exclude:
            key = t.untyped_storage().data_ptr()
            skip.add(max(i for i, (k, d) in enumerate(self.events) if k == key and d > 0))
        current = peak = 0
        for i, (_, delta) in enumerate(self.events):
            if i not in skip:
                current += delta
                peak = max(peak, current)
        return peak
