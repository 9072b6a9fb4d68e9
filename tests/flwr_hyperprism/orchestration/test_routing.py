"""The routing table: staleness, and what each node is sent (exactly what its neighbours
replied, never a mix of them)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from flwr_hyperprism.messages.protocol import NEIGHBOUR_PREFIX, OWN_KEY, REPORT_KEY, record_task
from flwr_hyperprism.orchestration.routing import RoutingTable, as_state_dict, train_content
from flwr_hyperprism.setup.config import RunConfig
from strategies.dpsgd import DPSGD


def model(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((3,), value)})


def test_a_partition_is_routed_until_it_has_missed_more_than_max_staleness_rounds():
    routing: RoutingTable[ArrayRecord] = RoutingTable()
    routing.start(model(0.0), 4)
    assert routing.received == dict.fromkeys(range(4), 0)
    for pid in (0, 1, 2):
        routing.store(pid, model(pid), 5)  # partition 3 last replied with the initial model
    assert routing.routable(6, max_staleness=5) == {0, 1, 2, 3}  # round 6 misses 1..5: 5
    assert routing.routable(7, max_staleness=5) == {0, 1, 2}
    assert routing.routable(7, max_staleness=6) == {0, 1, 2, 3}
    assert routing.trained_in(5) == [0, 1, 2]


def test_tasks_leave_stale_partitions_out_and_note_them():
    plan = DPSGD(RunConfig(num_nodes=4, density=1.0, max_staleness=1))
    routing: RoutingTable[ArrayRecord] = RoutingTable()
    routing.start(model(0.0), 4)
    for pid in (0, 1, 2):
        routing.store(pid, model(pid), 2)
    tasks = routing.tasks(plan, 3, 0)  # partition 3's model is from round 0: missed 1 and 2
    assert routing.stale == [3]
    assert all(3 not in task.neighbours for task in tasks.values())
    assert all(abs(task.self_weight + sum(task.weights) - 1) < 1e-12 for task in tasks.values())


def test_a_train_message_carries_the_neighbours_latest_models_as_they_were_received():
    plan = DPSGD(RunConfig(num_nodes=3, density=1.0))
    routing: RoutingTable[ArrayRecord] = RoutingTable()
    routing.start(model(0.0), 3)
    sent = {pid: model(10.0 + pid) for pid in range(3)}
    for pid, record in sent.items():
        routing.store(pid, record, 1)
    task = routing.tasks(plan, 2, 0)[0]
    content = train_content(0, task, routing, {}, send_own=False, report=False)
    assert record_task(content.config_records["hyperprism.task"]) == task
    for j in task.neighbours:
        assert content[f"{NEIGHBOUR_PREFIX}{j}"] is sent[j]  # the very record, untouched
    assert OWN_KEY not in content and REPORT_KEY not in content
    again = train_content(0, task, routing, {}, send_own=True, report=True)
    assert again[OWN_KEY] is sent[0] and REPORT_KEY in again


def test_routed_models_become_state_dicts_in_either_form():
    tensors = {"w": torch.ones(2)}
    assert torch.equal(as_state_dict(ArrayRecord(tensors))["w"], tensors["w"])
    assert as_state_dict(tensors) is tensors
