"""What a run shows on stderr: one progress bar that degrades to plain lines, and no third-party log spam.

* ``progress(total, desc)``: a tqdm bar when stderr is a terminal; otherwise a ``PlainProgress`` that prints one
  line (``desc: 40/200 steps (20%), 12.3 s, ~49 s left``) at most every ``PLAIN_EVERY_S`` seconds and at the end, so
  a log file gets no escape codes and no thousand carriage-return frames. Both take ``update(n)``,
  ``set_postfix(**kw)`` and ``close()``; ``enabled=False`` gives a bar that prints nothing.
* ``quiet_third_party()``: filters the known harmless messages of the libraries below us, each by its logger (or
  warning category and module) and its message, never all warnings: torchao's ``Failed to load ..._C_*.so`` (its
  optional CUDA extensions, absent on this build), torch's pytree "Enum subclass ... register_constant() ...
  deprecated" (emitted while torchao registers its enums), torch.distributed.checkpoint's "assuming the intent is to
  save in a single process" (a single process is what a run without torchrun is), and transformers' own
  "Writing model shards" / "Loading weights" bars (ours is the one bar; Hub download bars are left alone). The CLI
  calls it at start and again once transformers is imported; ``BS_UNLEARN_VERBOSE=1`` skips it.

It imports nothing of ``bs_train`` (the trainer, the evaluation, the demo and the CLI all sit above it).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_S = 30.0  # ours: a line every 30 s keeps a 10-minute log readable (about 20 lines per bar)

# (logger name, message pattern) of the harmless messages filtered by quiet_third_party
_LOG_FILTERS = (
    ("torchao", re.compile(r"Failed to load .*_C_.*\.so")),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported")),
)
# (warning category, message regex, module regex) for warnings.filterwarnings
_WARNING_FILTERS = (
    (FutureWarning, r".*register_constant\(\) on Enum subclasses is deprecated", r"torch\.utils\._pytree"),
    (UserWarning, r".*Failed to load .*_C_.*\.so", r"torchao.*"),
    (UserWarning, r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to "
                  r"(save|load) in a single process", r"torch\.distributed\.checkpoint.*"),
)


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party(models: bool = False) -> None:
    """Install the filters above (idempotent). Anything else the libraries log or warn still shows. ``models``: the
    command will load a model, so transformers may be imported now to switch its own bars off."""
    import warnings

    if os.environ.get("BS_UNLEARN_VERBOSE"):
        return
    for name, pattern in _LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MessageFilter) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_MessageFilter(pattern))
    for category, message, module in _WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if models or "transformers" in sys.modules:  # not imported for `bs-unlearn --help` / `config`: they stay fast
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class PlainProgress:
    """A progress report for a log file: one plain line at most every ``every_s`` seconds, and one at ``close``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, *,
                 every_s: float = PLAIN_EVERY_S, file: TextIO | None = None, enabled: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_s, self.file, self.enabled = every_s, file, enabled
        self.t0 = self._last = time.perf_counter()
        self._start_n, self.postfix, self._closed = initial, "", False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {_fmt_s(elapsed)}"
        moved = self.n - self._start_n
        if self.total and 0 < moved and self.n < self.total:
            text += f", ~{_fmt_s(elapsed / moved * (self.total - self.n))} left"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _print(self) -> None:
        if self.enabled:
            print(self.line(), file=self.file or sys.stderr, flush=True)
        self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self._last >= self.every_s:
            self._print()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def progress(total: int | None, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
             leave: bool = True) -> Any:
    """A tqdm bar on a terminal, a ``PlainProgress`` otherwise (also when ``enabled`` is False: it then prints
    nothing); both have ``update``, ``set_postfix`` and ``close``."""
    if enabled and is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    return PlainProgress(total, desc, unit, initial, enabled=enabled)
