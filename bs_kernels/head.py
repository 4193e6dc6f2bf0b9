"""Language-model heads whose logits are not plain ``h W^T``: a bias, a logit scale and final soft-capping.

Every fused op of ``bs_kernels`` computes the logits of a head as

    x = h W^T + b                                   (the GEMM; ``bias`` b is optional)
    z = softcap * tanh(logit_scale * x / softcap)   (``softcap`` set: Gemma-2's final_logit_softcapping)
    z = logit_scale * x                             (``softcap=None``: Cohere's logit_scale, 1 / Granite's
                                                     logits_scaling; 1 is the plain head)

and scores ``z`` exactly as it would a plain head's logits (top-k, softmax and all), so a transformed head is held
to the naive formula with the same transform by the tests. The chain rule through the transform is folded into the
row pass of both implementations: ``dz/dx = logit_scale * (1 - (z / softcap)^2)``, a function of z alone, so the
backward needs nothing beyond what a plain head's needs.

``LMHead`` bundles a head's tensors and options for callers that carry them together (``bs_train``'s loss roots,
``bs_kernels.hf.lm_head``); ``LMHead.options()`` is the keyword arguments every public op takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def transform_logits(x: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``z`` from the head's raw logits ``x = h W^T + b`` (out of place, differentiable): the naive formula."""
    if softcap is not None:
        return softcap * torch.tanh(x * (logit_scale / softcap))
    return x * logit_scale if logit_scale != 1.0 else x


@dataclass(frozen=True)
class LMHead:
    """An lm_head: ``weight`` [V, D], optional ``bias`` [V], and the transform of its logits (module docstring)."""

    weight: torch.Tensor
    """The lm_head weight [V, D]."""
    bias: torch.Tensor | None = None
    """Optional bias [V], added to ``h W^T`` (Phi's head)."""
    logit_scale: float = 1.0
    """s > 0 multiplying the logits (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``); 1: none."""
    softcap: float | None = None
    """c > 0 for ``z = c tanh(s x / c)`` (Gemma-2's ``final_logit_softcapping``), or None: no cap."""

    @property
    def is_plain(self) -> bool:
        """Whether the logits are exactly ``h W^T``."""
        return self.bias is None and self.logit_scale == 1.0 and self.softcap is None

    def options(self) -> dict:
        """The keyword arguments (``bias``, ``logit_scale``, ``softcap``) of every public op of ``bs_kernels``."""
        return {"bias": self.bias, "logit_scale": self.logit_scale, "softcap": self.softcap}

    def to(self, dtype: torch.dtype) -> LMHead:
        """The same head with its weight and bias in ``dtype`` (differentiable casts: under autocast the loss runs in
        the compute dtype and the gradients flow back to the master weights)."""
        def cast(t):
            return t if t is None or t.dtype == dtype else t.to(dtype)

        return LMHead(cast(self.weight), cast(self.bias), self.logit_scale, self.softcap)

    def detach(self) -> LMHead:
        """The same head with its weight and bias detached from autograd (a frozen teacher's, a reference's)."""
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.logit_scale,
                      self.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits ``[..., V]`` of ``hidden [..., D]``: for small shapes (tests, one decode step), never for a
        loss over many tokens."""
        x = torch.nn.functional.linear(hidden, self.weight, self.bias)
        return transform_logits(x, logit_scale=self.logit_scale, softcap=self.softcap)
