"""The seeded fleet simulator: ``simulator.simulate_fleet`` builds a :class:`~connectors.dimo.emulator.fleet.Fleet`.

``catalog`` says what the vehicles are (models, cities, hidden parameters), ``profiles`` where and how fast they
drive, ``physics`` the vectorised energy and thermal model, and ``render`` turns one vehicle's activities into its
series frame.
"""
