"""The emulator's Telemetry API (``/telemetry/query``): ``routes`` for the app.

``api`` handles the request, ``schema`` builds the GraphQL schema from the signal catalog, ``signals`` runs the
``signals`` root field columnar, ``resolvers`` the other root fields, and ``data`` holds the per-vehicle facts
they share.
"""

from connectors.dimo.emulator.telemetry.api import routes

__all__ = ["routes"]
