"""One job per workdir: `hold(W)`, the lock that writing commands take.

Two trainings in one workdir would interleave their checkpoints, metrics.csv
rows and event files. Every command that writes a workdir (train, search,
reproduce, import-unsup3d, `make run`; and `workdir.Run.open` for the
library's own producers) holds W/workdir.lock while it runs:

  * an exclusive `flock` on that file (the kernel drops it when the process
    dies, however it dies), so on one host a held lock is never mistaken for
    a stale one, nor a stale one for a held one;
  * the holder's pid, host, start time and command, written into the file, so
    a refusal names who holds it, and a lock left on a shared filesystem by
    another machine (whose flock this host may not see) is still refused.

A lock file left by a process that died on this host (SIGKILL, power cut) is
taken over with a note; one left by another host is refused with the host,
the pid and how to override (delete the file). The lock is re-entrant within
a thread (another thread of the process is refused), released (the file removed) on return, on exceptions and on
SIGTERM (turned into SystemExit while the lock is held, when no other handler
is installed); under jax.distributed only process 0 takes it.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading

from scr_jax import cliutil
from scr_jax.errors import UserError

LOCK_FILE = "workdir.lock"
_HELD = {}  # realpath of a workdir -> [fd, depth, thread]: re-entrant within a thread


def probe_writable(workdir: str):
  """Fails early (before any compile or training) if the workdir can't be
  written: 64 KiB written, synced and removed (a full disk or a quota shows
  here, not at the first checkpoint). Called by `hold` when it takes the lock.

  Raises:
    UserError: one line with the OS's reason.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "wb") as fh:
      fh.write(b"\0" * 65536)
      fh.flush()
      os.fsync(fh.fileno())
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def read_holder(workdir: str):
  """The holder recorded in W/workdir.lock (dict pid, host, started, command),
  or None without a (readable) lock file. Says nothing about liveness."""
  try:
    with open(lock_path(workdir), encoding="utf-8-sig") as fh:
      rec = json.load(fh)
  except (OSError, ValueError):
    return None
  return rec if isinstance(rec, dict) else None


def _who(rec) -> str:
  if not rec:
    return "another process (it has not written its name yet)"
  cmd = rec.get("command") or ""
  cmd = f", `{cmd[:80]}`" if cmd else ""
  return f"pid {rec.get('pid')} on host {rec.get('host')}, started {rec.get('started')}{cmd}"


def _record() -> dict:
  return dict(pid=os.getpid(), host=socket.gethostname(),
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              command=" ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:]))


def _read_fd(fd):
  os.lseek(fd, 0, os.SEEK_SET)
  raw = b""
  while True:
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    raw += chunk
  try:
    rec = json.loads(raw.decode("utf-8-sig")) if raw.strip() else None
  except ValueError:
    rec = None
  return rec if isinstance(rec, dict) else None


def _acquire(workdir: str, log) -> int:
  """Takes the lock; returns its file descriptor. Raises UserError (held)."""
  path = lock_path(workdir)
  me = _record()
  for _ in range(20):  # the file we lock may be removed by its holder meanwhile: retry
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"{path}: cannot create the workdir lock ({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a running process (this host, or one whose lock NFS relays)
      holder = _read_fd(fd)
      os.close(fd)
      raise UserError(f"{workdir} is in use by another job ({_who(holder)}): wait for it to "
                      "end, or use another --workdir") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:  # locked a file its holder had just removed: take the new one
      os.close(fd)
      continue
    old = _read_fd(fd)
    if old is not None:
      if old.get("host") != me["host"]:
        os.close(fd)
        raise UserError(f"{workdir} is in use by pid {old.get('pid')} on host {old.get('host')} "
                        f"(started {old.get('started')}; lock file {path}); if no job runs "
                        f"there any more, delete {path} and rerun")
      # This host, and nobody holds the flock: its holder died without releasing it.
      log(f"note: {path}: taking over a stale lock of pid {old.get('pid')} (started "
          f"{old.get('started')}), which is no longer running")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me, indent=1).encode())
    os.fsync(fd)
    return fd
  raise UserError(f"{path}: could not take the workdir lock (another job keeps replacing it)")


def _release(workdir: str, fd: int):
  path = lock_path(workdir)
  try:
    if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
      os.remove(path)  # while still locked: nobody can take it in between
  except OSError:
    pass
  finally:
    os.close(fd)


def _sigterm_to_exit(signum, frame):
  raise SystemExit(128 + signum)


@contextlib.contextmanager
def hold(workdir: str, log=cliutil.log):
  """Holds workdir W's lock for the duration of the block (see module doc).
  Taking it (the outermost hold, process 0) first probes that W can be
  written (`probe_writable`): every writing command holds the lock, so this
  is the one place the probe runs.

  Raises:
    UserError: W is not writable, or another job holds it (same host: its
      pid, host, start and command; another host: also the lock file to
      delete if that job is gone).
  """
  try:
    import jax
    primary = jax.process_index() == 0
  except Exception:  # noqa: BLE001 (no backend: one process)
    primary = True
  key = os.path.realpath(workdir)
  me = threading.get_ident()
  if key in _HELD and _HELD[key][2] != me:
    raise UserError(f"{workdir} is in use by another thread of this process (pid "
                    f"{os.getpid()}); use another workdir")
  if not primary or key in _HELD:
    if key in _HELD:
      _HELD[key][1] += 1
    try:
      yield
    finally:
      if key in _HELD:
        _HELD[key][1] -= 1
    return
  probe_writable(workdir)  # (also creates W)
  fd = _acquire(workdir, log)
  _HELD[key] = [fd, 1, me]
  old_term = None
  if threading.current_thread() is threading.main_thread():
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
      old_term = signal.signal(signal.SIGTERM, _sigterm_to_exit)
  try:
    yield
  finally:
    if old_term is not None:
      signal.signal(signal.SIGTERM, old_term)
    del _HELD[key]
    _release(workdir, fd)
