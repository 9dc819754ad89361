"""Finding the processes a test started (mpiexec, hydra proxies, ranks) through /proc."""

import os
import time
from pathlib import Path


def our_processes(marker: str) -> list[int]:
    """Processes started with DLLAMA_TEST_MARKER=marker in their environment."""
    needle = f"DLLAMA_TEST_MARKER={marker}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def left_after(marker: str, grace: float = 5.0) -> list[int]:
    """our_processes(marker) once they are gone, or after `grace` seconds (mpiexec may return a
    moment before the ranks it aborted have exited)."""
    deadline = time.time() + grace
    while True:
        left = our_processes(marker)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.05)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        try:
            kids = Path(f"/proc/{cur}/task/{cur}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out.append(k)
            todo.append(k)
    return out


def environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
