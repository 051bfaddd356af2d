import pytest

from connectors.dimo.emulator.faults import ERROR_KINDS, FaultSpec
from depin_core.errors import ConfigError


def test_fault_spec_parses_kinds_latency_and_all() -> None:
    spec = FaultSpec.parse("429=0.1,latency=0.5:30,retry_after=0,seed=3")
    assert spec.probabilities == {"429": 0.1, "latency": 0.5}
    assert spec.latency_ms == 30 and spec.retry_after == 0 and spec.seed == 3 and spec.enabled
    spread = FaultSpec.parse("all=0.2")
    assert sum(spread.probabilities[k] for k in ERROR_KINDS) == pytest.approx(0.2)
    assert not FaultSpec.parse("").enabled


@pytest.mark.parametrize("text", ["bogus=0.1", "429", "429=x", "429=0.7,503=0.7", "latency=2"])
def test_fault_spec_rejects_bad_input(text: str) -> None:
    with pytest.raises(ConfigError, match="faults"):
        FaultSpec.parse(text)
