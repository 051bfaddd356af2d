"""Prefect flows, the ``depin`` CLI and deployments: the only package that composes the others."""
