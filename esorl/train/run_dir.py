"""A run directory has one owner and one history.

* **One history.** A directory that already holds a run (metrics, checkpoints or a model) is
  only written to again by ``--resume`` (continue that run) or ``--overwrite`` (delete its
  artefacts first); anything else is refused before any work, saying so.
* **One owner.** While a run writes to a directory it holds ``<dir>/.esorl.lock`` (pid,
  host, start time, command). A second run that finds the lock of a live process refuses
  to start; the lock of a process that no longer exists (``kill -9``) is taken over.
* **Safe interrupts.** :class:`GracefulStop` turns the first SIGINT / SIGTERM (Ctrl-C, a
  scheduler's preemption) into a request that every rank sees at the same step boundary; the
  loop then saves a checkpoint and raises :class:`RunInterrupted`, whose one-line message
  says where the run stopped and the command that resumes it. A second signal aborts at once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

LOCK = ".esorl.lock"
#: what a run writes into its directory (``--overwrite`` deletes exactly these)
ARTEFACTS = ("metrics.jsonl", "checkpoints", "model", "config.yaml", "wandb", "completions.jsonl", "reward_curve.png",
             "value_head.safetensors", "model.tmp", ".wandb_run_id")
#: set by the command line: the command as the user typed it, for "resume with: ..."
INVOCATION: list[str] | None = None


class RunDirError(FileExistsError):
    """The output directory belongs to another run (or holds one that would be mixed in)."""


class RunInterrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint; the message says how to resume."""


def _history(out: Path) -> list[str]:
    found = []
    if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
        found.append("metrics.jsonl")
    ck = out / "checkpoints"
    if ck.is_dir() and any(p.is_dir() and not p.name.endswith(".tmp") for p in ck.glob("step-*")):
        found.append(f"{sum(1 for p in ck.glob('step-*') if not p.name.endswith('.tmp'))} checkpoint(s)")
    if (out / "model" / "config.json").is_file():
        found.append("model/")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder(out: Path) -> dict | None:
    """The live run holding ``out``'s lock, or ``None`` (no lock, or a stale one)."""
    f = out / LOCK
    try:
        info = json.loads(f.read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
        return None  # its process is gone (crash, kill -9): stale
    if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return None
    return info


def precheck(out: str | Path, resume, overwrite: bool, what: str = "training.output_dir") -> None:
    """The checks of :func:`claim` without taking the directory: called by the command line
    before any set-up work (loading models, building rewards), so that a used or busy
    directory is refused at once. :func:`claim` checks again when the run starts."""
    out = Path(out)
    holder = _lock_holder(out)
    if holder is not None:
        raise RunDirError(_busy(out, holder, what))
    found = _history(out)
    if found and resume in (False, None, "", "false") and not overwrite:
        raise RunDirError(_used(out, found, what))


def _busy(out: Path, holder: dict, what: str) -> str:
    return (f"{what}={out} is in use by another esorl run (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}: {holder.get('command', '?')}). Wait for it, or use another {what}; if no run is active "
            f"(e.g. it was killed on another machine), delete {out / LOCK}.")


def _used(out: Path, found: list[str], what: str) -> str:
    return (f"{what}={out} already holds a run ({', '.join(found)}). Continue it with --resume, choose another {what}, "
            f"or pass --overwrite to delete its artefacts and start over.")


def claim(out: str | Path, resume, overwrite: bool, accelerator=None, what: str = "training.output_dir") -> "RunLock":
    """Check and take ownership of ``out`` before any work (call on every rank; without an
    ``accelerator``, only the process with ``RANK`` 0 takes the lock).

    ``resume``: the run's ``--resume`` value (falsy = a new run; ``"auto"`` = continue if
    there is something to continue, as the comparison and chained pretraining do).
    Raises :class:`RunDirError` naming the directory, what it holds and what to do."""
    out = Path(out)
    main = accelerator.is_main_process if accelerator is not None else int(os.environ.get("RANK", "0")) == 0
    holder = _lock_holder(out)
    if holder is not None and (main or accelerator is not None):
        raise RunDirError(_busy(out, holder, what))
    new_run = resume in (False, None, "", "false")
    found = _history(out)
    if found and new_run and not overwrite:
        raise RunDirError(_used(out, found, what))
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank has checked before the lock is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and found:
            for name in ARTEFACTS:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    lock = RunLock(out, main)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return lock


class RunLock:
    """The lock file of a claimed directory (main process); released by :meth:`release`,
    at interpreter exit, or taken over once its process is gone."""

    def __init__(self, out: Path, owner: bool):
        self.path = out / LOCK
        self.owner = False
        if owner:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": " ".join(INVOCATION or sys.argv)}
            self._create(json.dumps(info).encode())
            self.owner = True
            import atexit

            atexit.register(self.release)

    def _create(self, data: bytes) -> None:
        """Create the lock atomically (``O_EXCL``: of two runs racing, exactly one wins); a
        stale lock (its process is gone) is first moved aside by an atomic rename."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(self.path.parent)
                if holder is not None:
                    raise RunDirError(_busy(self.path.parent, holder, "output_dir")) from None
                try:  # stale: only one of several contenders can rename it away
                    os.rename(self.path, self.path.with_name(f"{LOCK}.stale{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{LOCK}.stale{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return
        raise RunDirError(f"could not take the lock {self.path} (another run is starting at the same time)")

    def release(self) -> None:
        if self.owner:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (FileNotFoundError, json.JSONDecodeError, OSError):
                pass
            self.owner = False


def resume_command() -> str:
    """The command that resumes this run: the user's command with ``--resume`` (``esorl
    compare`` resumes by being run again: it skips finished arms and continues the others)."""
    argv = list(INVOCATION) if INVOCATION else ["esorl", *sys.argv[1:]]
    if len(argv) > 1 and argv[1] == "compare":
        return " ".join(shlex.quote(a) for a in argv if a != "--overwrite")
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--overwrite":
            continue
        if a == "--resume":
            # drop a following checkpoint path (not an override, not a flag)
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            skip = bool(nxt) and not nxt.startswith("-") and "=" not in nxt
            continue
        out.append(a)
    cmd = " ".join(shlex.quote(a) for a in out) + " --resume"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cmd = f"your `accelerate launch ...` line with: {cmd}"
    return cmd


class GracefulStop:
    """``with GracefulStop() as stop:`` … ``if stop.requested(device): save; raise``.

    The first SIGINT/SIGTERM only sets a flag (the loop stops at the next step boundary,
    where every rank agrees through :meth:`requested`); a second one raises
    ``KeyboardInterrupt`` at once. Handlers are installed only in the main thread and
    restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.flag = False
        self.signame = ""
        self._old = {}

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.signame = signal.Signals(signum).name
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n[esorl] {self.signame}: stopping after this step and saving a checkpoint (send it again to abort now)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue  # a signal the parent chose to ignore stays ignored (e.g. nohup)
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False

    def requested(self, device=None) -> bool:
        """Whether any rank was signalled (collective when distributed: call on every rank)."""
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1.0 if self.flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
        return self.flag
