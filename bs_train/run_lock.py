"""The run folder's lock: one process at a time writes a run folder (a training run, a recipe).

``run.lock`` holds the writer's PID, host and start time, created with ``O_EXCL`` so two processes cannot both take
it. A second writer is refused in one line naming the holder; the lock of a process that is gone (a kill leaves it
behind) is taken over, saying so; a lock on another host is never taken over (its PID means nothing here).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

LOCK = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """One writer per run folder: ``run.lock`` holds the writer's PID and host. A second process is refused in one
    line naming the holder's PID; the lock of a process that is gone (killed: it could not remove it) is taken over,
    saying so. Only rank 0 of a torchrun job takes it."""

    def __init__(self, run_dir: Path, say: Callable[[str], None] = print):
        self.path, self.say, self.held = Path(run_dir) / LOCK, say, False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder == {}:  # removed meanwhile
                    continue
                if holder is None:  # unreadable: its writer was killed while writing it, or is writing it now
                    if time.time() - self.path.stat().st_mtime < 5:
                        time.sleep(1)
                        continue
                    self.say(f"bs-unlearn: taking over {self.path}: it is unreadable (its writer was killed)")
                else:
                    pid, host = holder["pid"], holder.get("host")
                    if host != me["host"]:
                        raise ValueError(f"{self.path.parent} is in use by PID {pid} on host {host} (since "
                                         f"{holder.get('since')}); if that run is gone, delete {self.path}")
                    if pid != me["pid"] and _alive(pid):
                        raise ValueError(f"{self.path.parent} is in use by another run: PID {pid} (since "
                                         f"{holder.get('since')}, lock {self.path}); wait for it or use another "
                                         "output folder")
                    self.say(f"bs-unlearn: taking over {self.path} from PID {pid}, which is no longer running")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ValueError(f"{self.path}: could not take the lock (another process keeps taking it)")

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink()
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
