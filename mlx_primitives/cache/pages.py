"""Page ids of a paged key/value pool: hand out, share (copy-on-write forks) and take back."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, List


class OutOfPagesError(MemoryError):
    """The pool has fewer free pages than a request needs."""


class PageAllocator:
    """Reference-counted page ids ``0 .. num_pages - 1``.

    A page is free (count 0) or owned by the sequences whose block tables hold it (count = number
    of holders). :meth:`allocate` hands out free pages with count 1, :meth:`share` adds a holder
    (a forked sequence), :meth:`release` drops one and frees the page when none is left, so a page
    is never handed out while held and never lost.

    Args:
        num_pages (int): pages in the pool.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive int; got {num_pages!r}")
        self.num_pages = num_pages
        self._counts = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest id first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        """Holders of ``page`` (0 when free)."""
        return self._counts[page]

    def allocate(self, count: int) -> List[int]:
        """``count`` free pages, each now held once; OutOfPagesError (nothing taken) when too few are free."""
        if count < 0:
            raise ValueError(f"count must be >= 0; got {count}")
        if count > len(self._free):
            raise OutOfPagesError(f"need {count} free pages, the pool has {len(self._free)} of {self.num_pages}")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._counts[page] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """One more holder for each of ``pages`` (all held already)."""
        pages = list(pages)
        self._check_held(pages)
        for page in pages:
            self._counts[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """One holder less for each of ``pages``; pages left without holders become free."""
        pages = list(pages)
        self._check_held(pages)
        for page in pages:
            self._counts[page] -= 1
            if self._counts[page] == 0:
                self._free.append(page)

    def restore(self, holders: Iterable[int]) -> None:
        """Set the counts of a fresh allocator: each page held as often as it occurs in ``holders``."""
        if self.free_pages != self.num_pages:
            raise ValueError("restore needs an allocator with every page free")
        counts = Counter(holders)
        bad = [p for p in counts if not (isinstance(p, int) and 0 <= p < self.num_pages)]
        if bad:
            raise ValueError(f"page {bad[0]!r} is not in the pool of {self.num_pages} pages")
        for page, times in counts.items():
            self._counts[page] = times
        self._free = [p for p in self._free if p not in counts]

    def _check_held(self, pages: List[int]) -> None:
        for page, times in Counter(pages).items():
            if not 0 <= page < self.num_pages or self._counts[page] < times:
                held = self._counts[page] if 0 <= page < self.num_pages else 0
                raise ValueError(f"page {page} is held {held} times, not {times} (pool of {self.num_pages} pages)")
