"""``depin fluence status|down`` and ``depin publish --target fluence``: the function gateway on a Fluence VM.

Settings come from ``DEPIN_FLUENCE_*`` (``serving.fluence.publisher.FluenceSettings``): the API key
(``DEPIN_FLUENCE_API_KEY``), the price cap (``DEPIN_FLUENCE_MAX_USD_PER_DAY``, default 5), the gateway port,
the deployment name (``DEPIN_FLUENCE_TARGET``, default ``default``), the state directory (``.depin/fluence``).
Flags given here win over the environment.

``status`` and ``down`` are plain typer-compatible functions; ``pipelines.cli`` registers them on a
``fluence`` sub-app. ``make_fluence_publisher`` is what ``depin publish --target fluence`` and the
``train_and_publish`` flow (``publish.target = "fluence"``) use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pipelines._output import emit_json, say

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from serving.fluence.publisher import FluencePublisher, FluenceSettings
    from serving.publish import GatewayPublisher

TARGET = "fluence"  # the value of --target / PublishParams.target

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object as the last stdout line")]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--fluence-target", help="deployment name; the VM is depin-gw-<name> (default: DEPIN_FLUENCE_TARGET)"
    ),
]
StateOpt = Annotated[
    Path | None, typer.Option(help="state directory (default: DEPIN_FLUENCE_STATE_DIR, else .depin/fluence)")
]


def fluence_settings(**overrides: Any) -> FluenceSettings:
    """``FluenceSettings`` from the environment, with the non-None ``overrides`` on top."""
    from serving.fluence.publisher import FluenceSettings

    return FluenceSettings(**{k: v for k, v in overrides.items() if v is not None})


def make_fluence_publisher(
    *,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    max_batch_size: int = 1024,
    account: LocalAccount | None = None,
    **overrides: Any,
) -> FluencePublisher:
    """A :class:`FluencePublisher` for the settings in the environment plus these overrides (other
    ``FluenceSettings`` fields by name in ``overrides``), signing with ``account`` (default: the local
    publisher key, ``DEPIN_PUBLISHER_KEY`` or ``.depin/keys/publisher.key``). Close it (context manager)."""
    from serving.bundle import load_publisher_account
    from serving.fluence.publisher import FluencePublisher

    settings = fluence_settings(
        target=fluence_target, max_usd_per_day=max_usd_per_day, port=port, state_dir=state_dir, **overrides
    )
    client = settings.client()
    try:
        return FluencePublisher(
            client,
            account or load_publisher_account(),
            settings,
            max_batch_size=max_batch_size,
            own_client=True,
        )
    except BaseException:
        client.close()
        raise


@contextlib.contextmanager
def open_fluence_gateway(
    *,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
    max_batch_size: int = 1024,
    account: LocalAccount | None = None,
) -> Iterator[GatewayPublisher]:
    """For the ``train_and_publish`` flow's ``open_publisher``: the target's gateway VM ensured (created,
    bootstrapped, ready — or reused), yielded as a ``GatewayPublisher`` (``.client`` for aliases and smoke
    calls, ``.target`` its URL) whose ``publish`` also records the version in the Fluence state file."""
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


def fluence_gateway_url(fluence_target: str | None = None, state_dir: Path | None = None) -> str | None:
    """The URL of the target's gateway recorded in the state file (None before the first publish). Reads
    no API."""
    from serving.fluence.state import StateStore

    settings = fluence_settings(target=fluence_target, state_dir=state_dir)
    dep = StateStore(settings.state_dir).get(settings.target)
    return dep.url if dep is not None else None


def fluence_pin_for(url: str, state_dir: Path | None = None) -> str | None:
    """The pinned certificate (PEM) of the recorded Fluence gateway serving at ``url``, or None. Reads no
    API."""
    from serving.fluence.state import StateStore

    store = StateStore(fluence_settings(state_dir=state_dir).state_dir)
    if not store.path.exists():
        return None
    for target, dep in store.load().deployments.items():
        if dep.url == url and dep.tls_fingerprint:
            return store.tls_cert(target)
    return None


def run_fluence_publish(
    *,
    model: Path,
    name: str,
    alias: str | None,
    max_batch_size: int,
    fluence_target: str | None = None,
    max_usd_per_day: float | None = None,
) -> dict[str, Any]:
    """``depin publish --target fluence``: ensure the gateway VM, publish, move the alias. Returns the
    ``PublishResult`` JSON plus ``function_url`` and ``fluence`` (VM id, generation, price)."""
    with make_fluence_publisher(
        fluence_target=fluence_target, max_usd_per_day=max_usd_per_day, max_batch_size=max_batch_size
    ) as pub:
        result = pub.publish(model, name, alias=alias).to_json()
        dep = pub.store.get(pub.name)
    ref = f"{name}@{alias}" if alias else f"{name}@{result['version']}"
    result["function_url"] = f"{result['target']}/v1/functions/{ref}/invoke"
    if dep is not None:
        result["fluence"] = {
            "target": dep.target,
            "vm_id": dep.vm_id,
            "vm_name": dep.vm_name,
            "generation": dep.generation,
            "usd_per_day": dep.usd_per_day,
        }
    return result


# ---------------------------------------------------------------------------------------------- commands


def status(
    fluence_target: TargetOpt = None,
    state_dir: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the gateway VMs `depin publish --target fluence` created: state file + live Fluence API."""
    with make_fluence_publisher(fluence_target=fluence_target, state_dir=state_dir) as pub:
        doc = pub.status()
    if not doc["deployments"] and not doc["untracked"]:
        say(f"no Fluence gateway recorded in {doc['state_file']}")
    for d in doc["deployments"]:
        price = f"{d['usd_per_day']:.2f} USD/day" if d["usd_per_day"] is not None else "price unknown"
        ready = ("ready", "green") if d["ready"] else ("not ready", "yellow")
        say(
            (d["target"], "bold"),
            f": VM {d['vm_name']} ({d['vm_id']}, gen {d['generation']}) {d['vm_status']}, "
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
    """Delete the gateway VM(s) (and security group) and forget them: the functions on them go offline."""
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


__all__ = [
    "TARGET",
    "down",
    "fluence_gateway_url",
    "fluence_pin_for",
    "fluence_settings",
    "make_fluence_publisher",
    "open_fluence_gateway",
    "run_fluence_publish",
    "status",
]
