"""A binary quadratic model sampled on Dynex through its official SDK (``dynex.DynexSampler``, gRPC).

Settings use Dynex's own variable names (``DYNEX_SDK_KEY``, ``DYNEX_GRPC_ENDPOINT``, then ``DYNEX_`` + field).
Failures are sorted for the solver chain: unreachable, timed out, a server or job error are
``TransientError`` (the chain goes on to a local solver); a refused key, a price above ``max_price`` or
invalid settings are ``PermanentError``. Dynex's answer is untrusted: :func:`verify_sampleset` recomputes
every energy locally. The key is never logged nor put in an error; the SDK's own log records are kept out of
the application's logs (forwarded at DEBUG, key removed).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError
from depin_core.settings import EnvSettings
from gpu_jobs.errors import VerifyError

if TYPE_CHECKING:
    import dimod

log = logging.getLogger(__name__)

PRODUCTION_ENDPOINT = "quantum-router-engine-grpc.hz.dynex.co:3000"
INSTALL_HINT = "pip install 'depin-pipeline[dynex]'"
NANO_PER_DNX = 1_000_000_000  # the SDK's block_fee and real_price_per_block are nanoDNX


class DynexSettings(EnvSettings):
    """Where and how to sample on Dynex. ``sdk_key`` is a ``SecretStr``: never printed."""

    model_config = SettingsConfigDict(
        env_prefix="DYNEX_",
        extra="ignore",
        hide_input_in_errors=True,
        env_ignore_empty=True,
        populate_by_name=True,
    )

    sdk_key: SecretStr | None = Field(None, description="Dynex SDK key (DYNEX_SDK_KEY)")
    grpc_endpoint: str = Field(PRODUCTION_ENDPOINT, description="host:port of Dynex's gRPC API")
    compute_backend: Literal["cpu", "gpu", "qpu"] | None = Field(
        None, description="Dynex compute backend; None: the SDK's default (unspecified)"
    )
    qpu_model: Literal["apollo_rc1", "apollo_10000"] | None = Field(
        None, description="QPU chip, required by compute_backend=qpu"
    )
    num_reads: int = Field(32, ge=1, description="reads per job")
    annealing_time: int = Field(100, ge=1, description="annealing steps per read")
    max_wall_s: float = Field(300.0, gt=0, description="deadline of one sampling call (s)")
    max_price: float | None = Field(
        None, gt=0, description="price guard: the most DNX per block to pay (sent as the job's block fee)"
    )


class DynexAuthError(PermanentError):
    """Dynex refused the SDK key."""


class DynexPriceError(PermanentError):
    """Dynex's price per block is above ``max_price``."""


class DynexUnavailable(TransientError):
    """Dynex could not be reached, timed out or failed the job: another solver may answer."""


def sample_bqm(bqm: dimod.BinaryQuadraticModel, settings: DynexSettings | None = None) -> dimod.SampleSet:
    """Sample ``bqm`` on Dynex with the official ``DynexSampler``; the samples keep ``bqm``'s labels and
    vartype, the energies are the ones Dynex reported (check them with :func:`verify_sampleset`)."""
    import dimod

    settings = settings if settings is not None else DynexSettings()
    key = settings.sdk_key.get_secret_value().strip() if settings.sdk_key is not None else ""
    if not key:
        raise ConfigError("DYNEX_SDK_KEY is not set: set it to your Dynex SDK key to use the dynex solver")
    if settings.compute_backend == "qpu" and settings.qpu_model is None:
        raise ConfigError(
            "DYNEX_QPU_MODEL is required with DYNEX_COMPUTE_BACKEND=qpu (apollo_rc1, apollo_10000)"
        )
    if bqm.num_variables == 0:
        raise ConfigError("the model has no variables: nothing to sample on Dynex")
    sdk = _import_sdk()
    _keep_sdk_logs_out(key)

    # The SDK reads the model's biases as BINARY ones (and relabels it in place while converting).
    labels = list(bqm.variables)
    work = bqm.change_vartype(dimod.BINARY, inplace=False)

    answer = _run_with_deadline(lambda: _sample(sdk, work, key, settings), settings.max_wall_s, key)

    if len(answer) == 0:
        raise DynexUnavailable("Dynex returned no samples; try again or use another solver")
    present = set(answer.variables)
    missing = [v for v in labels if v not in present]
    if missing:
        raise VerifyError(f"Dynex's answer lacks {len(missing)} of the model's {len(labels)} variables")
    columns = [answer.variables.index(v) for v in labels]
    out = dimod.SampleSet.from_samples(
        (answer.record.sample[:, columns], labels),
        dimod.BINARY,
        energy=answer.record.energy,
        num_occurrences=answer.record.num_occurrences,
    )
    if bqm.vartype is dimod.SPIN:
        out = out.change_vartype(dimod.SPIN)
    return out


def verify_sampleset(
    bqm: dimod.BinaryQuadraticModel, sampleset: dimod.SampleSet, *, rtol: float = 1e-6, atol: float = 1e-6
) -> None:
    """Raise ``VerifyError`` unless every sample assigns all of ``bqm``'s variables within its vartype and
    reports the energy ``bqm`` gives it (also accepted: the energy without ``bqm.offset``)."""
    if len(sampleset) == 0:
        raise VerifyError("the answer has no samples")
    present = set(sampleset.variables)
    missing = [v for v in bqm.variables if v not in present]
    if missing:
        raise VerifyError(
            f"the answer lacks variables of the model, e.g. {missing[0]!r} ({len(missing)} missing)"
        )
    labels = list(bqm.variables)
    columns = [sampleset.variables.index(v) for v in labels]
    values = sampleset.record.sample[:, columns]
    allowed = np.array(sorted(bqm.vartype.value))
    if not np.isin(values, allowed).all():
        raise VerifyError(f"the answer has values outside {bqm.vartype.name} {sorted(bqm.vartype.value)}")
    local = bqm.energies((values, labels))
    reported = np.asarray(sampleset.record.energy, dtype=float)
    ok = np.isclose(reported, local, rtol=rtol, atol=atol)
    if bqm.offset:
        ok |= np.isclose(reported, local - bqm.offset, rtol=rtol, atol=atol)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise VerifyError(
            f"sample {i} reports energy {reported[i]:.6g} but its assignment has energy {local[i]:.6g}: "
            f"{int((~ok).sum())} of {len(ok)} samples misreport their energy; the answer is rejected"
        )


# ---- the SDK ----------------------------------------------------------------------------------------------------
def _import_sdk() -> Any:
    try:
        import dynex
    except ImportError as exc:
        raise ConfigError(f"the Dynex SDK is not installed ({exc.name or exc}): {INSTALL_HINT}") from None
    return dynex


def _sample(sdk: Any, work: dimod.BinaryQuadraticModel, key: str, settings: DynexSettings) -> dimod.SampleSet:
    config = sdk.DynexConfig(
        sdk_key=key,
        grpc_endpoint=settings.grpc_endpoint,
        compute_backend=settings.compute_backend or "unspecified",
        qpu_model=settings.qpu_model,
        retry_count=1,  # the SDK retries at once, without backoff: the chain decides instead
        default_timeout=settings.max_wall_s,  # the SDK gives up after this long without progress
        use_notebook_output=False,
        dotenv_path=os.devnull,  # our settings are read already: the SDK must not load a stray .env
        tmp_dir=os.path.join(tempfile.gettempdir(), "depin-dynex"),
    )
    model = sdk.BQM(work, config=config)
    sampler = sdk.DynexSampler(
        model, logging=False, description="depin-pipeline", config=config, show_progress=False
    )
    block_fee = round(settings.max_price * NANO_PER_DNX) if settings.max_price is not None else 0
    return sampler.sample(
        num_reads=settings.num_reads, annealing_time=settings.annealing_time, block_fee=block_fee
    )


def _run_with_deadline(call: Any, max_wall_s: float, key: str) -> Any:
    """``call()`` in a daemon thread; past ``max_wall_s`` a ``DynexUnavailable``. The SDK cannot be stopped
    from outside: its thread ends by itself once its own inactivity timeout (also ``max_wall_s``) runs out."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="dynex-sample", daemon=True)
    thread.start()
    thread.join(max_wall_s)
    if thread.is_alive():
        raise DynexUnavailable(
            f"Dynex did not answer within max_wall_s={max_wall_s:g}s (DYNEX_MAX_WALL_S); "
            "raise it or use another solver"
        )
    if "error" in box:
        raise _translate(box["error"], key) from None
    return box["value"]


_AUTH_CODES = {"UNAUTHENTICATED"}
_REQUEST_CODES = {"INVALID_ARGUMENT", "UNIMPLEMENTED"}


def _grpc_code(exc: BaseException) -> str | None:
    """The gRPC status name behind ``exc`` (the SDK chains the ``grpc.RpcError`` as its cause), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "code", None)
        if callable(code):
            try:
                return str(code().name)
            except Exception:  # not a grpc error after all
                return None
        seen = seen.__cause__ or seen.__context__
    return None


def _translate(exc: BaseException, key: str) -> BaseException:
    """Our error for a failure of the SDK; its text with the key removed."""
    if isinstance(exc, DepinError):
        return exc
    detail = _redact(f"{type(exc).__name__}: {exc}", key)
    code = _grpc_code(exc)
    name = type(exc).__name__
    if code in _AUTH_CODES or name == "DynexAuthenticationError":
        return DynexAuthError(f"Dynex refused the SDK key (DYNEX_SDK_KEY): check or renew it ({detail})")
    if code == "FAILED_PRECONDITION" and re.search(r"price|fee", detail, re.IGNORECASE):
        return DynexPriceError(
            f"Dynex's price per block is above max_price (DYNEX_MAX_PRICE): raise it or use another solver "
            f"({detail})"
        )
    if code in _REQUEST_CODES or name in ("DynexValidationError", "DynexModelError"):
        return ConfigError(f"Dynex refused the request: check the DYNEX_ settings and the model ({detail})")
    return DynexUnavailable(f"Dynex failed: {detail}; another solver may answer")


# ---- the SDK's log records ----------------------------------------------------------------------------------------
_SECRETS: set[str] = set()
_BEARER = re.compile(r"(?i)bearer\s+\S+")


def _redact(text: str, key: str | None = None) -> str:
    for secret in (*_SECRETS, *([key] if key else [])):
        text = text.replace(secret, "***")
    return _BEARER.sub("Bearer ***", text)


class _SdkLogForwarder(logging.Handler):
    """Hands the SDK's records to our logger at DEBUG, without keys: the SDK logs tables and progress at
    INFO and would otherwise add its own stderr handler."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log.debug("dynex sdk: %s", _redact(record.getMessage()))
        except Exception:  # logging must not fail the caller
            self.handleError(record)


_FORWARDER = _SdkLogForwarder()


def _keep_sdk_logs_out(key: str) -> None:
    _SECRETS.add(key)
    sdk_log = logging.getLogger("dynex")
    if _FORWARDER not in sdk_log.handlers:
        sdk_log.addHandler(_FORWARDER)
    sdk_log.propagate = False


__all__ = [
    "INSTALL_HINT",
    "PRODUCTION_ENDPOINT",
    "DynexAuthError",
    "DynexPriceError",
    "DynexSettings",
    "DynexUnavailable",
    "sample_bqm",
    "verify_sampleset",
]
