"""The one module that talks to MPI.

Everything here uses mpi4py's uppercase buffer methods on preallocated numpy arrays: no pickling on
any path that runs per token. The tensor-parallel group is whatever communicator `Comm` wraps
(COMM_WORLD by default, or a pipeline stage's sub-communicator from `split`); pipeline stages pass
residual rows and results between their roots point to point (`isend` / `irecv`, pipeline.py).

Waiting: inside a forward pass ranks use blocking collectives (MPICH spins, which is the fastest
when every rank has a core), or with poll waits (`set_poll`: ranks that share cores, or a rank held
to a CPU quota, which spinning would burn) their non-blocking twins, completed by Test() for a
few tens of microseconds and then short naps that leave the core to whoever computes. Between requests (a worker waiting for the next prompt) ranks wait
with a non-blocking broadcast polled with `Test()` and a short sleep, so an idle worker does not
burn a core (MPI.md §4). A pipeline stage waiting for its input is idle the same way (`wait_idle`);
the root waiting for a pass's results (`wait`) is under the --sync-timeout watchdog like a collective.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

ROOT = 0

# Commands of the control packet (engine.Control), root -> workers: stop, one forward pass,
# page-table updates and page copies alone (when a pass has more than its packet holds), or (between
# passes) every rank's counters to the root (gather_floats).
CMD_STOP, CMD_FORWARD, CMD_TABLES, CMD_STATS = 0, 1, 2, 3
ABORT_GRACE_SECONDS = 0.25
POLL_SPIN = 30e-6   # poll waits: spin this long, then nap between tests (_nap_seconds)


class Comm:
    """A tensor-parallel group: rank 0 is the root, every other rank a worker."""

    def __init__(self, mpi_comm=None):
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.wait_seconds = 0.0   # time spent inside per-token collectives
        self.bytes_sent = 0       # bytes this rank sent in per-token collectives
        self.sync_timeout = None  # seconds; None = wait forever (see set_sync_timeout)
        self._dog = None
        self.scatter_seconds = 0.0  # time in Scatterv while loading, and the bytes this rank received
        self.scatter_bytes = 0
        self.poll = False           # poll waits in per-token collectives (set_poll; the same on every rank)

    @property
    def is_root(self) -> bool:
        return self.rank == ROOT

    # --- hang watchdog (--sync-timeout) ------------------------------------------------------

    def set_sync_timeout(self, seconds: float | None) -> None:
        """Abort the job when this rank spends more than `seconds` inside one per-token collective
        (a peer stopped or wedged); None disables it. A daemon thread checks every 0.1 s."""
        self.sync_timeout = seconds if seconds and self.size > 1 else None
        if self.sync_timeout and self._dog is None:
            self._dog = _Watchdog(self)
            self._dog.start()

    def set_poll(self, on: bool) -> None:
        """Complete per-token collectives by polling non-blocking ones (every rank of the group must
        choose the same: a blocking and a non-blocking collective do not match). Naps use a 1 us
        timer slack (the default 50 us would add that much to every wake-up)."""
        self.poll = bool(on)
        if on:
            _set_timer_slack_ns(1000)

    def _arm(self, what: str = "a collective") -> None:
        if self._dog is not None:
            self._dog.what = what
            self._dog.deadline = time.monotonic() + self.sync_timeout

    def _disarm(self) -> None:
        if self._dog is not None:
            self._dog.deadline = None

    # --- start-up (not per token) ----------------------------------------------------------

    def bcast_bytes(self, data: bytes | None) -> bytes:
        """Broadcast a byte string from the root (length first, then the bytes)."""
        n = np.array([len(data) if self.is_root else 0], dtype=np.int64)
        self.comm.Bcast(n, root=ROOT)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.is_root else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=ROOT)
        return buf.tobytes()

    def bcast_array(self, arr: np.ndarray) -> None:
        """Broadcast a preallocated array in place from the root."""
        self.comm.Bcast(arr, root=ROOT)

    def scatterv(self, sendbuf: np.ndarray | None, counts: list[int], recvbuf: np.ndarray,
                 displs: list[int] | None = None) -> None:
        """Send each rank its byte range of the root's sendbuf (by default laid out back to back
        in rank order)."""
        if displs is None:
            displs = np.concatenate([[0], np.cumsum(counts[:-1])])
        displs = np.asarray(displs, dtype=np.int64)
        t = time.perf_counter()
        counts = np.asarray(counts, dtype=np.int64)
        send = [sendbuf, (counts, displs), MPI.BYTE] if self.is_root else None
        self.comm.Scatterv(send, [recvbuf, MPI.BYTE], root=ROOT)
        self.scatter_seconds += time.perf_counter() - t
        self.scatter_bytes += recvbuf.nbytes

    def gather_floats(self, values: np.ndarray) -> np.ndarray | None:
        """Gather a small float64 vector from every rank to the root ([size, n] there)."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty((self.size, values.size), np.float64) if self.is_root else None
        self.comm.Gather(values, out, root=ROOT)
        return out

    def local_size(self) -> int:
        """How many ranks of this group run on this rank's host (MPI's shared-memory split).
        Collective; start-up only."""
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return local.Get_size()
        finally:
            local.Free()

    def gather_object(self, obj) -> list | None:
        """A small picklable value from every rank, as a list on the root (start-up only)."""
        return self.comm.gather(obj, root=ROOT)

    def rank_pids(self) -> list[tuple[int, str]] | None:
        """(pid, host) of every rank, on the root (start-up only: pickled gather)."""
        return self.comm.gather((os.getpid(), MPI.Get_processor_name()), root=ROOT)

    def barrier(self) -> None:
        self.comm.Barrier()

    def split(self, color: int | None, key: int = 0) -> "Comm | None":
        """Collective: the sub-group of the ranks that pass the same color (None: in no group, and
        None is returned). Start-up only (pipeline stages, their loading groups)."""
        sub = self.comm.Split(MPI.UNDEFINED if color is None else color, key)
        if sub == MPI.COMM_NULL:
            return None
        c = Comm(sub)
        c.poll = self.poll
        if self.sync_timeout:
            c.set_sync_timeout(self.sync_timeout)
        return c

    def dup(self) -> "Comm":
        """Collective: the same ranks in a separate matching context (point-to-point traffic that must
        not meet any other message of this group), under the same watchdog setting."""
        c = Comm(self.comm.Dup())
        c.poll = self.poll
        if self.sync_timeout:
            c.set_sync_timeout(self.sync_timeout)
        return c

    def allgather_floats(self, values) -> np.ndarray:
        """Every rank's small float64 vector on every rank ([size, n]; start-up only)."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty((self.size, values.size), np.float64)
        self.comm.Allgather(values, out)
        return out

    def host(self) -> str:
        return MPI.Get_processor_name()

    # --- per token ------------------------------------------------------------------------

    def send_control(self, ctrl: np.ndarray) -> None:
        """Root: start a forward pass (or stop) on every worker."""
        if self.size > 1:
            # Workers may be polling an Ibcast: the root must use the non-blocking call too.
            self._arm()
            self._complete(self.comm.Ibcast(ctrl, root=ROOT))
            self._disarm()

    def wait_control(self, ctrl: np.ndarray, spin_seconds: float = 0.05) -> None:
        """Worker: receive the next control packet. Spins briefly (the next token comes fast; with
        poll waits only POLL_SPIN, then short naps), then polls with sleeps growing from 1 ms to
        10 ms, so an idle worker (between chat turns or API requests) costs ~no CPU and answers a
        new request within 10 ms."""
        _poll(self.comm.Ibcast(ctrl, root=ROOT), POLL_SPIN if self.poll else spin_seconds, idle=True)

    def bcast_f32(self, arr: np.ndarray) -> None:
        if self.size > 1:
            t = time.perf_counter()
            self._arm()
            if self.poll:
                _poll(self.comm.Ibcast(arr, root=ROOT), POLL_SPIN)
            else:
                self.comm.Bcast(arr, root=ROOT)
            self._disarm()
            self.wait_seconds += time.perf_counter() - t
            if self.is_root:
                self.bytes_sent += arr.nbytes * (self.size - 1)

    # any array: MPI sends the array's own type (the int32 words of grammar masks)
    bcast_masks = bcast_f32

    def allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        t = time.perf_counter()
        self._arm()
        if self.poll:
            _poll(self.comm.Iallgather(send, recv), POLL_SPIN)
        else:
            self.comm.Allgather(send, recv)
        self._disarm()
        self.wait_seconds += time.perf_counter() - t
        self.bytes_sent += send.nbytes * (self.size - 1)

    def alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs) -> None:
        """Byte-level Alltoallv; counts/displacements are preallocated int arrays (bytes)."""
        t = time.perf_counter()
        self._arm()
        bufs = ([send, (send_counts, send_displs), MPI.BYTE], [recv, (recv_counts, recv_displs), MPI.BYTE])
        if self.poll:
            _poll(self.comm.Ialltoallv(*bufs), POLL_SPIN)
        else:
            self.comm.Alltoallv(*bufs)
        self._disarm()
        self.wait_seconds += time.perf_counter() - t
        self.bytes_sent += int(send_counts.sum() - send_counts[self.rank])

    def allgatherv(self, send, recv, counts, displs) -> None:
        t = time.perf_counter()
        self._arm()
        bufs = ([send, MPI.BYTE], [recv, (counts, displs), MPI.BYTE])
        if self.poll:
            _poll(self.comm.Iallgatherv(*bufs), POLL_SPIN)
        else:
            self.comm.Allgatherv(*bufs)
        self._disarm()
        self.wait_seconds += time.perf_counter() - t
        self.bytes_sent += int(counts[self.rank]) * (self.size - 1)

    def gather_f64(self, send: np.ndarray, recv: np.ndarray) -> None:
        """A few float64 values from every rank to the root ([size, n] there; preallocated)."""
        t = time.perf_counter()
        if self.poll:
            _poll(self.comm.Igather(send, recv if self.is_root else None, root=ROOT), POLL_SPIN)
        else:
            self.comm.Gather(send, recv if self.is_root else None, root=ROOT)
        self.wait_seconds += time.perf_counter() - t
        if not self.is_root:
            self.bytes_sent += send.nbytes

    def gatherv_f32(self, send: np.ndarray, recv: np.ndarray | None, counts, displs) -> None:
        t = time.perf_counter()
        self._arm()
        bufs = (send, [recv, (counts, displs), MPI.FLOAT] if self.is_root else None)
        if self.poll:
            _poll(self.comm.Igatherv(*bufs, root=ROOT), POLL_SPIN)
        else:
            self.comm.Gatherv(*bufs, root=ROOT)
        self._disarm()
        self.wait_seconds += time.perf_counter() - t
        if not self.is_root:
            self.bytes_sent += send.nbytes

    # --- point to point (pipeline stages; preallocated buffers, no pickling) ------------------

    def isend(self, buf: np.ndarray, dest: int, tag: int):
        """Start sending buf (which must stay untouched until the request completes)."""
        self.bytes_sent += buf.nbytes
        return self.comm.Isend([buf, MPI.BYTE], dest=dest, tag=tag)

    def irecv(self, buf: np.ndarray, source: int, tag: int):
        """Post a receive into buf (a message may be shorter than buf)."""
        return self.comm.Irecv([buf, MPI.BYTE], source=source, tag=tag)

    def wait(self, req) -> None:
        """Wait for a request that the pass needs now (the root waiting for a pass's results): under
        the watchdog, counted as waiting, spun or polled like a collective."""
        t = time.perf_counter()
        self._arm("a pipeline transfer")
        self._complete(req)
        self._disarm()
        self.wait_seconds += time.perf_counter() - t

    def wait_idle(self, req, spin_seconds: float = 0.05) -> None:
        """Wait for a request that may take as long as the user likes (a stage waiting for its next
        input): not under the watchdog; polls like wait_control."""
        _poll(req, POLL_SPIN if self.poll else spin_seconds, idle=True)

    def _complete(self, req) -> None:
        if self.poll:
            _poll(req, POLL_SPIN)
        else:
            req.Wait()

    @staticmethod
    def test(req) -> bool:
        """One progress poke: True when the request has completed."""
        return req.Test()

    # --- failure ---------------------------------------------------------------------------

    def abort(self, code: int = 2) -> None:
        """End every rank of the job now (an error on one rank must not leave others blocked)."""
        sys.stdout.flush()
        sys.stderr.flush()
        if MPI.COMM_WORLD.Get_size() > 1:
            # MPI_Abort makes mpiexec kill every rank and exit at once; under load it sometimes exits
            # before its proxy has forwarded our last lines (the user then sees nothing at all, ~2%
            # of runs). A short pause lets the `error:` line through first. Always the whole job,
            # also from a pipeline stage's sub-group.
            time.sleep(ABORT_GRACE_SECONDS)
            MPI.COMM_WORLD.Abort(code)
        os._exit(code)


class _Watchdog(threading.Thread):
    """Ends the job when the rank it watches has been inside one collective past its deadline."""

    def __init__(self, comm: Comm):
        super().__init__(name="dllama-sync-watchdog", daemon=True)
        self.comm = comm
        self.deadline: float | None = None
        self.what = "a collective"

    def run(self) -> None:
        while True:
            time.sleep(0.1)
            d = self.deadline
            if d is not None and time.monotonic() > d:
                c = self.comm
                rank = MPI.COMM_WORLD.Get_rank()   # a stage's sub-group numbers its ranks from 0
                print(f"error: rank {rank}: no progress in {self.what} for {c.sync_timeout:g} s "
                      f"(--sync-timeout); a peer is stopped, wedged or unreachable", file=sys.stderr, flush=True)
                c.abort(3)


def _nap_seconds(waited: float, idle: bool) -> float:
    """Naps grow with the wait: 10 us for the first 100 us (a collective whose peer is about to
    arrive; such naps cost ~40 % of a core), then 100 us (~7 % of a core: a rank held to a CPU quota
    must not spend it waiting), and, idle after 50 ms, 1 ms and after a second 10 ms (between
    requests)."""
    if waited < 1e-4:
        return 1e-5
    if waited < 0.05 or not idle:
        return 1e-4
    return 1e-3 if waited < 1.0 else 1e-2


def _poll(req, spin_seconds: float, idle: bool = False) -> None:
    """Test() until the request completes: spin for spin_seconds, then nap between tests."""
    if req.Test():
        return
    t0 = time.perf_counter()
    while not req.Test():
        waited = time.perf_counter() - t0
        if waited > spin_seconds:
            time.sleep(_nap_seconds(waited, idle))


def _set_timer_slack_ns(ns: int) -> None:
    """prctl(PR_SET_TIMERSLACK) for this thread (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, ctypes.c_ulong(ns), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def world() -> Comm:
    comm = Comm(MPI.COMM_WORLD)
    _unlink_shm(comm)   # a single rank too: an error exit skips MPI_Finalize, which would unlink it
    _unlink_hydra_topology()   # after _unlink_shm's barrier: every local rank is past MPI_Init
    return comm


def solo() -> Comm:
    """This rank alone (MPI.COMM_SELF): a model run whole on one rank, beside the job's own (the
    speculative draft model, speculative.DraftModel); its passes never wait on another rank."""
    return Comm(MPI.COMM_SELF)


def _unlink_shm(comm: Comm) -> None:
    """Remove MPICH's shared-memory file(s) from /dev/shm as soon as every rank has mapped them.
    MPICH unlinks them only in MPI_Finalize, so every job that ends by MPI_Abort, a signal or a
    killed rank left ~2 MB behind in /dev/shm; the mappings stay valid after the unlink."""
    comm.barrier()   # MPI_Init has attached every local rank; this makes sure all of them returned
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if "/dev/shm/mpich" in line}
    except (OSError, IndexError):
        return
    for p in paths:
        if p.startswith("/dev/shm/mpich") and not p.endswith("(deleted)"):
            try:
                os.unlink(p)
            except OSError:
                pass


def _unlink_hydra_topology() -> None:
    """Remove the hwloc topology file MPICH's hydra_pmi_proxy (this rank's parent) writes for its
    ranks' MPI_Init, /tmp/hydra_hwloc_xmlfile_XXXXXX: the proxy unlinks it only when the job ends
    cleanly, so every job that ended by MPI_Abort (any error exit) left one behind (~5 KB; 384 of them
    in /tmp after two days of this project's tests). Called once every rank is past MPI_Init (world(),
    after the start-up barrier), so every local rank has read it; the proxy keeps its descriptor, and
    nothing reads the path again."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/comm") as f:
            if f.read().strip() != "hydra_pmi_proxy":
                return
        fds = os.listdir(f"/proc/{ppid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            path = os.readlink(f"/proc/{ppid}/fd/{fd}")
            if os.path.basename(path).startswith("hydra_hwloc_xmlfile_"):
                os.unlink(path)   # every local rank tries: the first one wins
        except OSError:
            pass


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0]

