"""The residual reduction after `wo` and `w2`: x += sum over ranks of each rank's partial sum.

Two schemes (`--sync`), both on preallocated buffers:

- `dllama`: every rank quantizes its whole partial sum (q80, or f32 buffers), all-gathers the N
  partials and adds them locally in rank order. Sends (N-1)·dim values per rank per sync and
  reproduces Distributed Llama's numerics exactly (each node's partial quantized once).
- `ring` (default): a reduce-scatter then an all-gather. Each rank sends chunk j of its quantized
  partial to rank j (Alltoallv), rank j sums the N chunks in rank order (deterministic: the same
  bits on every rank, unlike an MPI reduction tree whose shape depends on N and the library),
  re-quantizes its summed chunk and all-gathers it. Sends 2·(N-1)/N·dim values per rank: half of
  `dllama` at N = 4, a quarter at N = 8. The one extra q80 rounding of the sum is within q80 noise.

At N = 1 both reduce to Distributed Llama's single-node behaviour (q80 buffers: the partial is
quantized once before it is added).

With `--as-nodes S` (shard.make_plan) the partials are those of S virtual nodes, a rank holding one
per virtual node it computes: `dllama` over virtual nodes. Every rank all-gathers the S partials
(each quantized alone) and adds them to x in virtual-node order, so x gets the same bits on any node
count up to S, one rank included. Sends (S/N)·dim values per rank per sync.
"""

from __future__ import annotations

import numpy as np

from .comm import Comm
from .formats import BLOCK, Q80_BYTES
from .kernels import ffi, lib
from .shard import ShardPlan

SCHEMES = ("ring", "dllama")
BUFFER_TYPES = ("q80", "f32")


def _fptr(a: np.ndarray):
    return ffi.cast("float *", a.ctypes.data)


def _qptr(a: np.ndarray):
    return ffi.cast("dl_block_q80 *", a.ctypes.data)


class PartialSum:
    def __init__(self, comm: Comm, plan: ShardPlan, dim: int, max_batch: int,
                 buffer_type: str = "q80", scheme: str = "ring"):
        if scheme not in SCHEMES:
            raise ValueError(scheme)
        if buffer_type not in BUFFER_TYPES:
            raise ValueError(buffer_type)
        self.comm, self.dim, self.max_batch = comm, dim, max_batch
        self.q80 = buffer_type == "q80"
        if self.q80 and dim % BLOCK:
            raise ValueError(f"dim {dim} is not a multiple of {BLOCK}: use --buffer-float-type f32")
        self.n = comm.size
        self.scheme = scheme if self.n > 1 else "dllama"
        self.n_local = [max(len(plan[r].pieces), 1) for r in range(self.n)]
        self.n_pieces = plan.as_nodes   # 0: one partial per rank
        if self.n_pieces:
            self.scheme = "dllama"
        nb = dim // BLOCK
        self.row_bytes = nb * Q80_BYTES if self.q80 else 4 * dim
        # units: q80 blocks or f32 elements; the ring cuts the residual into per-rank chunks.
        self.unit_bytes = Q80_BYTES if self.q80 else 4
        self.chunks = [((a // BLOCK, b // BLOCK) if self.q80 else (a, b)) for a, b in
                       (plan[r].dim_chunk for r in range(self.n))]
        self.units = nb if self.q80 else dim
        self.send = np.zeros(self.n_local[comm.rank] * max_batch * self.row_bytes, np.uint8)
        self.full = np.zeros(max_batch * self.row_bytes, np.uint8)    # q80 of the whole row(s)
        if self.n_pieces:
            self.recv = np.zeros(self.n_pieces * max_batch * self.row_bytes, np.uint8)
        elif self.scheme == "dllama":
            self.recv = np.zeros(self.n * max_batch * self.row_bytes, np.uint8)
        else:
            c0, c1 = self.chunks[comm.rank]
            self.my_units = c1 - c0
            self.recv = np.zeros(self.n * max_batch * max(self.my_units, 1) * self.unit_bytes, np.uint8)
            self.acc = np.zeros(max_batch * max(self.my_units, 1) * (BLOCK if self.q80 else 1), np.float32)
            self.mine = np.zeros(max_batch * max(self.my_units, 1) * self.unit_bytes, np.uint8)
            self.gathered = np.zeros(max_batch * self.row_bytes, np.uint8)
            self.p_acc, self.p_mine, self.p_gathered = _fptr(self.acc), _qptr(self.mine), _qptr(self.gathered)
            self.tmp = np.zeros(max_batch * dim, np.float32)
            self._per_batch = {}
            self.one_round = self.n == 2 and self.q80
            if self.one_round:
                # two ranks: the ring's reduce-scatter and all-gather move the same bytes as one
                # all-gather of the whole partials; each rank then sums both chunks itself, in rank
                # order, and quantizes the sum as the chunk's owner would: the ring's bits, one
                # message round instead of two (24 -> 6 us per sync on one host, dim 2048)
                self.both = np.zeros(2 * max_batch * self.row_bytes, np.uint8)
                self.acc2 = np.zeros(max_batch * dim, np.float32)
                self.p_both, self.p_acc2 = _qptr(self.both), _fptr(self.acc2)
        self.p_send, self.p_full, self.p_recv = _qptr(self.send), _qptr(self.full), _qptr(self.recv)
        self._x = self._partial = None
        self._per_batch = {}

    # -- the ring's per-batch-size layout (computed once per batch size, then reused) --
    def _layout(self, batch: int):
        lay = self._per_batch.get(batch)
        if lay is not None:
            return lay
        # pack order: for destination j, for row b, the units of chunk j
        idx = np.concatenate([np.arange(b * self.units + c0, b * self.units + c1)
                              for (c0, c1) in self.chunks for b in range(batch)]).astype(np.intp)
        inv = np.empty_like(idx)
        inv[idx] = np.arange(idx.size)
        sizes = np.array([(c1 - c0) * batch * self.unit_bytes for c0, c1 in self.chunks], np.int64)
        displs = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64)
        my = sizes[self.comm.rank]
        recv_counts = np.full(self.n, my, np.int64)
        recv_displs = np.arange(self.n, dtype=np.int64) * my
        lay = (idx, inv, sizes, displs, recv_counts, recv_displs)
        self._per_batch[batch] = lay
        return lay

    def __call__(self, x: np.ndarray, partial: np.ndarray, batch: int) -> None:
        """x[:batch] += sum over ranks of partial[:batch] (both [max_batch, dim] f32; with --as-nodes
        partial is this rank's virtual nodes' partials, flat, packed as [piece][batch][dim])."""
        n_vals = batch * self.dim
        nbytes = batch * self.row_bytes
        if x is not self._x:          # the engine passes the same two buffers every time
            self._x, self._px = x, _fptr(x)
        if self.n_pieces:
            self._pieces(partial, batch)
            return
        if partial is not self._partial:
            self._partial, self._pp = partial, _fptr(partial)
        px, pp = self._px, self._pp
        if self.q80 and self.n == 1:   # one rank: x += the q80 round trip of its partial, one call
            lib.dl_add_via_q80(px, self.p_send, pp, n_vals)
            return
        if self.q80:
            lib.dl_quantize_q80(self.p_send, pp, n_vals)
        else:
            self.send[:nbytes] = partial.reshape(-1)[:n_vals].view(np.uint8)
        if self.scheme == "dllama":
            if self.n == 1:
                recv_p = self.p_send
            else:
                self.comm.allgather(self.send[:nbytes], self.recv[:self.n * nbytes])
                recv_p = self.p_recv
            if self.q80:
                lib.dl_add_q80(px, recv_p, self.n, n_vals)
            else:
                src = self.send if self.n == 1 else self.recv
                for r in range(self.n):
                    lib.dl_add(px, _fptr(src[r * nbytes:(r + 1) * nbytes]), n_vals)
            return
        self._ring(x, batch)

    def _pieces(self, partials: np.ndarray, batch: int) -> None:
        n_vals, nbytes = batch * self.dim, batch * self.row_bytes
        mine = self.n_local[self.comm.rank]
        if self.q80:   # each virtual node's partial quantized alone, as that node would (q80 blocks never straddle two)
            lib.dl_quantize_q80(self.p_send, _fptr(partials), mine * n_vals)
        else:
            self.send[:mine * nbytes] = partials[:mine * n_vals].view(np.uint8)
        if self.n > 1:
            lay = self._per_batch.get(batch)
            if lay is None:   # byte counts and offsets of every rank's partials, once per batch size
                counts = np.array([k * nbytes for k in self.n_local], np.int64)
                lay = self._per_batch[batch] = (counts, np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64))
            self.comm.allgatherv(self.send[:mine * nbytes], self.recv[:self.n_pieces * nbytes], *lay)
            src, p_src = self.recv, self.p_recv
        else:
            src, p_src = self.send, self.p_send
        if self.q80:
            lib.dl_add_q80(self._px, p_src, self.n_pieces, n_vals)
        else:
            for r in range(self.n_pieces):
                lib.dl_add(self._px, _fptr(src[r * nbytes:(r + 1) * nbytes]), n_vals)

    def _ring(self, x: np.ndarray, batch: int) -> None:
        if self.one_round:
            n_vals, nbytes = batch * self.dim, batch * self.row_bytes
            self.comm.allgather(self.send[:nbytes], self.both[:2 * nbytes])
            self.acc2[:n_vals].fill(0.0)
            lib.dl_add_q80(self.p_acc2, self.p_both, 2, n_vals)
            lib.dl_quantize_q80(self.p_full, self.p_acc2, n_vals)   # q80 blocks never straddle chunks
            lib.dl_add_q80(self._px, self.p_full, 1, n_vals)
            return
        idx, inv, sizes, displs, recv_counts, recv_displs = self._layout(batch)
        ub = self.unit_bytes
        total_units = batch * self.units
        # pack to [dest][row][chunk units]; one row (decoding) is already in that order
        if batch == 1:
            send, gathered = self.send, self.gathered
        else:
            packed = self.full[:total_units * ub].reshape(total_units, ub)
            np.take(self.send[:total_units * ub].reshape(total_units, ub), idx, axis=0, out=packed)
            send, gathered = self.full, self.gathered
        my_bytes = int(recv_counts[0])
        self.comm.alltoallv(send, sizes, displs, self.recv, recv_counts, recv_displs)
        # reduce my chunk in rank order
        my_vals = (my_bytes // ub) * (BLOCK if self.q80 else 1)
        if my_vals:
            self.acc[:my_vals].fill(0.0)
            if self.q80:
                lib.dl_add_q80(self.p_acc, self.p_recv, self.n, my_vals)
                lib.dl_quantize_q80(self.p_mine, self.p_acc, my_vals)
            else:
                for r in range(self.n):
                    lib.dl_add(self.p_acc, _fptr(self.recv[r * my_bytes:(r + 1) * my_bytes]), my_vals)
                self.mine[:my_bytes] = self.acc[:my_vals].view(np.uint8)
        self.comm.allgatherv(self.mine[:my_bytes], gathered, sizes, displs)
        # unpack to [row][units] and add to the residual
        if batch == 1:
            src = self.p_gathered
        else:
            out = self.full[:total_units * ub].reshape(total_units, ub)
            np.take(gathered[:total_units * ub].reshape(total_units, ub), inv, axis=0, out=out)
            src = self.p_full
        n_vals = batch * self.dim
        if self.q80:
            lib.dl_add_q80(self._px, src, 1, n_vals)
        else:
            lib.dl_add(self._px, ffi.cast("float *", src), n_vals)

    def bytes_per_sync(self, batch: int = 1) -> int:
        """Bytes this rank sends per sync (for the benchmark report)."""
        if self.n == 1:
            return 0
        if self.scheme == "dllama":
            return batch * self.row_bytes * (self.n - 1)
        _, _, sizes, _, _, _ = self._layout(batch)
        r = self.comm.rank
        return int(sizes.sum() - sizes[r] + sizes[r] * (self.n - 1))
