"""The S3 bucket of a shared function registry: a few object operations (boto3), conditional writes, and
errors mapped onto the project's tree.

``ObjectStore.from_settings(settings)`` reaches ``settings.registry_url`` (``s3://bucket/prefix``) with the
gateway's ``s3_*`` settings; each one left unset falls back to boto3's own chain (``AWS_*`` variables, shared
config, instance roles). Keys passed to the methods are relative to the prefix.

Errors: an unreachable endpoint, a timeout, throttling or a 5xx is a ``TransientError`` (retry later); missing
or refused credentials and a missing bucket are a ``ConfigError`` naming the setting to fix. Messages never
contain a secret.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from depin_core.errors import ConfigError, DepinError, PermanentError, TransientError

if TYPE_CHECKING:
    from serving.settings import GatewaySettings

log = logging.getLogger(__name__)

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
_CREDENTIAL_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "Forbidden",
}
_CREDENTIALS_FIX = (
    "set DEPIN_GATEWAY_S3_ACCESS_KEY_ID and DEPIN_GATEWAY_S3_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY, or give the host a role) with read and write access to the bucket"
)


@dataclass(frozen=True)
class Stored:
    """An object's bytes and ETag."""

    data: bytes
    etag: str


class ObjectStore:
    """``s3://bucket/prefix`` through one boto3 client (thread-safe; calls block)."""

    def __init__(self, url: str, client: Any, *, endpoint: str | None = None) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.url = url
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.endpoint = endpoint or "AWS S3"
        self._client = client

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ObjectStore:
        """The store of ``settings.registry_url`` (``ConfigError`` if unset, or for a plain-http endpoint
        without ``s3_allow_http``)."""
        import boto3
        from botocore.config import Config

        if not settings.registry_url:
            raise ConfigError("DEPIN_GATEWAY_REGISTRY_URL (registry_url) is not set")
        endpoint = (
            settings.s3_endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        allow_http = settings.s3_allow_http or os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true")
        if endpoint and endpoint.startswith("http://") and not allow_http:
            raise ConfigError(
                f"the registry's S3 endpoint {endpoint} is plain http: use https, or set "
                "DEPIN_GATEWAY_S3_ALLOW_HTTP=true (only for a loopback/test server)"
            )
        key_id = settings.s3_access_key_id
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        if (key_id is None) != (secret is None):  # boto3 takes both explicitly or both from its chain
            key_id = key_id or os.environ.get("AWS_ACCESS_KEY_ID")
            secret = secret or os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not key_id or not secret:
                raise ConfigError(
                    f"registry {settings.registry_url}: half of the S3 credentials is set; {_CREDENTIALS_FIX}"
                )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=settings.s3_region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 2, "mode": "standard"},  # the sync loop retries with backoff
                s3={"addressing_style": "path"} if endpoint else None,  # S3-compatible servers: path style
            ),
        )
        return cls(settings.registry_url, client, endpoint=endpoint)

    # ---- operations --------------------------------------------------------------------------------------
    def get(self, key: str) -> Stored | None:
        """The object at ``key``, or None if there is none."""
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return Stored(r["Body"].read(), r["ETag"])
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, f"reading {key}") from None

    def put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (``If-None-Match: *``); False when it already exists
        (another writer got there first)."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, IfNoneMatch="*")
            return True
        except Exception as exc:
            if _code(exc) in ("PreconditionFailed", "412"):
                return False
            if _code(exc) == "ConditionalRequestConflict":  # a concurrent create of the same key: it lost
                return False
            raise self._error(exc, f"writing {key}") from None

    def put(self, key: str, data: bytes) -> None:
        """Write ``key`` unconditionally (whole object, atomically visible)."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except Exception as exc:
            raise self._error(exc, f"writing {key}") from None

    def list_after(self, folder: str, start_after: str) -> list[str]:
        """Keys under ``folder`` sorting after ``start_after`` (both relative to the prefix), in order."""
        out: list[str] = []
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + folder,
            "StartAfter": self.prefix + start_after,
        }
        try:
            while True:
                r = self._client.list_objects_v2(**kwargs)
                out += [o["Key"][len(self.prefix) :] for o in r.get("Contents", [])]
                if not r.get("IsTruncated"):
                    return out
                kwargs["ContinuationToken"] = r["NextContinuationToken"]
        except Exception as exc:
            raise self._error(exc, f"listing {folder}") from None

    def check(self) -> None:
        """Reach the bucket once (``ConfigError``: missing bucket or refused credentials; ``TransientError``:
        unreachable)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._error(exc, "checking the bucket") from None

    # ---- errors ------------------------------------------------------------------------------------------
    def _error(self, exc: Exception, doing: str) -> DepinError:
        from botocore import exceptions as bx

        where = f"registry {self.url} ({self.endpoint}), {doing}"
        if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
            return ConfigError(f"{where}: no S3 credentials; {_CREDENTIALS_FIX}")
        if isinstance(
            exc,
            bx.EndpointConnectionError
            | bx.ConnectTimeoutError
            | bx.ReadTimeoutError
            | bx.ConnectionClosedError
            | bx.ResponseStreamingError,
        ):
            return TransientError(
                f"{where}: the store is unreachable ({type(exc).__name__}); retrying. Check "
                "DEPIN_GATEWAY_S3_ENDPOINT_URL and the network"
            )
        code = _code(exc)
        if code in ("NoSuchBucket",) or (code == "404" and doing == "checking the bucket"):
            return ConfigError(
                f"{where}: bucket {self.bucket!r} does not exist; create it or fix DEPIN_GATEWAY_REGISTRY_URL"
            )
        if code in _CREDENTIAL_CODES or code == "403":
            return ConfigError(f"{where}: the store refused the credentials ({code}); {_CREDENTIALS_FIX}")
        status = _status(exc)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError(f"{where}: the store answered {code or status}; retrying")
        if isinstance(exc, bx.BotoCoreError):
            return TransientError(f"{where}: {type(exc).__name__}; retrying")
        return PermanentError(f"{where}: the store answered {code or type(exc).__name__} (HTTP {status})")


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: Exception) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


__all__ = ["ObjectStore", "Stored"]
