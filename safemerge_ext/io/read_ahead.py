"""Loading items ahead of their use, bounded: in a background thread (:func:`prefetch`), or a batch
at a time in the caller's thread (:func:`in_batches`). The pipeline reads weight pairs through
them; what is loaded is the caller's (reads, maps, device copies)."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

__all__ = ["Prefetch", "in_batches", "prefetch"]


def prefetch(
    items: Iterable[Any], load: Callable[[Any], Any], *, size: Callable[[Any], int] = lambda _: 0,
    budget: int = 0, depth: int = 2,
) -> "Prefetch":
    """Yield (item, load(item)) while a background thread loads ahead.

    The thread holds at most ``depth`` loaded items the consumer has not taken yet, counting the
    one it is loading, and, when ``budget`` is set, at most ``budget`` of them in units of
    ``size(item)``; always at least one. The consumer must drop its reference to an item before
    asking for the next for the bound to cover it. ``close()`` stops the thread and waits for it;
    ``abandon()`` stops it without waiting (a Ctrl-C must not wait out a read stalled on a network
    mount). (To load in the caller's thread instead, see :func:`in_batches`.)
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1; got {depth}")
    return Prefetch(items, load, size, budget, depth)


class _Ahead:
    """What the read-ahead thread shares with its :class:`Prefetch` (the thread holds this, never the
    Prefetch, so a Prefetch its consumer drops is collected, and its ``__del__`` stops the thread)."""

    END = object()

    def __init__(self, items: Iterable[Any], load: Callable[[Any], Any], size: Callable[[Any], int], budget: int,
                 depth: int) -> None:
        self.q: queue.Queue = queue.Queue()
        self.cond = threading.Condition()
        self.ahead = self.count = 0
        self.stop = threading.Event()
        self.items, self.load, self.size, self.budget, self.depth = items, load, size, budget, depth

    def over(self, n: int) -> bool:
        return self.count > 0 and (self.count >= self.depth or (self.budget > 0 and self.ahead + n > self.budget))


def _read_ahead(a: _Ahead) -> None:
    try:
        for it in a.items:
            n = a.size(it)
            with a.cond:
                while a.over(n) and not a.stop.is_set():
                    a.cond.wait()
                if a.stop.is_set():
                    return
                a.ahead += n
                a.count += 1
            a.q.put((it, n, a.load(it), None))
    except BaseException as exc:  # handed to the consumer, raised there
        a.q.put((None, 0, None, exc))
    a.q.put(_Ahead.END)


class Prefetch:
    """The iterator :func:`prefetch` returns."""

    def __init__(self, items: Iterable[Any], load: Callable[[Any], Any], size: Callable[[Any], int], budget: int,
                 depth: int) -> None:
        self._a = _Ahead(items, load, size, budget, depth)
        self._thread = threading.Thread(target=_read_ahead, args=(self._a,), name="safemerge-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._a.stop.is_set():
            raise StopIteration
        got = self._a.q.get()
        if got is _Ahead.END:
            self.close()
            raise StopIteration
        it, n, value, exc = got
        del got
        if exc is not None:
            self.close()
            raise exc
        with self._a.cond:
            self._a.ahead -= n
            self._a.count -= 1
            self._a.cond.notify()
        return it, value  # (the consumer's reference is then the only one)

    def abandon(self) -> None:
        """Stop the thread without waiting for a load in progress (it ends when that load returns);
        what it loaded ahead is let go."""
        self._a.stop.set()
        with self._a.cond:
            self._a.cond.notify_all()
        while not self._a.q.empty():
            self._a.q.get_nowait()

    def finished(self, timeout: float = 0.0) -> bool:
        """Whether the thread has ended, waiting up to ``timeout`` seconds for it."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread and wait for it; what it loaded ahead is let go."""
        self.abandon()
        self._thread.join()
        while not self._a.q.empty():
            self._a.q.get_nowait()

    def __del__(self) -> None:  # (a consumer that left the loop early without close(): the thread stops)
        if hasattr(self, "_a"):
            self.abandon()


def in_batches(
    items: Iterable[Any], load: Callable[[Any], Any], *, size: Callable[[Any], int] = lambda _: 0, budget: int = 0,
    max_items: int = 0,
) -> Iterator[tuple[Any, Any]]:
    """Yield (item, load(item)), loading in the caller's thread a batch at a time: as many items as
    fit in ``budget`` units of ``size(item)`` and, when ``max_items`` is set, at most that many
    (always at least one; no bound without either), all loaded before the first of them is
    yielded. Each item is let go as it is yielded, so the consumer's reference is then the only
    one. When a load fails, the items loaded before it are yielded first, then its error is raised.

    For loads that cost little but run slowly right after heavy work: the scorer maps the weight
    pairs it will score (no bytes read) a batch at a time, because Python run between two kernel
    calls finds its caches evicted by the weights streamed through them (measured: mapping a
    tensor took 20 us after mapping another, 100 us after 16 MiB had been streamed, 270 us after
    64 MiB)."""
    end = object()
    it = iter(items)
    nxt = next(it, end)
    while nxt is not end:
        batch: list[tuple[Any, Any]] = []
        used, failed = 0, None
        while nxt is not end:
            n = size(nxt)
            if batch and ((budget > 0 and used + n > budget) or (max_items > 0 and len(batch) >= max_items)):
                break
            try:
                batch.append((nxt, load(nxt)))
            except Exception as exc:
                failed = exc
                break
            except BaseException:  # (an interrupt: at once, holding nothing)
                batch.clear()
                raise
            used += n
            nxt = next(it, end)
        batch.reverse()  # popped from the end, in order
        while batch:
            yield batch.pop()
        if failed is not None:
            try:
                raise failed
            finally:
                failed = None
