"""The local stack: ``depin up`` (:mod:`pipelines.stack.up`: Prefect server, DIMO emulator, gateway and the
served deployments as supervised process groups), ``depin demo`` (:mod:`pipelines.stack.demo`) and the local
gateway's settings and admin key (:mod:`pipelines.stack.gateway`). No printing here: progress goes to the
callbacks the CLI (:mod:`pipelines.cli.stack`) passes."""
