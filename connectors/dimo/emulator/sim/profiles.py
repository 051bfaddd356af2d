"""Where and how fast simulated vehicles drive: route polylines and 1 Hz speed profiles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from connectors.dimo.emulator.sim.catalog import Place
from connectors.dimo.emulator.sim.physics import cumsum0

M_PER_DEG_LAT = 111_320.0
URBAN_KMH = np.array([30.0, 40.0, 50.0, 60.0])
URBAN_KMH_P = np.array([0.2, 0.3, 0.35, 0.15])


@dataclass(frozen=True)
class Route:
    """A polyline in degrees with its cumulative length in metres (flat-earth, fine at city scale)."""

    lat: np.ndarray
    lon: np.ndarray
    cum_m: np.ndarray

    @property
    def length_m(self) -> float:
        return float(self.cum_m[-1])

    @property
    def end(self) -> Place:
        return Place(float(self.lat[-1]), float(self.lon[-1]))

    def at(self, s_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latitude and longitude after ``s_m`` metres along the route (clamped to its ends)."""
        return np.interp(s_m, self.cum_m, self.lat), np.interp(s_m, self.cum_m, self.lon)


def route_from_points(lat: np.ndarray, lon: np.ndarray) -> Route:
    coslat = math.cos(math.radians(float(lat[0])))
    seg = np.hypot(np.diff(lat) * M_PER_DEG_LAT, np.diff(lon) * M_PER_DEG_LAT * coslat)
    return Route(lat, lon, cumsum0(seg))


def make_route(rng: np.random.Generator, a: Place, b: Place) -> Route:
    """A road-like route from ``a`` to ``b``: two waypoints pushed sideways from the straight line."""
    frac = np.array([0.0, rng.uniform(0.2, 0.45), rng.uniform(0.55, 0.8), 1.0])
    side = np.array([0.0, *rng.normal(0.0, 0.12, 2), 0.0])
    dlat, dlon = b.lat - a.lat, b.lon - a.lon
    coslat = math.cos(math.radians(a.lat))
    # perpendicular in metric space, converted back to degrees
    px, py = -dlat * M_PER_DEG_LAT, dlon * M_PER_DEG_LAT * coslat
    lat = a.lat + frac * dlat + side * px / M_PER_DEG_LAT
    lon = a.lon + frac * dlon + side * py / (M_PER_DEG_LAT * coslat)
    return route_from_points(lat, lon)


def wander_route(rng: np.random.Generator, a: Place, length_m: float) -> Route:
    """A route of ``length_m`` from ``a`` whose heading turns at ~800 m intervals (for recorded speed traces)."""
    n = max(1, math.ceil(length_m / 800.0))
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.choice([-math.pi / 2, 0.0, 0.0, math.pi / 2], n))
    step = np.full(n, max(length_m, 1.0) / n)
    coslat = math.cos(math.radians(a.lat))
    lat = a.lat + cumsum0(step * np.cos(heading)) / M_PER_DEG_LAT
    lon = a.lon + cumsum0(step * np.sin(heading)) / (M_PER_DEG_LAT * coslat)
    return route_from_points(lat, lon)


def _smooth_noise(rng: np.random.Generator, n: int, width: int = 25) -> np.ndarray:
    w = np.hanning(width + 2)[1:-1]
    x = np.convolve(rng.normal(size=n + width), w / np.sqrt((w * w).sum()), mode="valid")[:n]
    return np.clip(x, -2.5, 2.5)


def _pad(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Engine-on idle before the first metre and zeros after the last, to a multiple of 10 seconds."""
    lead = np.zeros(int(rng.integers(5, 40)))
    body = np.concatenate((lead, v, np.zeros(2)))
    return np.concatenate((body, np.zeros((-len(body)) % 10)))


def synthetic_profile(
    rng: np.random.Generator,
    length_m: float,
    *,
    aggression: float = 1.0,
    harsh_brake_prob: float = 0.0,
    harsh_accel_prob: float = 0.0,
) -> np.ndarray:
    """A 1 Hz speed trace (km/h) covering ``length_m``: urban legs between stops, a highway middle on long trips.

    Each leg accelerates, cruises and brakes to a stop (red light: 8–60 s, stop sign: 1–3 s). A share of
    stops uses harsh braking (3.8–7 m/s²) and of starts harsh acceleration, per the driver's habits.
    """
    highway = length_m > 12_000.0
    urban_m = length_m if not highway else 2 * rng.uniform(1500.0, 3000.0)
    n_urban = max(1, round(urban_m / rng.uniform(350.0, 700.0)))
    d = rng.dirichlet(np.full(n_urban, 4.0)) * urban_m
    vc = rng.choice(URBAN_KMH, n_urban, p=URBAN_KMH_P) * rng.uniform(0.92, 1.08, n_urban)
    if highway:
        k = n_urban // 2
        d = np.insert(d, k, length_m - urban_m)
        vc = np.insert(vc, k, rng.uniform(95.0, 125.0))
    n = len(d)
    vc = vc / 3.6
    a1 = np.minimum(rng.uniform(1.0, 2.2, n) * aggression, 2.8)
    a1 = np.where(rng.random(n) < harsh_accel_prob, rng.uniform(3.3, 4.3, n), a1)
    a2 = np.minimum(rng.uniform(1.2, 2.5, n) * aggression, 3.0)
    a2 = np.where(rng.random(n) < harsh_brake_prob, rng.uniform(3.8, 7.0, n), a2)
    wait = np.where(rng.random(n) < 0.45, rng.integers(8, 61, n), rng.integers(1, 4, n))
    wait[-1] = 0
    vc = np.minimum(vc, np.sqrt(2.0 * d * a1 * a2 / (a1 + a2)))
    t1, t3 = vc / a1, vc / a2
    t2 = np.maximum(0.0, (d - vc * vc / (2 * a1) - vc * vc / (2 * a2)) / np.maximum(vc, 1e-6))
    n_leg = np.ceil(t1 + t2 + t3).astype(np.int64) + wait
    leg = np.repeat(np.arange(n), n_leg)
    tau = np.arange(int(n_leg.sum()), dtype=float) - cumsum0(n_leg)[:-1][leg]
    T1, T2, VC = t1[leg], (t1 + t2)[leg], vc[leg]
    ramp = np.clip(np.minimum(tau - T1, T2 - tau) / 15.0, 0.0, 1.0)
    sigma = np.where(VC > 25.0, 0.04, 0.05)
    cruise = VC * (1.0 + sigma * ramp * _smooth_noise(rng, len(tau)))
    v = np.where(
        tau < T1, a1[leg] * tau, np.where(tau < T2, cruise, np.maximum(0.0, VC - a2[leg] * (tau - T2)))
    )
    return _pad(np.maximum(v, 0.0) * 3.6, rng)


def split_micro_trips(trace_kmh: np.ndarray, min_m: float = 50.0) -> list[np.ndarray]:
    """Cut a 1 Hz speed trace into stop-to-stop pieces (each starting and ending at 0 km/h)."""
    v = np.concatenate(([0.0], np.nan_to_num(np.asarray(trace_kmh, dtype=float)), [0.0]))
    moving = (v > 0.0).view(np.int8)
    edges = np.diff(moving)
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) + 1
    out = []
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        piece = v[a : b + 1]
        if piece.sum() / 3.6 >= min_m:
            out.append(piece)
    return out


@dataclass(frozen=True)
class SpeedPieces:
    """Recorded stop-to-stop 1 Hz speed pieces (km/h) and the distance each covers (m)."""

    pieces: list[np.ndarray]
    dist_m: np.ndarray

    @classmethod
    def from_traces(cls, traces: list[np.ndarray]) -> SpeedPieces:
        """Every piece of 50 m or more in ``traces`` (see :func:`split_micro_trips`)."""
        pieces = [p for tr in traces for p in split_micro_trips(tr)]
        return cls(pieces, np.array([p.sum() / 3.6 for p in pieces]))


def trace_profile(rng: np.random.Generator, length_m: float, pieces: SpeedPieces) -> np.ndarray:
    """A 1 Hz speed trace of at least ``length_m`` stitched from recorded stop-to-stop pieces."""
    dist = pieces.dist_m
    batch_size = max(4, int(length_m / max(dist.mean(), 1.0)) + 1)
    chosen: list[np.ndarray] = []
    total = 0.0
    while total < length_m:
        batch = rng.integers(0, len(dist), batch_size)
        run = np.cumsum(np.concatenate(([total], dist[batch])))[1:]  # sequential, as a running total
        k = min(int(np.searchsorted(run, length_m)) + 1, len(batch))  # up to the piece that reaches it
        chosen.append(batch[:k])
        total = float(run[k - 1])
    picks = np.concatenate(chosen).tolist()
    waits = rng.integers(1, 40, len(picks))
    parts = [
        np.concatenate((pieces.pieces[i], np.zeros(w))) for i, w in zip(picks, waits.tolist(), strict=True)
    ]
    return _pad(np.concatenate(parts), rng)
