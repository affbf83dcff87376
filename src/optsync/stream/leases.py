"""How the partitions of one consumer are shared by its live workers. No I/O here.

Every backend stores leases and worker liveness its own way (tables of the stream file, a dict, a
JetStream key-value bucket written with compare-and-set) and asks ``share`` what a claiming
worker should hold. The rule needs no coordinator and no message to the other workers:

- the live workers, sorted by name, get ``partitions // n`` partitions each, and the first
  ``partitions % n`` of them one more (their *quota*);
- a worker keeps its lowest leases up to its quota and gives up the rest;
- it takes partitions that no live worker holds, lowest first, until it reaches its quota.

A worker that joins claims at once and finds nothing free; the others see it on their next claim,
their quotas shrink and they give partitions up, which it takes on its next claim. A worker that
stops claiming is no longer live after its ``ttl``; its partitions are then free and the others'
quotas grow. So every worker converges to its quota within two claim intervals of a change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ("Share", "share")


@dataclass(frozen=True)
class Share:
    """What a claiming worker should do with the leases of one consumer."""

    keep: frozenset[int]
    """Its leases, up to its quota."""
    give_up: frozenset[int]
    """Its leases beyond its quota: free them."""
    take: tuple[int, ...]
    """Free partitions to take, in order, until ``keep`` reaches the quota."""

    @property
    def owned(self) -> frozenset[int]:
        """What the worker holds once it took everything in ``take``."""
        return self.keep | frozenset(self.take)


def share(worker: str, live: Iterable[str], holders: Mapping[int, str], partitions: int) -> Share:
    """The share of ``worker`` among the ``live`` workers (``worker`` counts as live).

    ``holders``: partition -> worker holding its lease; a lease of a worker that is not live is
    free.
    """
    workers = sorted({*live, worker})
    index = workers.index(worker)
    quota = partitions // len(workers) + (1 if index < partitions % len(workers) else 0)
    mine = sorted(p for p, holder in holders.items() if holder == worker and 0 <= p < partitions)
    alive = set(workers)
    free = [p for p in range(partitions) if holders.get(p) not in alive]
    return Share(
        keep=frozenset(mine[:quota]),
        give_up=frozenset(mine[quota:]),
        take=tuple(free[: max(0, quota - len(mine))]),
    )
