"""``AgentRunner``: a ``JobRunner`` that runs jobs on a worker agent (``gpu_jobs.agent``) over HTTPS.

Transport: ``https://`` with the node's certificate pinned (``tls_cert``, or ``tls_fingerprint`` whose
certificate is read once and kept only if its sha256 matches); the runner trusts that certificate and no other,
so a man in the middle fails the TLS handshake before the token or any data is sent, and is reported as a
permanent ``PinMismatch`` (never retried). Plain ``http://`` is accepted only to loopback addresses
(``ConfigError`` before any connection otherwise).

The agent runs the job with its own ``LocalRunner`` (the same worker code); this side ships the inputs, watches
the job and brings the results home:

- ``submit``: a health check first (an unreachable agent raises ``TransientError`` within
  ``connect_timeout_s``), then every input blob the agent lacks is uploaded (``HEAD`` first; a partial upload
  resumes from the agent's ``Upload-Offset``; files are streamed in 1 MiB chunks, never read whole), plus the
  checkpoint files of ``spec.checkpoint.resume_from``, then ``POST /v1/jobs`` (idempotent by job id).
- A background poller (every ``poll_s``) refreshes each unfinished job and mirrors its newest checkpoint pair
  into ``workdir_root/<job_id>/checkpoints/`` (sha256 verified; the JSON marker is moved in last), so
  ``checkpoint_dir(job_id)`` still has it after the node is gone. With ``on_log`` (or the ``gpu_jobs.remote``
  logger at INFO) it also streams the job's log lines.
- Lost jobs: when the agent cannot be reached for ``heartbeat_timeout_s``, or the job's heartbeat has not moved
  for ``heartbeat_timeout_s`` while it is staging/running/uploading (measured on this machine's clock, so clock
  skew between the hosts does not matter), the job is lost for good: ``status`` says FAILED "heartbeat lost …"
  and ``result`` returns FAILED(infra).
- ``result`` downloads every file of the agent's output manifest into the caller's ``spec.outputs.dir``
  (through a staging directory), checks each size and sha256 against the manifest and the result's
  ``artifacts``, and only then moves them into place; any mismatch gives FAILED(verify) and removes them.
  ``artifacts`` are rewritten to local absolute paths and the last attempt to ``runner=self.name`` and the
  agent's node.

Errors: connection failures, 429 and 5xx are retried (``Retry-After`` honoured) for at most
``retry_budget_s``, then ``TransientError``; 401/403 raise ``AgentAuthError`` (a ``PermanentError``) naming the
token fix; other 4xx raise ``AgentRefused`` with the agent's message and field. The token is a ``SecretStr``
that goes into the ``Authorization`` header and nowhere else.

Layout: ``_client`` (the requests to the agent: token, retries, the TLS pin, verified downloads), ``_blobs``
(input upload and resume), ``_poller`` (the job records, status, lost jobs, the checkpoint mirror, log lines),
``_results`` (fetching and verifying the result), ``_runner`` (``AgentRunner``, the ``JobRunner`` calls).
"""

from gpu_jobs.errors import AgentAuthError, AgentRefused
from gpu_jobs.remote._client import CHUNK, RETRY_POLICY, TOKEN_FIX, file_chunks
from gpu_jobs.remote._runner import AgentRunner

__all__ = [
    "CHUNK",
    "RETRY_POLICY",
    "TOKEN_FIX",
    "AgentAuthError",
    "AgentRefused",
    "AgentRunner",
    "file_chunks",
]
