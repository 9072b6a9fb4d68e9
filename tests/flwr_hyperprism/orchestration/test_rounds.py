"""The round loop: one row per round from stage 0, exchanges counted, dropped neighbours
summed over a round's stages, and a resumed loop skipping what its checkpoint covers."""

from __future__ import annotations

from flwr_hyperprism.orchestration.rounds import RoundLoop, round_loop
from flwr_hyperprism.setup.config import RunConfig
from strategies.dpsgd import DPSGD


class TwoStages(DPSGD):
    """D-PSGD's plan with two exchanges per round (as Mudag has several)."""

    def stages(self, round_: int) -> int:
        return 2


def fake_round_trip(calls: list[tuple[int, int]]):
    def round_trip(round_: int, stage: int):
        calls.append((round_, stage))
        return {pid: {"accuracy": 0.5, "neighbours_dropped": float(stage)} for pid in (0, 1)}, {}
    return round_trip


def test_stage_zero_makes_the_row_and_dropped_neighbours_add_up_over_the_stages(tmp_path):
    loop = RoundLoop(TwoStages(RunConfig(num_nodes=3, num_rounds=2)), tmp_path / "run")
    loop.open(None, dict)
    calls: list[tuple[int, int]] = []
    seen = []
    loop.on_round = lambda row, models: seen.append(row["round"])
    rows = loop.run(fake_round_trip(calls))
    assert calls == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert [r["round"] for r in rows] == [0, 1, 2] and seen == [0, 1, 2]
    assert [r["exchanges"] for r in rows] == [0, 2, 4]
    # round 1's row (stage 0 of round-trip 2) counts round-trip 1's stage-1 drop
    assert [r["neighbours_dropped_mean"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["partitions_missing"] == [2] for r in rows)


def test_a_resumed_loop_skips_the_round_trips_its_checkpoint_covers(tmp_path):
    config = RunConfig(num_nodes=2, num_rounds=3, output_dir=str(tmp_path))
    first = round_loop(config, tmp_path / "run")
    first.open(None, dict)
    calls: list[tuple[int, int]] = []

    def interrupted(round_: int, stage: int):
        if round_ == 3:
            raise KeyboardInterrupt
        return fake_round_trip(calls)(round_, stage)

    try:
        first.run(interrupted)
    except KeyboardInterrupt:
        pass
    again = round_loop(config.replace(resume=True), tmp_path / "run")
    assert again.open(None, dict) is True
    calls.clear()
    rows = again.run(fake_round_trip(calls))
    assert calls == [(3, 0), (4, 0)] and [r["round"] for r in rows] == [0, 1, 2, 3]


def test_reconfigure_rebuilds_the_plan_with_the_new_settings():
    loop = round_loop(RunConfig(num_nodes=4, num_rounds=5))
    loop.reconfigure(num_rounds=2)
    assert loop.config.num_rounds == 2 and len(list(loop.plan.schedule())) == 3
