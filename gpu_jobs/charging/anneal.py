"""Simulated annealing of the penalty BQM (dwave-samplers), locally; seeded, so runs are reproducible.

The best sample (lowest BQM energy) is decoded; it may break a capacity row or miss a target by a slot, which
the feasibility repair then fixes. Any BQM sampler with the same shape (``sample_bqm(bqm) -> SampleSet``)
plugs into ``best_schedule``; Dynex does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dimod
import numpy as np
from dwave.samplers import SimulatedAnnealingSampler

from gpu_jobs.charging.formulate import Decoder, bqm_for, default_penalty
from gpu_jobs.charging.layout import Layout, Schedule


@dataclass(frozen=True)
class AnnealSettings:
    num_reads: int = 4
    num_sweeps: int = 1000
    # Penalty weight as a factor of formulate.default_penalty (2 x the dearest slot): 0.75 keeps the targets
    # binding while lowering the barrier a slot must climb to move; measured better than 0.55 and 1.0.
    penalty_factor: float = 0.75
    # Inverse temperatures, in units of 1 / (dearest slot's cost): hot enough to move slots, cold enough to
    # freeze the cost; the sampler's automatic range starts far hotter and wastes most sweeps.
    beta_range: tuple[float, float] | None = (1.0, 30.0)
    unary_slack: bool = False
    seed: int = 0


@dataclass(frozen=True)
class SampledAnswer:
    schedule: Schedule
    energy: float  # recomputed from the model
    reported_energy: float  # what the sampler said
    num_variables: int
    num_interactions: int


def best_schedule(
    lay: Layout,
    sample: Callable[[dimod.BinaryQuadraticModel], dimod.SampleSet],
    *,
    penalty_factor: float = 0.75,
    unary_slack: bool = False,
    verify: Callable[[dimod.BinaryQuadraticModel, dimod.SampleSet], None] | None = None,
) -> SampledAnswer:
    """Build the BQM, sample it with ``sample``, (``verify`` the answer,) decode the lowest-energy sample."""
    bqm, decode = bqm_for(lay, penalty=penalty_factor * default_penalty(lay), unary_slack=unary_slack)
    sampleset = sample(bqm)
    if verify is not None:
        verify(bqm, sampleset)
    return _decode_best(bqm, decode, sampleset)


def _decode_best(
    bqm: dimod.BinaryQuadraticModel, decode: Decoder, sampleset: dimod.SampleSet
) -> SampledAnswer:
    if len(sampleset) == 0:
        raise ValueError("the sampler returned no samples")
    first = sampleset.first
    energy = float(bqm.energy(first.sample))  # recomputed: never trust a sampler's reported energy
    return SampledAnswer(
        decode(first.sample), energy, float(first.energy), bqm.num_variables, bqm.num_interactions
    )


def solve_anneal(lay: Layout, settings: AnnealSettings | None = None) -> SampledAnswer:
    """Simulated annealing on the penalty BQM with ``settings`` (reads, sweeps, seed)."""
    s = settings or AnnealSettings()
    sampler = SimulatedAnnealingSampler()

    cmax = float(np.abs(lay.var_cost).max()) if lay.n_vars else 1.0
    cmax = cmax if cmax > 0 else 1.0
    beta = None if s.beta_range is None else (s.beta_range[0] / cmax, s.beta_range[1] / cmax)

    def sample(bqm: dimod.BinaryQuadraticModel) -> dimod.SampleSet:
        return sampler.sample(
            bqm, num_reads=s.num_reads, num_sweeps=s.num_sweeps, seed=s.seed, beta_range=beta
        )

    return best_schedule(lay, sample, penalty_factor=s.penalty_factor, unary_slack=s.unary_slack)
