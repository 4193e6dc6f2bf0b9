"""Batches for training and scoring: right-padded collation and the paired forget/retain sampler.

* ``collate`` turns encoded rows (``input_ids``, unshifted ``labels``, ``index``) into right-padded ``[B, T]`` int64
  batches; with ``mask_pad_tokens=True`` its attention mask is open-unlearning's ``input_ids != pad`` instead;
* ``ForgetRetainSampler`` yields paired (forget, retain) index batches from explicit seeded generators, with a
  ``state_dict`` so a resumed run sees exactly the index sequence of an uninterrupted one; with ``lengths`` and a
  ``bucket_window`` it groups examples of similar length into the same batch, so little of a batch is padding.

Both are indifferent to what the rows are: question/answer pairs (``qa.py``) or raw-text windows (``text.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from bs_kernels import IGNORE_INDEX


def collate(items: list[dict[str, Any]], pad_id: int, *, mask_pad_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad items to the longest: ``input_ids`` (``pad_id``), ``attention_mask`` (0 on padding), ``labels``
    (-100 on padding), all ``[B, T]`` int64, and ``index`` ``[B]`` int64. ``mask_pad_tokens``: the attention mask is
    ``input_ids != pad_id`` instead (open-unlearning's collator: with pad == eos it masks every EOS in the text)."""
    if not items:
        raise ValueError("collate: empty batch")
    lengths = [len(it["input_ids"]) for it in items]
    for j, it in enumerate(items):
        if len(it["labels"]) != lengths[j]:
            raise ValueError(f"collate: item {j} has {lengths[j]} input_ids but {len(it['labels'])} labels")
    batch, width = len(items), max(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((batch, width), dtype=torch.int64)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.int64)
    for j, (it, n) in enumerate(zip(items, lengths)):
        input_ids[j, :n] = torch.tensor(it["input_ids"], dtype=torch.int64)
        attention_mask[j, :n] = 1
        labels[j, :n] = torch.tensor(it["labels"], dtype=torch.int64)
    index = torch.tensor([int(it["index"]) for it in items], dtype=torch.int64)
    if mask_pad_tokens:
        attention_mask = (input_ids != pad_id).to(torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": index}


# ----------------------------------------------------------------------------------------------------- sampling


def _derived_seed(seed: int, stream: str, k: int) -> int:
    """A 63-bit seed for shuffle ``k`` of ``stream``: independent streams from one user seed, stable across runs."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class ForgetRetainSampler:
    """Paired index batches: each step yields ``(forget_indices, retain_indices)`` of equal length.

    An epoch is one pass over the forget set in a fresh shuffle (shuffle ``e`` seeded from ``(seed, "forget", e)``);
    the retain indices come from a separate stream that walks through shuffles of the retain set one after another
    (shuffle ``c`` seeded from ``(seed, "retain", c)``), so over training every retain row is used equally often.
    With ``n_retain == 0`` the retain indices are ``[]``.

    ``iter(sampler)`` yields the remaining steps of the current epoch, starting at the saved position, then moves to
    the next epoch; the state is advanced *before* each batch is handed out, so ``state_dict()`` taken after a batch
    resumes at the next one (after an epoch's last batch it already points at step 0 of the next epoch).
    """

    def __init__(self, n_forget: int, n_retain: int, batch_size: int, *, seed: int, drop_last: bool = False,
                 bucket_window: int = 0, forget_lengths: list[int] | None = None,
                 retain_lengths: list[int] | None = None) -> None:
        if bucket_window < 0:
            raise ValueError(f"ForgetRetainSampler: bucket_window must be >= 0, got {bucket_window}")
        if bucket_window and (forget_lengths is None or len(forget_lengths) != n_forget):
            raise ValueError(f"ForgetRetainSampler: bucket_window={bucket_window} needs the n_forget={n_forget} "
                             f"forget lengths, got {None if forget_lengths is None else len(forget_lengths)}")
        if bucket_window and n_retain and (retain_lengths is None or len(retain_lengths) != n_retain):
            raise ValueError(f"ForgetRetainSampler: bucket_window={bucket_window} needs the n_retain={n_retain} "
                             f"retain lengths, got {None if retain_lengths is None else len(retain_lengths)}")
        if n_forget < 1:
            raise ValueError(f"ForgetRetainSampler: empty forget set (n_forget={n_forget})")
        if n_retain < 0:
            raise ValueError(f"ForgetRetainSampler: n_retain must be >= 0, got {n_retain}")
        if batch_size < 1:
            raise ValueError(f"ForgetRetainSampler: batch_size must be >= 1, got {batch_size}")
        if drop_last and n_forget < batch_size:
            raise ValueError(
                f"ForgetRetainSampler: drop_last with n_forget={n_forget} < batch_size={batch_size} gives no batches"
            )
        self.n_forget, self.n_retain, self.batch_size = n_forget, n_retain, batch_size
        self.seed, self.drop_last = seed, drop_last
        self.bucket_window = bucket_window
        self._lengths = (forget_lengths, retain_lengths) if bucket_window else (None, None)
        self._epoch = 0
        self._step = 0
        self._retain_pos = 0  # retain indices handed out so far (position in the endless retain stream)

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.n_forget // self.batch_size
        return -(-self.n_forget // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    @property
    def step(self) -> int:
        """The step within ``epoch`` of the next batch."""
        return self._step

    def _epoch_batches(self) -> list[list[int]]:
        """The forget batches of the current epoch: its shuffle cut into batches; with bucketing, every
        ``bucket_window`` batches' worth of the shuffle is sorted by length (ties keep shuffle order), cut into
        batches, and those batches are put in a seeded random order, so similar lengths share a batch while the
        order stays random (Hugging Face's ``LengthGroupedSampler`` does the same with 50-batch mega-batches)."""
        perm = _permutation(self.n_forget, _derived_seed(self.seed, "forget", self._epoch))
        perm = perm[: self.steps_per_epoch * self.batch_size]  # drop_last drops the tail; otherwise this keeps all
        bs = self.batch_size
        if not self.bucket_window:
            return [perm[i : i + bs] for i in range(0, len(perm), bs)]
        lengths, span, out = self._lengths[0], self.bucket_window * bs, []
        for w, start in enumerate(range(0, len(perm), span)):
            chunk = sorted(perm[start : start + span], key=lambda i: lengths[i])
            batches = [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
            order = _permutation(len(batches), _derived_seed(self.seed, f"bucket{self._epoch}", w))
            out.extend(batches[j] for j in order)
        return out

    def __iter__(self) -> Iterator[tuple[list[int], list[int]]]:
        batches = self._epoch_batches()
        retain_cycle, retain_perm = -1, []
        for step in range(self._step, self.steps_per_epoch):
            forget = batches[step]
            retain: list[int] = []
            n_take = len(forget) if self.n_retain else 0
            for p in range(self._retain_pos, self._retain_pos + n_take):
                cycle, offset = divmod(p, self.n_retain)
                if cycle != retain_cycle:
                    retain_cycle = cycle
                    retain_perm = _permutation(self.n_retain, _derived_seed(self.seed, "retain", cycle))
                retain.append(retain_perm[offset])
            self._retain_pos += len(retain)
            if self._lengths[1] is not None:  # the step's retain rows in length order: its micro-batches pad less
                retain.sort(key=lambda i: self._lengths[1][i])
            if step + 1 == self.steps_per_epoch:
                self._epoch, self._step = self._epoch + 1, 0
            else:
                self._step = step + 1
            yield forget, retain

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "step": self._step,
            "retain_pos": self._retain_pos,
            "seed": self.seed,
            "n_forget": self.n_forget,
            "n_retain": self.n_retain,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "bucket_window": self.bucket_window,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; raises ``ValueError`` if it was saved for other data sizes or settings."""
        for key in ("seed", "n_forget", "n_retain", "batch_size", "drop_last", "bucket_window"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"ForgetRetainSampler.load_state_dict: saved {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; resuming would give a different index sequence"
                )
        epoch, step, retain_pos = int(state["epoch"]), int(state["step"]), int(state.get("retain_pos", 0))
        if epoch < 0 or not 0 <= step < self.steps_per_epoch or retain_pos < 0:
            raise ValueError(
                f"ForgetRetainSampler.load_state_dict: invalid position epoch={epoch}, step={step}, "
                f"retain_pos={retain_pos} (steps_per_epoch={self.steps_per_epoch})"
            )
        self._epoch, self._step, self._retain_pos = epoch, step, retain_pos
