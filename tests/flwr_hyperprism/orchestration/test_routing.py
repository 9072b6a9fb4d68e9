"""The routing table: staleness, and what each node is sent (exactly what its neighbours
replied, never a mix of them; one message for all the partitions a node hosts)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord

from flwr_hyperprism.messages.protocol import (
    NEIGHBOUR_PREFIX,
    OWN_KEY,
    REPORT_KEY,
    RUN_KEY,
    SESSION_KEY,
    TASK_KEY,
    message_tasks,
    partition_key,
    record_task,
)
from flwr_hyperprism.orchestration.routing import (
    RoutingTable,
    as_state_dict,
    train_content,
    train_contents,
)
from flwr_hyperprism.setup.config import RunConfig
from strategies.base.rule import NodeTask
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
    assert task.neighbours == (1, 2)
    content = train_content({0: task}, routing, {}, send_own=(), report=False)
    assert record_task(content.config_records[partition_key(TASK_KEY, 0)]) == task
    assert message_tasks(content) == {0: task}
    for j in task.neighbours:
        assert content[f"{NEIGHBOUR_PREFIX}{j}"] is sent[j]  # the very record, untouched
    assert set(content) == {"hyperprism.task.0", "nbr.1", "nbr.2"}  # no own model, no report
    again = train_content({0: task}, routing, {}, send_own=[0], report=True)
    assert again[partition_key(OWN_KEY, 0)] is sent[0] and REPORT_KEY in again
    assert OWN_KEY not in again  # only the per-partition key


def test_a_node_hosting_two_partitions_gets_one_message_with_both_tasks_and_each_model_once():
    routing: RoutingTable[ArrayRecord] = RoutingTable()
    routing.start(model(0.0), 5)
    sent = {pid: model(10.0 + pid) for pid in range(5)}
    for pid, record in sent.items():
        routing.store(pid, record, 1)
    # partitions 0 and 1 on node 100 both need 2's model; 3 and 4 each have a node of their own
    tasks = {0: NodeTask(2, (1, 2), (0.25, 0.25), 0.5), 1: NodeTask(2, (0, 2), (0.3, 0.3), 0.4),
             3: NodeTask(2, (4,), (0.5,), 0.5), 4: NodeTask(2, (2, 3), (0.2, 0.2), 0.6)}
    node_of = {0: 100, 1: 100, 2: 200, 3: 300, 4: 400}  # partition 2 gets no task this round
    session = {SESSION_KEY: ConfigRecord({"run-key": "k"}), "config": ConfigRecord({"lr": 0.1})}
    run = ConfigRecord({"num-nodes": 5})
    contents = train_contents(tasks, node_of, routing, session, run, in_sync={0, 3, 4},
                              hold_config={0, 1, 3, 4}, report=True)
    assert sorted(contents) == [100, 300, 400]  # one message per node with a task
    both = contents[100]
    assert message_tasks(both) == {0: tasks[0], 1: tasks[1]}
    # each neighbour model any of its tasks needs, once, as it was received; partition 1 (not
    # in sync) gets its own model, partition 0 does not; the shared records once
    assert set(both) == {"hyperprism.task.0", "hyperprism.task.1", "nbr.0", "nbr.1", "nbr.2",
                         "hyperprism.own.1", SESSION_KEY, "config", REPORT_KEY}
    for j in (0, 1, 2):
        assert both[f"{NEIGHBOUR_PREFIX}{j}"] is sent[j]
    assert both[partition_key(OWN_KEY, 1)] is sent[1]
    assert both[SESSION_KEY] is session[SESSION_KEY] and both["config"] is session["config"]
    assert message_tasks(contents[300]) == {3: tasks[3]}
    assert set(contents[300]) == {"hyperprism.task.3", "nbr.4", SESSION_KEY, "config",
                                  REPORT_KEY}
    assert set(contents[400]) == {"hyperprism.task.4", "nbr.2", "nbr.3", SESSION_KEY, "config",
                                  REPORT_KEY}


def test_a_node_gets_the_run_config_when_any_of_its_partitions_may_lack_it():
    routing: RoutingTable[ArrayRecord] = RoutingTable()
    routing.start(model(0.0), 4)
    tasks = {pid: NodeTask(1) for pid in range(4)}
    node_of = {0: 100, 1: 100, 2: 200, 3: 200}
    run = ConfigRecord({"num-nodes": 4})
    contents = train_contents(tasks, node_of, routing, {}, run, in_sync=set(range(4)),
                              hold_config={0, 1, 2}, report=False)
    assert RUN_KEY not in contents[100]
    assert contents[200][RUN_KEY] is run  # partition 3 may not hold it: its node gets it once
    assert all(REPORT_KEY not in c and not any(k.startswith(OWN_KEY) for k in c)
               for c in contents.values())


def test_routed_models_become_state_dicts_in_either_form():
    tensors = {"w": torch.ones(2)}
    assert torch.equal(as_state_dict(ArrayRecord(tensors))["w"], tensors["w"])
    assert as_state_dict(tensors) is tensors
