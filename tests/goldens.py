"""Shared helpers for the golden-output tests (single rank and under mpiexec)."""

import json

import numpy as np

from dllama_mpi.comm import Comm
from dllama_mpi.engine import build_engine

from conftest import TINY


def golden(case: str) -> tuple[dict, np.ndarray]:
    meta = json.loads((TINY / "golden" / f"{case}.json").read_text())
    logits = np.load(TINY / "golden" / meta["logits_file"].split("/")[-1])
    return meta, logits


def model_path(name: str) -> str:
    return str(TINY / "m" / f"dllama_model_{name}.m")


def teacher_forced_logits(comm: Comm, name: str, case: str, **kw):
    """Logits at every position for the golden's prompt + generated tokens (root: array; workers: None)."""
    meta, _ = golden(case)
    engine = build_engine(comm, model_path(name) if comm.is_root or kw.get("load") == "local" else None, **kw)
    if not comm.is_root:
        engine.serve()
        return None, engine
    try:
        ids = meta["prompt_ids"] + meta["generated_ids"][:-1]
        return engine.forward(ids, 0, all_logits=True), engine
    finally:
        engine.stop_workers()


def greedy_ids(comm: Comm, name: str, prompt_ids, steps: int, argmax: bool = False, **kw):
    """Greedy generation through the engine (root: list of ids; workers: None): np.argmax of the
    gathered logits, or with argmax=True the engine's distributed (value, id) reduction."""
    engine = build_engine(comm, model_path(name) if comm.is_root or kw.get("load") == "local" else None, **kw)
    if not comm.is_root:
        engine.serve()
        return None
    try:
        out = []
        best = lambda r: r if argmax else int(np.argmax(r))  # noqa: E731
        t = best(engine.forward(prompt_ids, 0, argmax=argmax))
        pos = len(prompt_ids)
        for _ in range(steps):
            out.append(t)
            t = best(engine.forward([t], pos, argmax=argmax))
            pos += 1
        return out
    finally:
        engine.stop_workers()
