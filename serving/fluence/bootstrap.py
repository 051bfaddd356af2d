"""How a stock Linux VM on Fluence becomes a function gateway: its settings, a POSIX sh bootstrap script, the
cloud-init user data that carries both (generation B), and the SSH bootstrap (generation A, asyncssh).

The format (shared with the fake Fluence API in ``tests/fakes/fluence.py``, which parses it):

- the gateway's settings are ``KEY=VALUE`` lines (``gateway_env``) that end up in ``/etc/depin/gateway.env``
  (mode 0600; systemd's ``EnvironmentFile=``). They hold the **sha256** of the admin key, never the key;
- ``bootstrap_script`` writes that file through exactly this heredoc::

      mkdir -p /etc/depin
      cat > /etc/depin/gateway.env <<'DEPIN_ENV'
      KEY=VALUE
      DEPIN_ENV

  then installs uv (``pip install uv`` into ``/opt/depin/uv`` unless the image has one: no downloaded
  installer piped into sh), a venv ``/opt/depin/venv`` of the image's ``python3`` when it fits
  ``PYTHON_REQUEST`` (else uv installs one), ``uv pip install <package>`` into it, and a systemd unit
  ``depin-gateway.service`` (``EnvironmentFile=/etc/depin/gateway.env``, ``ExecStart=… depin serve``,
  ``Restart=always``). It is idempotent (re-running it updates the settings and restarts the unit);
- the gateway serves HTTPS with a certificate the publisher made for this VM (and pins):
  ``/etc/depin/tls-cert.pem`` and ``/etc/depin/tls-key.pem`` (0600, owned by the ``depin`` service user);
- ``cloud_init`` is ``#cloud-config`` YAML: ``write_files`` (the env file, 0600, the TLS files, and the script at
  ``/usr/local/bin/depin-bootstrap``, 0755) and ``runcmd: [[/usr/local/bin/depin-bootstrap]]``; at most
  16 KiB (Fluence's cap on ``cloudInit.userData``);
- over SSH (generation A has no user data) the script goes on the stdin of ``sh -s`` (``sudo -n sh -s`` when
  the image's user is not root): :func:`ssh_bootstrap`.

``parse_env``, ``env_from_script`` and ``env_from_cloud_init`` read the settings back (the fake uses them).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depin_core.errors import ConfigError, PermanentError, TransientError
from depin_core.tls import NodeCertificate

ENV_PATH = "/etc/depin/gateway.env"
TLS_CERT_PATH = "/etc/depin/tls-cert.pem"  # the gateway's certificate (the client pins it)
TLS_KEY_PATH = "/etc/depin/tls-key.pem"  # its private key: 0600, owned by the depin service user
SCRIPT_PATH = "/usr/local/bin/depin-bootstrap"
REGISTRY_DIR = "/var/lib/depin/registry"
VENV_DIR = "/opt/depin/venv"
UV_DIR = "/opt/depin/uv"  # a venv holding uv (pip install uv), when the image has no uv
UV_VERSION = "0.13.9"  # the uv the bootstrap pip-installs (pinned; tests/support/vm.py fetches the same)
PYTHON_REQUEST = ">=3.11,<3.14"  # requires-python; the image's python3 when it fits (Debian 12, Ubuntu 24.04)
UNIT = "depin-gateway.service"
HEREDOC = "DEPIN_ENV"
MAX_USER_DATA = 16 * 1024  # Fluence generation B: cloudInit.userData is capped at 16 KiB
DEFAULT_PACKAGE = "depin-pipeline"
# CPU-only torch wheels (the default PyPI torch pulls several GB of CUDA libraries a CPU VM cannot use)
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"

_KEY = re.compile(r"[A-Z_][A-Z0-9_]*")
# what systemd's EnvironmentFile and sh both read literally: no quotes, spaces, $, backslashes or newlines
_VALUE = re.compile(r"[A-Za-z0-9_.,:/@+=%-]*")
# a pip requirement / URL we are willing to put inside a shell script (single-quoted there as well)
_PACKAGE = re.compile(r"[A-Za-z0-9_.,:/@+=%<>!~#\[\]\- ]+")
_HEREDOC_BODY = re.compile(
    r"^cat > " + re.escape(ENV_PATH) + r" <<'" + HEREDOC + r"'\n(.*?)^" + HEREDOC + r"$", re.M | re.S
)


def gateway_env(
    *,
    port: int,
    admin_key_hash: str,
    trusted_publishers: Sequence[str],
    extra: Mapping[str, str] | None = None,
    tls: bool = True,
) -> dict[str, str]:
    """The gateway's settings on the VM (``DEPIN_GATEWAY_*``): listen on 0.0.0.0:``port``, accept bundles
    signed by ``trusted_publishers``, admin API for the key whose sha256 is ``admin_key_hash``, HTTPS with the
    certificate at ``TLS_CERT_PATH`` / ``TLS_KEY_PATH`` (``tls``). ``extra``: further ``DEPIN_GATEWAY_*``
    settings (e.g. ``DEPIN_GATEWAY_MAX_WAIT_MS``)."""
    if not 1 <= port <= 65535 or port == 22:
        raise ConfigError(f"gateway port {port}: use 1-65535 except 22 (SSH) — e.g. 8787")
    if not re.fullmatch(r"[0-9a-f]{64}", admin_key_hash):
        raise ConfigError("admin_key_hash must be the sha256 hex digest of the admin key (never the key)")
    if not trusted_publishers:
        raise ConfigError("trusted_publishers is empty: give the publisher address that signs the bundles")
    env = {
        "DEPIN_GATEWAY_HOST": "0.0.0.0",
        "DEPIN_GATEWAY_PORT": str(port),
        "DEPIN_GATEWAY_ADMIN_KEY_HASHES": admin_key_hash,
        "DEPIN_GATEWAY_TRUSTED_PUBLISHERS": ",".join(trusted_publishers),
        "DEPIN_GATEWAY_REGISTRY_DIR": REGISTRY_DIR,
    }
    if tls:
        env["DEPIN_GATEWAY_TLS_CERT_FILE"] = TLS_CERT_PATH
        env["DEPIN_GATEWAY_TLS_KEY_FILE"] = TLS_KEY_PATH
    for key, value in (extra or {}).items():
        if not key.startswith("DEPIN_GATEWAY_"):
            raise ConfigError(f"gateway setting {key!r}: only DEPIN_GATEWAY_* settings go to the VM")
        env[key] = str(value)
    check_env(env)
    return env


def check_env(env: Mapping[str, str]) -> None:
    """``ConfigError`` unless every key is an env var name and every value is safe unquoted (no spaces,
    quotes, ``$``, backslashes or newlines) in both sh and systemd's ``EnvironmentFile``."""
    for key, value in env.items():
        if not _KEY.fullmatch(key):
            raise ConfigError(f"gateway setting {key!r}: not an environment variable name (A-Z, 0-9, _)")
        if not _VALUE.fullmatch(value):
            raise ConfigError(
                f"gateway setting {key}: the value has characters that would need quoting (spaces, quotes, "
                "$, \\ or newlines); use a plain value"
            )


def render_env(env: Mapping[str, str]) -> str:
    """The ``KEY=VALUE`` lines of ``env`` (sorted, newline-terminated): the content of the env file."""
    check_env(env)
    return "".join(f"{k}={env[k]}\n" for k in sorted(env))


def parse_env(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines back into a dict (blank lines and ``#`` comments skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ValueError(f"not a KEY=VALUE line: {line[:60]!r}")
        out[key] = value
    return out


def _check_package(package: str, what: str = "package") -> str:
    package = package.strip()
    if not package or not _PACKAGE.fullmatch(package) or "'" in package:
        raise ConfigError(
            f"{what} {package[:80]!r}: give a pip requirement (name, name==version, 'name @ URL' or a wheel/"
            "git URL) without quotes, $ or backslashes"
        )
    return package


def _tls_heredocs(tls: NodeCertificate | None) -> str:
    if tls is None:
        return ""
    for pem in (tls.cert_pem, tls.key_pem):
        if "DEPIN_TLS" in pem or not pem.startswith("-----BEGIN "):
            raise ConfigError("the gateway's TLS certificate/key must be PEM text")
    cert, key = tls.cert_pem.rstrip("\n") + "\n", tls.key_pem.rstrip("\n") + "\n"
    return (
        f"cat > {TLS_CERT_PATH} <<'DEPIN_TLS_CERT'\n{cert}DEPIN_TLS_CERT\n"
        f"cat > {TLS_KEY_PATH} <<'DEPIN_TLS_KEY'\n{key}DEPIN_TLS_KEY\n"
    )


def bootstrap_script(
    env: Mapping[str, str],
    package: str,
    *,
    torch_index: str | None = CPU_TORCH_INDEX,
    tls: NodeCertificate | None = None,
) -> str:
    """The POSIX sh script that turns a fresh Debian/Ubuntu VM (run as root) into the gateway: env file,
    uv (``pip install uv`` into ``/opt/depin/uv`` unless the image has one), a venv of a Python
    ``>=3.11,<3.14`` (the image's when it fits, else one uv installs), ``uv pip install package`` (torch from
    ``torch_index``, CPU wheels by default), a ``depin`` system user and the ``depin-gateway`` systemd unit,
    started. ``tls``: the gateway's certificate and key, written by the script itself (SSH, generation A:
    the script is never stored); cloud-init writes them with ``write_files`` instead (the script file is
    world-readable). Either way the script gives the key (0600) to the ``depin`` user. Safe to run again."""
    package = _check_package(package)
    index = ""
    if torch_index:
        index = f" --extra-index-url '{_check_package(torch_index, 'torch_index')}' --index-strategy unsafe-best-match"
    body = render_env(env)
    return f"""#!/bin/sh
# depin function gateway bootstrap (generated by depin publish --target fluence). Idempotent.
set -eu
umask 077
mkdir -p /etc/depin
cat > {ENV_PATH} <<'{HEREDOC}'
{body}{HEREDOC}
chmod 600 {ENV_PATH}
{_tls_heredocs(tls)}umask 022
export DEBIAN_FRONTEND=noninteractive
mkdir -p /opt/depin
# uv from PyPI, installed by pip into a venv of its own (no downloaded installer piped into sh)
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  if [ ! -x {UV_DIR}/bin/uv ]; then
    if ! python3 -m venv {UV_DIR} >/dev/null 2>&1; then  # Debian/Ubuntu: venv needs python3-venv
      apt-get update -q && apt-get install -y -q python3-venv
      rm -rf {UV_DIR}
      python3 -m venv {UV_DIR}
    fi
    {UV_DIR}/bin/python -m pip install -q --disable-pip-version-check 'uv=={UV_VERSION}'
  fi
  UV={UV_DIR}/bin/uv
fi
# the image's Python when it is new enough, else uv installs one under /opt/depin/python
export UV_PYTHON_INSTALL_DIR=/opt/depin/python
[ -x {VENV_DIR}/bin/python ] || "$UV" venv --python '{PYTHON_REQUEST}' {VENV_DIR}
"$UV" pip install --python {VENV_DIR}/bin/python{index} '{package}'
echo "depin gateway: installed with $("$UV" --version)"
"$UV" pip show --python {VENV_DIR}/bin/python depin-pipeline | sed -n -e 's/^Name: /  package: /p' -e 's/^Version: /  version: /p'
id depin >/dev/null 2>&1 || useradd --system --home-dir /var/lib/depin --shell /usr/sbin/nologin depin
mkdir -p {REGISTRY_DIR}
chown -R depin:depin /var/lib/depin
if [ -f {TLS_KEY_PATH} ]; then  # the service user reads its TLS key; nobody else does
  chmod 755 /etc/depin  # made under umask 077 above: the service user must reach its files in it
  chown depin:depin {TLS_KEY_PATH} {TLS_CERT_PATH}
  chmod 600 {TLS_KEY_PATH}
  chmod 644 {TLS_CERT_PATH}
fi
cat > /etc/systemd/system/{UNIT} <<'DEPIN_UNIT'
[Unit]
Description=depin function gateway
After=network-online.target
Wants=network-online.target

[Service]
User=depin
WorkingDirectory=/var/lib/depin
EnvironmentFile={ENV_PATH}
ExecStart={VENV_DIR}/bin/depin serve
Restart=always
RestartSec=3
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
DEPIN_UNIT
systemctl daemon-reload
systemctl enable {UNIT}
systemctl restart {UNIT}
echo "depin gateway bootstrapped"
"""


def env_from_script(script: str) -> dict[str, str]:
    """The gateway settings inside a :func:`bootstrap_script` (its ``DEPIN_ENV`` heredoc)."""
    match = _HEREDOC_BODY.search(script)
    if match is None:
        raise ValueError(f"no `cat > {ENV_PATH} <<'{HEREDOC}'` heredoc in the script")
    return parse_env(match.group(1))


def _block(text: str) -> str:
    """``text`` as the literal block scalar value of a key at indentation 4: explicit indentation indicator
    (content at 6 spaces, kept exactly even when a line starts with spaces) and chomping that keeps the
    text's final newlines as they are."""
    keep = "+" if text.endswith("\n\n") else ("" if text.endswith("\n") else "-")
    lines = text.removesuffix("\n").split("\n") if text else [""]
    body = "".join(f"      {line}\n" if line else "\n" for line in lines)
    return f"|2{keep}\n{body}"


def cloud_init(
    env: Mapping[str, str],
    package: str,
    *,
    torch_index: str | None = CPU_TORCH_INDEX,
    tls: NodeCertificate | None = None,
) -> str:
    """``#cloud-config`` user data that writes the env file (0600), the gateway's TLS certificate and key
    (``tls``; the key 0600, handed to the ``depin`` user by the script) and the bootstrap script (0755) and
    runs the script once. ``ConfigError`` if it exceeds Fluence's 16 KiB cap."""
    script = bootstrap_script(env, package, torch_index=torch_index)
    content = render_env(env)
    tls_files = ""
    if tls is not None:
        _tls_heredocs(tls)  # checks the PEM
        for path, pem, mode in ((TLS_CERT_PATH, tls.cert_pem, "0644"), (TLS_KEY_PATH, tls.key_pem, "0600")):
            tls_files += (
                f"  - path: {path}\n"
                "    owner: root:root\n"
                f"    permissions: '{mode}'\n"
                f"    content: {_block(pem.rstrip(chr(10)) + chr(10))}"
            )
    text = (
        "#cloud-config\n"
        "# depin function gateway (generated by depin publish --target fluence)\n"
        "write_files:\n"
        f"  - path: {ENV_PATH}\n"
        "    owner: root:root\n"
        "    permissions: '0600'\n"
        f"    content: {_block(content)}"
        f"{tls_files}"
        f"  - path: {SCRIPT_PATH}\n"
        "    owner: root:root\n"
        "    permissions: '0755'\n"
        f"    content: {_block(script)}"
        "runcmd:\n"
        f"  - [{SCRIPT_PATH}]\n"
    )
    size = len(text.encode("utf-8"))
    if size > MAX_USER_DATA:
        raise ConfigError(
            f"cloud-init user data is {size} bytes, over Fluence's {MAX_USER_DATA}-byte cap: shorten the "
            "package requirement or the extra gateway settings"
        )
    return text


def env_from_cloud_init(user_data: str) -> dict[str, str]:
    """The gateway settings in :func:`cloud_init` user data (its ``write_files`` entry for the env file).
    Needs PyYAML; ``ValueError`` when the YAML is invalid or has no such entry."""
    import yaml

    try:
        doc = yaml.safe_load(user_data)
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid cloud-init YAML: {exc}") from None
    for entry in (doc or {}).get("write_files") or []:
        if isinstance(entry, dict) and entry.get("path") == ENV_PATH:
            return parse_env(str(entry.get("content") or ""))
    raise ValueError(f"cloud-init user data writes no {ENV_PATH}")


# ---------------------------------------------------------------------------------------------- SSH


def ssh_command(username: str) -> str:
    """The remote command that runs the script from stdin: ``sh -s`` as root, else ``sudo -n sh -s``."""
    return "sh -s" if username == "root" else "sudo -n sh -s"


def ensure_ssh_key(path: Path | str) -> str:
    """The OpenSSH public key (``ssh-ed25519 AAAA… depin``) of the private key at ``path`` (OpenSSH format,
    no passphrase), creating an ed25519 key there (mode 0600) first if there is none."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.exists():
        from depin_core.fs import atomic_write_bytes

        key: Any = Ed25519PrivateKey.generate()
        data = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, data)  # mkstemp: created 0600
        path.chmod(0o600)
    else:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"SSH key {path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"SSH key {path}: not an unencrypted OpenSSH private key ({exc}); point "
                "DEPIN_FLUENCE_SSH_KEY_FILE at one, or remove it to have a new key made"
            ) from None
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode() + " depin"


@dataclass(frozen=True)
class SshResult:
    """What the bootstrap run returned: exit status, the tails of its output, and the server's host key
    (OpenSSH format; pinned on later connections)."""

    exit_status: int
    stdout: str
    stderr: str
    host_key: str


async def _ssh_run(
    host: str,
    port: int,
    username: str,
    key_file: Path,
    script: str,
    *,
    connect_timeout_s: float,
    run_timeout_s: float,
    host_key: str | None,
) -> SshResult:
    import asyncssh

    known: Any = None  # a brand-new VM's host key cannot be known in advance: trust on first use
    if host_key:
        known = ([asyncssh.import_public_key(host_key)], [], [])
    async with asyncssh.connect(
        host,
        port=port,
        username=username,
        client_keys=[str(key_file)],
        known_hosts=known,
        agent_path=None,
        connect_timeout=connect_timeout_s,
        login_timeout=connect_timeout_s,
    ) as conn:
        server_key = conn.get_server_host_key()
        result = await conn.run(ssh_command(username), input=script, check=False, timeout=run_timeout_s)
    pub = server_key.export_public_key().decode().strip() if server_key is not None else ""

    def text(value: Any) -> str:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return str(value or "")[-4000:]

    return SshResult(
        exit_status=int(result.exit_status if result.exit_status is not None else -1),
        stdout=text(result.stdout),
        stderr=text(result.stderr),
        host_key=pub,
    )


def _run_coroutine(coro: Any) -> Any:
    """``asyncio.run(coro)``, in a helper thread when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def ssh_bootstrap(
    host: str,
    script: str,
    *,
    username: str,
    key_file: Path | str,
    port: int = 22,
    timeout_s: float = 600.0,
    connect_timeout_s: float = 10.0,
    retry_s: float = 2.0,
    host_key: str | None = None,
) -> SshResult:
    """Run ``script`` on ``host`` over SSH (``sh -s``, script on stdin) as ``username`` with the private key
    ``key_file``. A VM that just became Active may not accept SSH yet: connection failures are retried until
    ``timeout_s``, then ``TransientError``. A non-zero exit → ``PermanentError`` with the output's tail.
    ``host_key``: the server key recorded by an earlier bootstrap (pinned); None trusts the first one seen."""
    try:
        import asyncssh
    except ImportError:
        raise ConfigError(
            "generation-A Fluence VMs are bootstrapped over SSH, which needs asyncssh: pip install asyncssh"
        ) from None

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        remaining = deadline - time.monotonic()
        try:
            result = _run_coroutine(
                _ssh_run(
                    host,
                    port,
                    username,
                    Path(key_file),
                    script,
                    connect_timeout_s=max(1.0, min(connect_timeout_s, remaining)),
                    run_timeout_s=max(1.0, remaining),
                    host_key=host_key,
                )
            )
            break
        except asyncssh.PermissionDenied:
            raise PermanentError(
                f"SSH {username}@{host}:{port}: our key was refused; the VM was created with another SSH "
                "key — `depin fluence down` and publish again (it creates the VM with this machine's key)"
            ) from None
        except asyncssh.HostKeyNotVerifiable:
            raise PermanentError(
                f"SSH {host}:{port}: the host key changed since the VM was bootstrapped; if the VM was "
                "recreated run `depin fluence down` and publish again, else do not trust this host"
            ) from None
        except asyncssh.TimeoutError:
            raise TransientError(
                f"SSH {host}:{port}: the bootstrap script ran past {timeout_s:.0f} s"
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() + retry_s >= deadline:
            raise TransientError(
                f"SSH {username}@{host}:{port}: no connection within {timeout_s:.0f} s ({last}); is port 22 "
                "open on the VM (openPorts)?"
            )
        time.sleep(retry_s)
    if result.exit_status != 0:
        raise PermanentError(
            f"SSH {username}@{host}:{port}: the bootstrap script failed (exit {result.exit_status}): "
            f"{(result.stderr or result.stdout)[-1500:]}"
        )
    return result


__all__ = [
    "CPU_TORCH_INDEX",
    "DEFAULT_PACKAGE",
    "ENV_PATH",
    "MAX_USER_DATA",
    "REGISTRY_DIR",
    "SCRIPT_PATH",
    "TLS_CERT_PATH",
    "TLS_KEY_PATH",
    "SshResult",
    "bootstrap_script",
    "check_env",
    "cloud_init",
    "ensure_ssh_key",
    "env_from_cloud_init",
    "env_from_script",
    "gateway_env",
    "parse_env",
    "render_env",
    "ssh_bootstrap",
    "ssh_command",
]
