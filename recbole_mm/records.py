"""Run records that survive faults: a ``running`` marker written when a run starts, so that a run
killed by SIGKILL or the kernel's OOM killer (which no handler can catch) is recognised as dead by
a later run or a study report, instead of leaving nothing.

``<record>.running.json`` sits next to where the run's record (``<record>.json``) will go and is
removed when the run ends in any way a process can notice (finished, failed, interrupted). One
that outlives its process (same host, pid gone) belongs to a dead run.
"""

import datetime
import glob
import json
import os
import socket

from recbole_mm.atomic import write_json_atomic


def sibling(record_path, kind):
    """``<base>.<kind>.json`` next to the record ``<base>.json`` (kind: running, failed, interrupted, dead)."""
    return os.path.splitext(record_path)[0] + f".{kind}.json"


def write_running(record_path, **info):
    path = sibling(record_path, "running")
    payload = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
               "started_at": datetime.datetime.now().isoformat(timespec="seconds"),
               "record": os.path.abspath(record_path), **info}
    write_json_atomic(path, payload)
    return path


def remove_running(record_path):
    try:
        os.remove(sibling(record_path, "running"))
    except OSError:
        pass


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError):
        return True  # exists (another user's) or unknown: not provably dead
    return True


def read_running(path):
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def is_dead(rec):
    """True when a running marker's process provably no longer exists (same host, pid gone)."""
    if not rec or rec.get("host") != socket.gethostname():
        return False
    return not _pid_alive(rec.get("pid"))


def dead_run(record_path):
    """The running marker of ``record_path`` when its process died without a record, else None."""
    rec = read_running(sibling(record_path, "running"))
    return rec if is_dead(rec) else None


def collect_dead_runs(folder, logger=None):
    """Turn every dead ``*.running.json`` in ``folder`` into ``*.dead.json`` (status ``dead``) and
    report it; returns their paths. Called when a run starts in the same log folder."""
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "*.running.json"))):
        rec = read_running(path)
        if not is_dead(rec):
            continue
        rec.update(status="dead", detected_at=datetime.datetime.now().isoformat(timespec="seconds"),
                   error="the process ended without writing a record: killed by SIGKILL or the OOM killer, "
                         "or the machine went down")
        dead = path[: -len(".running.json")] + ".dead.json"
        write_json_atomic(dead, rec)
        try:
            os.remove(path)
        except OSError:
            pass
        found.append(dead)
        if logger is not None:
            logger.warning(f"an earlier run (pid {rec.get('pid')}, started {rec.get('started_at')}) died without a "
                           f"record (SIGKILL or the OOM killer?): marked dead in {dead}")
    return found
