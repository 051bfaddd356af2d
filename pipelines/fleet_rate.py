"""DIMO's request rate, enforced fleet-wide: Prefect global concurrency limits used as rate limits.

DIMO's limit belongs to the developer license (10 requests/s per API service), not to a machine. When several
workers ingest shards of one fleet at once, each process limiting itself to the license's rate would add up
to N times it. Instead every DIMO request takes one slot of the Prefect global concurrency limit
``dimo-rate-<service>`` (``auth``, ``token-exchange``, ``identity``, ``telemetry``), whose slots decay at the
license's rate (Prefect's ``rate_limit``): the Prefect server, shared by every worker, is the one bucket.

The bucket holds ``max(1, rate // 2)`` requests. A request is admitted by the Prefect server and reaches DIMO a
little later; DIMO's own bucket (nginx ``limit_req``) holds one second's worth, so admitting at most half a
second's burst leaves the other half for requests in flight (the emulator's rate limiter admits
``in_flight + burst + rate·T`` arrivals in any window of T seconds: see ``connectors.dimo.emulator.ratelimit``).

A request occupies ``UNITS`` (100) slots, and the limit holds and decays 100 times as many: Prefect's server
decays a limit by ``floor(decay × seconds since its last write)`` and restarts that clock at every write, so
with one slot per request the fraction of a slot decayed between two writes is lost at each of them. At DIMO's
10/s, with writes every few tens of milliseconds, admissions passed only 8.1–8.6 requests/s from 1 or 4
processes (8 callers each, PostgreSQL server, 200 admissions); at 100 slots per request the loss is a
hundredth of a request per write and they pass 10.1–10.2/s, with at most 14 in any 1-s window (the bucket's
5 plus 10/s). Each request costs one Prefect API call (measured in ``bench/fanout.py --probe-admission``). The limits are created on first use
and set to the rate of the run that starts (the license's: ``DEPIN_DIMO_RATE_LIMIT_PER_S`` or the flow's
``rate_limit_per_s``); they show in the UI under Concurrency and with ``prefect gcl ls``.
"""

from __future__ import annotations

import math

SERVICES = ("auth", "token-exchange", "identity", "telemetry")
PREFIX = "dimo-rate-"
UNITS = 100  # slots per request: see the module docstring (Prefect drops the fraction of a slot per write)


def limit_name(service: str) -> str:
    """The global concurrency limit that paces ``service``'s requests for the whole fleet."""
    return f"{PREFIX}{service}"


def burst(rate: float) -> int:
    """Slots of each limit: half a second's worth of requests, at least one."""
    return max(1, math.floor(rate / 2))


def ensure_limits(rate: float) -> list[str]:
    """Create or set the ``dimo-rate-*`` limits to ``rate`` requests/s; return the names created or changed.

    ``rate <= 0`` (no limit) changes nothing. Safe to call from several processes at once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    if rate <= 0:
        return []
    slots, decay = burst(rate) * UNITS, rate * UNITS
    changed = []
    with get_client(sync_client=True) as client:
        for service in SERVICES:
            name = limit_name(service)
            try:
                have = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=slots, slot_decay_per_second=decay)
                    )
                    changed.append(name)
                except ObjectAlreadyExists:  # created meanwhile by another shard
                    pass
                continue
            if (have.limit, have.slot_decay_per_second, have.active) != (slots, decay, True):
                client.update_global_concurrency_limit(
                    name,
                    GlobalConcurrencyLimitUpdate(limit=slots, slot_decay_per_second=decay, active=True),
                )
                changed.append(name)
    return changed


async def admit(service: str) -> None:
    """Wait for one slot of ``service``'s fleet-wide rate limit (a ``connectors.dimo.client.Admission``).

    A Prefect server that cannot grant it now (unreachable, or a 5xx such as a SQLite server's locked
    database under load) is a ``DimoTransientError``: the DIMO client retries the request with backoff."""
    import httpx
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.asyncio import rate_limit

    from connectors.dimo.errors import DimoTransientError

    name = limit_name(service)
    try:
        await rate_limit(name, occupy=UNITS, strict=True)
    except (ConcurrencySlotAcquisitionError, httpx.TransportError) as exc:
        raise DimoTransientError(
            f"fleet rate limit {name}: the Prefect server did not grant a slot ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the request is retried"
        ) from None


__all__ = ["PREFIX", "SERVICES", "UNITS", "admit", "burst", "ensure_limits", "limit_name"]
