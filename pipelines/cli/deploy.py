"""``depin deploy --pool NAME``: register the deployments on a Prefect process work pool, for workers to run;
``depin pool-worker --pool NAME``: check the API and the pool, then exec ``prefect worker start --pool NAME``.

Run a worker on each host that has this package installed (and ``PREFECT_API_URL`` set to the server's
``/api``); the workers then execute the scheduled and on-demand runs. (``depin worker`` is the GPU agent.)
"""

from __future__ import annotations

from typing import Annotated

import typer

from pipelines.cli._output import JsonOpt, emit_json, say


def deploy(
    pool: Annotated[str, typer.Option(help="process work pool to register on (created if missing)")],
    crash_after: Annotated[
        float,
        typer.Option(
            help="seconds without a heartbeat after which a flow run counts as crashed (its worker is gone)"
        ),
    ] = 90.0,
    as_json: JsonOpt = False,
) -> None:
    """Register every deployment on the process work pool POOL (created if missing); re-running updates them.
    Also creates the automation that marks runs of a vanished worker Crashed."""
    from pipelines.deploy import CRASH_AUTOMATION, deploy_to_pool, ensure_process_pool

    created = ensure_process_pool(pool)
    say(("created", "bold green") if created else "using", f" process work pool {pool}")
    infos = deploy_to_pool(pool, crash_after_s=crash_after)
    say(f"automation {CRASH_AUTOMATION}: a run without a heartbeat for {crash_after:g} s is set to Crashed")
    for info in infos:
        cron = f" ({', '.join(info.schedules)})" if info.schedules else ""
        say("deployed ", (info.name, "bold"), cron)
    say(f"{len(infos)} deployments on {pool}; run `prefect worker start --pool {pool}` on each host")
    if as_json:
        emit_json(
            {
                "pool": pool,
                "created": created,
                "deployments": [i.model_dump() for i in infos],
                "crash_after_s": crash_after,
            }
        )


def pool_worker(
    pool: Annotated[str, typer.Option(help="process work pool to poll (from `depin deploy --pool`)")],
    name: Annotated[str | None, typer.Option(help="worker name shown in the Prefect UI")] = None,
    limit: Annotated[int | None, typer.Option(help="flow runs at once on this worker")] = None,
) -> None:
    """Check that the Prefect API answers and POOL exists, then become `prefect worker start --pool POOL`."""
    import os
    import sys

    from pipelines.deploy import check_pool

    check_pool(pool)
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool]
    if name:
        argv += ["--name", name]
    if limit is not None:
        argv += ["--limit", str(limit)]
    say("starting ", (" ".join(argv[1:]), "bold"))
    sys.stderr.flush()
    os.execv(sys.executable, argv)
