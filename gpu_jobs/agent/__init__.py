"""The worker agent: an HTTP service on a GPU node that stores content-addressed blobs and runs ``JobSpec``s
with ``LocalRunner`` (the same worker code as local runs). See ``gpu_jobs.agent.app`` for the API,
``gpu_jobs.agent.server`` to run it, ``gpu_jobs.agent.process.AgentProcess`` to run it as a child process;
:func:`read_admin_token` reads the agent's admin token (``$DEPIN_AGENT_TOKEN`` or a token file)."""

from gpu_jobs.agent._auth import TOKEN_ENV, read_admin_token

__all__ = ["TOKEN_ENV", "read_admin_token"]
