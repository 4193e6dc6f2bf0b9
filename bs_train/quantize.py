"""Weight-only round-to-nearest quantization of every linear layer, through torchao: the quantization attack.

Zhang et al. 2024 ("Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025) found that quantizing an
unlearned model brings the forgotten knowledge back: unlearning moves weights by less than half a quantization step,
so the unlearned and the original weights round to the same grid point (21% of the forgotten knowledge retained in
full precision, 83% after 4-bit quantization, for unlearning methods with a utility term; 8-bit is far milder).
``quantize_linear_weights`` reproduces the attack's weights on any device:

* every ``nn.Linear`` (the lm_head included; embeddings are not linear layers and stay as they are) is quantized by
  torchao's ``quantize_`` with ``IntxWeightOnlyConfig(weight_dtype=torch.int8 | torch.int4,
  granularity=PerGroup(g))``: symmetric, group-wise, round-to-nearest, one float scale per ``g`` input weights.
  torchao's ``Int4WeightOnlyConfig`` needs CUDA kernels (the ``mslk`` package), so int4 goes through the
  ``IntxWeightOnlyConfig`` path, which runs on a CPU too, and int8 through the same path for one scheme at both widths;
* the quantized tensor is then dequantized back into the layer's float weight (simulated quantization, as llm-awq's
  ``--q_backend fake`` evaluates AWQ): the values are exactly ``scale * q`` with ``q`` on the b-bit grid, so every
  scoring and generation path of the project (the fused scores read the lm_head weight directly) runs unchanged.
  What the report holds was read from the torchao tensors themselves: their integer dtype and range, the groups.

``group_size`` 32 is ours: it divides the widths of SmolLM2 (576, 1536) and Llama (4096, 14336), where AWQ's and
GPTQ's usual 128 does not divide 576. A layer whose input width is not a multiple of it uses the largest group that
divides both (their gcd), and the report names it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

BITS = (8, 4)
GROUP_SIZE = 32


def unavailable() -> str | None:
    """Why the quantization attack cannot run here (torchao missing or too old), or None when it can. Cheap: the
    callers ask before any model loads (the demo leaves the attack out and says so; ``bs-unlearn attack`` refuses)."""
    try:
        _torchao()
    except ValueError as e:
        return str(e)
    return None


def _torchao():
    try:
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:  # optional extra
        raise ValueError(f"the quantization attack needs torchao >= 0.18 (pip install -e '.[attacks]', or pip install "
                         f"torchao): {e}") from None
    return IntxWeightOnlyConfig, PerGroup, quantize_


def _qdtype(bits: int) -> torch.dtype:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return torch.int8 if bits == 8 else torch.int4


@torch.no_grad()
def quantize_linear_weights(model: torch.nn.Module, bits: int, group_size: int = GROUP_SIZE) -> dict[str, Any]:
    """Quantize every ``nn.Linear`` weight of ``model`` in place to ``bits`` (8 or 4) with torchao, group-wise
    symmetric round-to-nearest, and write the dequantized values back as the layer's float weight (its dtype and
    device kept). Returns ``{"bits", "group_size", "layers", "params", "groups": {g: n_layers}, "qmin", "qmax",
    "max_abs_error", "scheme"}``, read from the torchao tensors."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    config_cls, per_group, quantize_ = _torchao()
    qdtype = _qdtype(bits)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    report: dict[str, Any] = {"bits": bits, "group_size": group_size, "layers": 0, "params": 0, "groups": {},
                              "qmin": None, "qmax": None, "max_abs_error": 0.0,
                              "scheme": f"torchao IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, "
                                        f"granularity=PerGroup(g)), symmetric round-to-nearest, dequantized"}
    for name, layer in linears:
        weight = layer.weight
        dtype, device = weight.dtype, weight.device
        g = math.gcd(group_size, weight.shape[1])
        # quantize a float32 copy in a throwaway holder: the model's own module (and a tied embedding) stay
        # untouched until the dequantized values are written back
        holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device, dtype=torch.float32)
        holder.weight.data.copy_(weight.detach().float())
        quantize_(holder, config_cls(weight_dtype=qdtype, granularity=per_group(g)))
        qt = holder.weight
        qdata = getattr(qt, "qdata", None)
        if qdata is None:  # pragma: no cover - guards against a torchao layout change
            raise RuntimeError(f"torchao returned {type(qt).__name__} without qdata for {name}")
        lo, hi = int(qdata.min()), int(qdata.max())
        if lo < -(2 ** (bits - 1)) or hi > 2 ** (bits - 1) - 1:  # pragma: no cover - torchao contract
            raise RuntimeError(f"{name}: torchao int{bits} values span [{lo}, {hi}]")
        deq = qt.dequantize().to(dtype)
        report["max_abs_error"] = max(report["max_abs_error"], float((deq.float() - weight.float()).abs().max()))
        # a new Parameter, not an in-place copy: a tied input embedding keeps its float weight
        layer.weight = torch.nn.Parameter(deq, requires_grad=weight.requires_grad)
        report["layers"] += 1
        report["params"] += weight.numel()
        report["groups"][g] = report["groups"].get(g, 0) + 1
        report["qmin"] = lo if report["qmin"] is None else min(report["qmin"], lo)
        report["qmax"] = hi if report["qmax"] is None else max(report["qmax"], hi)
    report["groups"] = {str(k): v for k, v in sorted(report["groups"].items())}
    return report


def quantized_copy(model: torch.nn.Module, bits: int, group_size: int = GROUP_SIZE
                   ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A deep copy of ``model`` with ``quantize_linear_weights`` applied; ``model`` itself is not changed."""
    clone = copy.deepcopy(model)
    return clone, quantize_linear_weights(clone, bits, group_size)
