"""The KV cache as a pool of fixed-size pages shared by all sequences (paged attention).

Every rank holds, per layer, K and V for `n_pages * page_size` cache rows of its own KV heads
(engine.RunState); which pages a sequence uses is one row of a page table (`slot`), the same on every
rank. This module is the root's bookkeeping of that pool — it touches no K/V data: it hands out
pages, shares them between sequences, and produces the table updates and page copies that the next
forward pass carries to every rank (engine.Engine.step).

- `KVPlan`: the pool's size, computed once at start-up (`plan_kv`).
- `KVCache`: free pages, reference counts, per-sequence page lists, and a prefix cache.

Prefix sharing. A page full of computed rows is immutable: it is registered under a hash of
(the hash of the page before it, its tokens), and any sequence whose prompt starts with the same
tokens uses it by reference (its reference count goes up). A page is never written while shared: a
sequence writes only into pages it holds alone. So the last, partial page of a prefix is copied
(one page copy on every rank, `copies`) rather than shared, and matching stops before the page that
would hold the prompt's last token, which is always evaluated again (its logits are needed). When a
sequence ends its pages stay in the cache (last page first, so leaves go before their parents) as
evictable, least recently used first, until the pool needs them: the next turn of a conversation,
or a request with the same system prompt, finds them there (`cached_tokens`).

Admission reserves pages. A sequence is admitted only when the pages it may still need
(prompt + max_tokens, minus what it shares) are free or evictable beyond what running sequences
already reserved, so a running sequence never waits for, or loses, a page.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import ConfigError

PAGE_SIZE = 16   # tokens per page (vLLM's default block size)
_ROOT_HASH = 0


@dataclass(frozen=True)
class KVPlan:
    page_size: int
    n_pages: int
    n_slots: int          # sequences resident at once (one page table each)
    table_stride: int     # entries per page table: the most pages one sequence can use
    row_bytes: int        # bytes of K + V per cache row on the rank that stores the most KV heads
    ring_pages: int = 0   # sliding-window layers: pages of each slot's ring (0: no such layers)
    window: int = 0       # ... and the window they attend over
    ring_row_bytes: int = 0   # bytes of K + V per ring row (the sliding-window layers)

    @property
    def n_tokens(self) -> int:
        return self.n_pages * self.page_size

    @property
    def bytes(self) -> int:
        return self.n_tokens * self.row_bytes + self.n_slots * self.ring_pages * self.page_size * self.ring_row_bytes

    def describe(self) -> str:
        ring = (f"; sliding-window layers: a ring of {self.ring_pages} pages per slot "
                f"({self.ring_pages * self.page_size} rows for a {self.window}-token window)" if self.ring_pages else "")
        return (f"KV cache: {self.n_pages} pages of {self.page_size} tokens ({self.n_tokens} tokens, "
                f"{self.bytes / 2**20:.0f} MiB on the rank holding the most KV heads), {self.n_slots} "
                f"sequence slot(s){ring}")


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1.5GB', '4096' (bytes) -> bytes."""
    t = text.strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"--kv-memory: cannot read {text!r} as a size (e.g. 512MiB, 2GiB)")
    return int(value * units[unit])


def meminfo(key: str, default: int) -> int:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable, ...), default when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return default


def _mem_total() -> int:
    return meminfo("MemTotal", 16 << 30)


def ring_pages(window: int, max_batch: int, page_size: int = PAGE_SIZE) -> int:
    """Pages a sliding-window layer's ring needs: a pass writes up to max_batch rows of a sequence
    before its attention reads, and its first row reads `window` rows back, so the ring must hold
    window + max_batch - 1 consecutive positions however they fall on page boundaries."""
    return -(-(window + max_batch - 1) // page_size) + 1


def plan_kv(row_bytes: int, max_seq_len: int, n_slots: int, kv_memory: int | None = None,
            page_size: int = PAGE_SIZE, ring: tuple[int, int, int] | None = None) -> KVPlan:
    """Pool size: `kv_memory` bytes on the rank that holds the most KV heads, or by default room for
    n_slots full contexts, capped at a quarter of this machine's memory (the pool is allocated
    zeroed and the OS commits its pages only when they are first written, so an unused pool costs
    address space, not memory; the cap keeps that address space sane for 128k-context models).
    ring = (window, max_batch, ring_row_bytes): the model has sliding-window layers, whose K/V live in
    a ring of ring_pages(window, max_batch) pages per slot instead (row_bytes counts the others)."""
    if n_slots < 1:
        raise ConfigError(f"--parallel must be >= 1, got {n_slots}")
    row_bytes = max(row_bytes, 1)
    per_seq = math.ceil(max_seq_len / page_size)
    if kv_memory is None:
        n_pages = min(n_slots * per_seq, max(_mem_total() // 4 // (row_bytes * page_size), per_seq))
    else:
        n_pages = kv_memory // (row_bytes * page_size)
        if n_pages < 1:
            raise ConfigError(f"--kv-memory {kv_memory} bytes holds no page of {page_size} tokens "
                              f"({row_bytes * page_size} bytes each)")
    if ring is None or not ring[0]:
        return KVPlan(page_size, int(n_pages), n_slots, min(per_seq, int(n_pages)), row_bytes)
    window, max_batch, ring_row = ring
    return KVPlan(page_size, int(n_pages), n_slots, min(per_seq, int(n_pages)), row_bytes,
                  ring_pages(window, max_batch, page_size), window, ring_row)


@dataclass
class SeqKV:
    """One sequence's pages. `tokens[i]` is the token whose K/V row is (or will be) at position i."""

    slot: int
    pages: list = field(default_factory=list)
    tokens: list = field(default_factory=list)   # tokens with computed rows, in position order
    reserve: int = 0                              # pages promised but not taken yet
    hashes: list = field(default_factory=list)    # hash of each full page registered by/for this seq
    shared_tokens: int = 0                        # prompt tokens found in the cache at admission
    written_to: int = 0                           # rows written, rejected speculative rows included


class KVCache:
    def __init__(self, plan: KVPlan):
        self.plan = plan
        self.ps = plan.page_size
        self.free = list(range(plan.n_pages - 1, -1, -1))   # a stack: low pages first (touched memory stays compact)
        self.ref = [0] * plan.n_pages
        self.key = [None] * plan.n_pages        # (parent hash, tokens) of a registered page
        self.by_hash: dict[int, int] = {}       # hash -> full page
        self.children: dict[int, dict[int, tuple]] = {}   # parent hash -> {page: tokens} (full and partial)
        self.evictable: OrderedDict[int, None] = OrderedDict()   # registered, unreferenced; LRU first
        self.reserved = 0
        self.free_slots = list(range(plan.n_slots - 1, -1, -1))
        self.updates: list[tuple[int, int, int]] = []   # (slot, table index, page) for the next pass
        self.copies: list[tuple[int, int]] = []         # (src page, dst page) for the next pass
        self._copy_holds: list[int] = []                # copy sources held until the pass has them
        # sliding-window models: each slot's ring holds the last rows its sequence wrote; a new
        # sequence can start from a cached prefix only in a slot whose ring still holds the rows
        # that prefix's last window needs (the tokens of the sequence that wrote them, per slot)
        self.ring_pages, self.window = plan.ring_pages, plan.window
        self.slot_ring: list[list | None] = [None] * plan.n_slots
        self.slot_written = [0] * plan.n_slots   # ... and how far that sequence wrote (its rejected drafts)

    # ---- what the pool can still promise ------------------------------------------------------

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable) - self.reserved

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.ps)

    @property
    def pages_in_use(self) -> int:
        return self.plan.n_pages - len(self.free) - len(self.evictable)

    # ---- the prefix cache ---------------------------------------------------------------------

    def _match(self, tokens: list[int]) -> tuple[list[int], tuple[int, int] | None, int]:
        """Longest cached prefix of tokens[:-1]: (full pages shared, (page to copy, rows) or None,
        parent hash after the shared pages)."""
        ps, limit = self.ps, len(tokens) - 1     # the last token is always evaluated again
        shared, h, i = [], _ROOT_HASH, 0
        while (i + 1) * ps <= limit:
            chunk = tuple(tokens[i * ps:(i + 1) * ps])
            nh = hash((h, chunk))
            page = self.by_hash.get(nh)
            if page is None or self.key[page] != (h, chunk):
                break
            shared.append(page)
            h, i = nh, i + 1
        best, best_rows = None, 0
        rest = tokens[i * ps:limit]
        if rest:
            for page, toks in self.children.get(h, {}).items():
                k = 0
                for a, b in zip(toks, rest):
                    if a != b:
                        break
                    k += 1
                if k > best_rows:
                    best, best_rows = page, k
        return shared, ((best, best_rows) if best is not None else None), h

    def _register(self, page: int, parent: int, tokens: tuple, full: bool) -> int | None:
        """Put a page in the prefix cache (full pages by hash; partial ones only for copying)."""
        if self.key[page] is not None:
            return None
        h = hash((parent, tokens))
        if full and h in self.by_hash:
            return h    # the same content is cached already: keep that one, this page stays private
        self.key[page] = (parent, tokens)
        self.children.setdefault(parent, {})[page] = tokens
        if full:
            self.by_hash[h] = page
        return h

    def _unregister(self, page: int) -> None:
        key = self.key[page]
        if key is None:
            return
        parent, tokens = key
        kids = self.children.get(parent)
        if kids is not None:
            kids.pop(page, None)
            if not kids:
                del self.children[parent]
        h = hash(key)
        if self.by_hash.get(h) == page:
            del self.by_hash[h]
        self.key[page] = None

    # ---- pages ----------------------------------------------------------------------------------

    def _take(self) -> int:
        if self.free:
            return self.free.pop()
        if self.evictable:   # the least recently used cached page
            page, _ = self.evictable.popitem(last=False)
            self._unregister(page)
            return page
        raise RuntimeError("KV page pool exhausted (admission should have prevented this)")

    def _hold(self, page: int) -> None:
        if self.ref[page] == 0:
            self.evictable.pop(page, None)
        self.ref[page] += 1

    def _drop(self, page: int) -> None:
        self.ref[page] -= 1
        if self.ref[page] == 0:
            if self.key[page] is not None:
                self.evictable[page] = None     # most recently used end
            else:
                self.free.append(page)

    # ---- sequences ------------------------------------------------------------------------------

    def admit(self, tokens: list[int], max_rows: int, share: bool = True) -> SeqKV | None:
        """A slot and pages for a sequence that starts with `tokens` (the prompt) and will hold at most
        `max_rows` K/V rows, sharing what the cache has (unless share=False: every row is evaluated);
        None when the pool or the slots are full now."""
        if not self.free_slots:
            return None
        shared, partial, parent = self._match(tokens) if share else ([], None, _ROOT_HASH)
        slot = self.free_slots[-1]
        if self.ring_pages and (shared or partial):
            k = len(shared) * self.ps + (partial[1] if partial else 0)
            slot = next((s for s in reversed(self.free_slots)
                         if self._ring_holds(self.slot_ring[s], tokens, k, self.slot_written[s])), None)
            if slot is None:   # no ring holds the prefix's window: evaluate the whole prompt
                shared, partial, slot = [], None, self.free_slots[-1]
        need = self.pages_for(max_rows) - len(shared)
        from_evictable = sum(1 for p in shared if self.ref[p] == 0)
        if need + from_evictable > self.available:
            return None
        self.free_slots.remove(slot)
        seq = SeqKV(slot)
        for idx, page in enumerate(shared):
            self._hold(page)
            seq.pages.append(page)
            self.updates.append((seq.slot, idx, page))
        seq.tokens = list(tokens[:len(shared) * self.ps])
        h = _ROOT_HASH
        for i in range(len(shared)):
            h = hash((h, tuple(seq.tokens[i * self.ps:(i + 1) * self.ps])))
            seq.hashes.append(h)
        seq.reserve = need
        self.reserved += need
        if partial is not None:
            src, rows = partial
            if self.ref[src] == 0:
                # nobody uses it: this sequence takes the page over (its later rows get overwritten)
                self.evictable.pop(src)
                self._unregister(src)
                self.ref[src] = 1
                seq.reserve -= 1
                self.reserved -= 1
                self.updates.append((seq.slot, len(seq.pages), src))
                seq.pages.append(src)
            else:   # another sequence reads it: copy the rows into a page of our own
                self._hold(src)              # the source must survive until the copy has run
                dst = self._alloc(seq)
                self.copies.append((src, dst))
                self._copy_holds.append(src)
            seq.tokens += tokens[len(seq.tokens):len(seq.tokens) + rows]
        seq.shared_tokens = len(seq.tokens)
        self.slot_ring[slot] = seq.tokens
        return seq

    def _ring_holds(self, ring: list | None, tokens: list[int], k: int, written: int = 0) -> bool:
        """Whether a slot whose ring was written by a sequence with these `ring` tokens (and rejected
        speculative rows up to position `written` - 1) holds what a sequence starting from tokens[:k]
        reads next: its rows k - window + 1 .. k - 1, not yet overwritten (position t is in ring page
        (t / page_size) % ring_pages)."""
        if ring is None or len(ring) < k or ring[:k] != list(tokens[:k]):
            return False
        first = k - self.window + 1
        last = max(len(ring), written) - 1
        return first <= 0 or first // self.ps >= last // self.ps - self.ring_pages + 1

    def fork(self, seq: SeqKV, max_rows: int) -> SeqKV | None:
        """A new sequence holding seq's rows: its full pages shared, its partial last page copied;
        None when there is no slot or room for its pages now."""
        if not self.free_slots:
            return None
        ps = self.ps
        n_full = len(seq.tokens) // ps
        need = self.pages_for(max_rows) - n_full
        if need > self.available:
            return None
        new = SeqKV(self.free_slots.pop(), tokens=list(seq.tokens), hashes=list(seq.hashes[:n_full]))
        if self.ring_pages:   # the sliding-window layers' rows: a copy of the leader's ring
            self.copies.append(("ring", seq.slot, new.slot))
            self.slot_ring[new.slot] = new.tokens
        for idx in range(n_full):
            page = seq.pages[idx]
            self._hold(page)
            new.pages.append(page)
            self.updates.append((new.slot, idx, page))
        new.reserve = need
        self.reserved += need
        if len(seq.tokens) % ps:
            src = seq.pages[n_full]
            self._hold(src)
            self.copies.append((src, self._alloc(new)))
            self._copy_holds.append(src)
        new.shared_tokens = len(new.tokens)
        return new

    def _alloc(self, seq: SeqKV) -> int:
        page = self._take()
        self.ref[page] = 1
        if seq.reserve > 0:
            seq.reserve -= 1
            self.reserved -= 1
        self.updates.append((seq.slot, len(seq.pages), page))
        seq.pages.append(page)
        return page

    def ensure(self, seq: SeqKV, n_rows: int) -> None:
        """Pages for positions < n_rows."""
        if n_rows > self.plan.table_stride * self.ps:
            raise ConfigError(f"a sequence of {n_rows} tokens does not fit the KV pool's page table "
                              f"({self.plan.table_stride * self.ps} tokens)")
        while len(seq.pages) * self.ps < n_rows:
            self._alloc(seq)

    def written(self, seq: SeqKV, tokens) -> None:
        """After a pass: these tokens' rows now follow seq.tokens; full pages join the prefix cache."""
        ps = self.ps
        before = len(seq.tokens)
        seq.tokens.extend(tokens)
        for i in range(before // ps, len(seq.tokens) // ps):
            if i < len(seq.hashes):
                continue
            parent = seq.hashes[-1] if seq.hashes else _ROOT_HASH
            chunk = tuple(seq.tokens[i * ps:(i + 1) * ps])
            self._register(seq.pages[i], parent, chunk, full=True)
            seq.hashes.append(hash((parent, chunk)))

    def wrote_ahead(self, seq: SeqKV, n_rows: int) -> None:
        """A pass writes positions < n_rows, some of which may be rejected (speculative rows): they
        are never registered (only `written` rows are), but a sliding-window ring loses what they
        overwrite, which later reuse of the slot must know."""
        seq.written_to = max(seq.written_to, n_rows)

    def truncate(self, seq: SeqKV, n_rows: int) -> None:
        """Forget rows from n_rows on (a private page that held some is reused for the new ones)."""
        if n_rows >= len(seq.tokens):
            return
        if self.ring_pages and not self._ring_holds(seq.tokens, seq.tokens, n_rows, seq.written_to):
            raise ConfigError(f"a sliding-window model cannot go back from position {len(seq.tokens)} to "
                              f"{n_rows}: its ring no longer holds the rows before {n_rows}")
        del seq.tokens[n_rows:]
        seq.hashes = seq.hashes[:n_rows // self.ps]
        keep = self.pages_for(n_rows)
        for idx in range(len(seq.pages) - 1, keep - 1, -1):
            self._drop(seq.pages.pop())
        # the page now partially valid must be private and out of the prefix cache before it is
        # written again: alone, it just leaves the cache; shared, this sequence takes a copy
        if n_rows % self.ps and seq.pages:
            page = seq.pages[-1]
            if self.ref[page] == 1:
                self._unregister(page)
            else:
                seq.pages.pop()
                self._copy_holds.append(page)   # our reference is the hold
                new = self._take()
                self.ref[new] = 1
                self.copies.append((page, new))
                self.updates.append((seq.slot, len(seq.pages), new))
                seq.pages.append(new)

    def release(self, seq: SeqKV, keep: bool = True) -> None:
        """A sequence ended: its pages become cached (keep) or free; its slot and reservation return."""
        ps = self.ps
        if keep and len(seq.tokens) % ps and seq.pages:    # the partial last page, for copying
            n_full = len(seq.tokens) // ps
            parent = seq.hashes[n_full - 1] if n_full else _ROOT_HASH
            self._register(seq.pages[n_full], parent, tuple(seq.tokens[n_full * ps:]), full=False)
        for page in reversed(seq.pages):
            if not keep and self.ref[page] == 1:
                self._unregister(page)
            self._drop(page)
        seq.pages = []
        self.reserved -= seq.reserve
        seq.reserve = 0
        self.slot_ring[seq.slot] = list(seq.tokens) if keep else None
        self.slot_written[seq.slot] = seq.written_to
        self.free_slots.append(seq.slot)

    def drop_cached(self) -> None:
        """Forget every cached page nobody uses (a benchmark's repeats must evaluate their prompts)."""
        while self.evictable:
            page, _ = self.evictable.popitem(last=False)
            self._unregister(page)
            self.free.append(page)

    def take_commands(self) -> tuple[list, list]:
        """The table updates and page copies the next pass must carry (and forget them here); copy
        sources held for the copy are let go once the pass has them."""
        up, cp = self.updates, self.copies
        self.updates, self.copies = [], []
        for src in self._copy_holds:
            self._drop(src)
        self._copy_holds = []
        return up, cp
