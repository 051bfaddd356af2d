"""``depin fluence status|down`` and ``depin publish --target fluence``: the function gateway on a Fluence VM.

Settings come from ``DEPIN_FLUENCE_*`` (``serving.fluence.settings.FluenceSettings``): the API key
(``DEPIN_FLUENCE_API_KEY``), the price cap (``DEPIN_FLUENCE_MAX_USD_PER_DAY``, default 5), the gateway port,
the deployment name (``DEPIN_FLUENCE_TARGET``, default ``default``), how many gateway VMs
(``DEPIN_FLUENCE_REPLICAS``, default 1, each in another datacenter), the state directory
(``DEPIN_FLUENCE_STATE_DIR``).
Flags given here win over the environment.

``status`` and ``down`` are plain typer-compatible functions, registered on the ``fluence`` group :data:`app`.
``depin publish --target fluence`` and the flows (``publish.target = "fluence"``) get their target from
``pipelines._targets`` (which also defines ``make_fluence_publisher``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from depin_core import paths
from pipelines._targets import make_fluence_publisher
from pipelines.cli._output import JsonOpt, emit_json, say
from pipelines.cli.serve import run_publish

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from serving.publish import GatewayPublisher

TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--fluence-target", help="deployment name; the VM is depin-gw-<name> (default: DEPIN_FLUENCE_TARGET)"
    ),
]
StateOpt = Annotated[
    Path | None,
    typer.Option(help=f"state directory (default: DEPIN_FLUENCE_STATE_DIR, else {paths.FLUENCE_STATE_DIR})"),
]


@contextlib.contextmanager
def open_fluence_gateway(
    *,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    max_batch_size: int = 1024,
    account: LocalAccount | None = None,
) -> Iterator[GatewayPublisher]:
    """The target's gateway VM ensured (created, bootstrapped, ready — or reused), yielded as a
    ``GatewayPublisher`` (``.client`` for aliases and calls, ``.target`` its URL) whose ``publish`` also
    records the version in the Fluence state file."""
    with (
        make_fluence_publisher(
            fluence_target=fluence_target,
            max_usd_per_day=max_usd_per_day,
            max_batch_size=max_batch_size,
            account=account,
        ) as fluence,
        fluence.gateway_publisher() as gateway,
    ):
        yield gateway


def run_fluence_publish(
    *,
    model: Path,
    name: str,
    alias: str | None,
    max_batch_size: int,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """``depin publish --target fluence``: ensure the gateway VMs, publish to each, smoke-call, move the
    alias on each. Returns the ``PublishResult`` JSON (``urls``: every replica's gateway) plus
    ``function_url`` and ``fluence`` (VM id, generation, price, ``replicas``)."""
    return run_publish(
        model=model,
        name=name,
        alias=alias,
        target="fluence",
        registry=None,
        admin_key_file=None,
        max_batch_size=max_batch_size,
        fluence_target=fluence_target,
        max_usd_per_day=max_usd_per_day,
        replicas=replicas,
    )


# ---------------------------------------------------------------------------------------------- commands


def status(
    fluence_target: TargetOpt = None,
    state_dir: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the gateway VMs `depin publish --target fluence` created, every replica: its datacenter, VM state,
    URL, /readyz (and its latency), the versions published — state file + live Fluence API."""
    with make_fluence_publisher(fluence_target=fluence_target, state_dir=state_dir) as pub:
        doc = pub.status()
    if not doc["deployments"] and not doc["untracked"]:
        say(f"no Fluence gateway recorded in {doc['state_file']}")
    for d in doc["deployments"]:
        price = f"{d['usd_per_day']:.2f} USD/day" if d["usd_per_day"] is not None else "price unknown"
        ready = (f"ready ({d['readyz_ms']:.0f} ms)", "green") if d["ready"] else ("not ready", "yellow")
        where = d["location"] or d["country"] or "datacenter unknown"
        say(
            (f"{d['target']} replica {d['replica']}", "bold"),
            f": VM {d['vm_name']} ({d['vm_id']}, gen {d['generation']}, {where}) {d['vm_status']}, "
            f"{d['url'] or 'no address'} ",
            ready,
            f", {price}",
        )
        if d["tls_fingerprint"]:
            say(f"  TLS certificate sha256 {d['tls_fingerprint']} ({d['tls_cert_file']})")
        for p in d["published"]:
            say(f"  {p['name']}@{p['version']} (published {p['published_at']})")
    for u in doc["untracked"]:
        say(
            ("untracked", "yellow"),
            f" VM {u['vm_name']} ({u['vm_id']}) {u['vm_status']}: not in the state file; "
            "`depin fluence down --all` deletes it",
        )
    if as_json:
        emit_json(doc)


def down(
    fluence_target: TargetOpt = None,
    all_targets: Annotated[
        bool, typer.Option("--all", help="every recorded target and every depin-gw-* VM of the account")
    ] = False,
    state_dir: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete the gateway VMs, every replica (and security groups), and forget them: the functions on them go
    offline."""
    with make_fluence_publisher(fluence_target=fluence_target, state_dir=state_dir) as pub:
        doc = pub.down(all_targets=all_targets)
    if not any(d["vm_ids"] for d in doc["deleted"]):
        say("no Fluence gateway VM to delete")
    for d in doc["deleted"]:
        if d["vm_ids"]:
            say(f"deleted {d['vm_name']}: {', '.join(d['vm_ids'])}")
        for problem in d["problems"]:
            say((problem, "yellow"))
    if as_json:
        emit_json(doc)


app = typer.Typer(
    name="fluence",
    rich_markup_mode=None,
    help="The function gateway on Fluence: show or delete what `depin publish --target fluence` created.",
    no_args_is_help=True,
)
app.command("status")(status)
app.command("down")(down)

__all__ = ["app", "down", "open_fluence_gateway", "run_fluence_publish", "status"]
