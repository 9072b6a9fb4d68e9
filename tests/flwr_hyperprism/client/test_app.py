"""The native ClientApp's own state: the run config it keeps, the node state it saves."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from flwr_hyperprism.client.app import app as client_app
from flwr_hyperprism.client.app import load_state, run_config, save_state
from flwr_hyperprism.messages.protocol import RUN_KEY, run_record
from flwr_hyperprism.setup.config import RunConfig
from strategies import NodeState
from tests.harness import LocalGrid


def test_a_node_keeps_the_run_config_it_was_sent_and_says_when_it_has_none():
    grid = LocalGrid(client_app, {7: (3, 4), 8: (3, 4)})  # two nodes' contexts
    context, fresh = grid.contexts[7], grid.contexts[8]
    config = RunConfig(num_nodes=4, lr=0.05)
    first = Message(RecordDict({RUN_KEY: run_record(config)}), dst_node_id=7,
                    message_type="train.dpsgd")
    assert run_config(first, context) == config
    later = Message(RecordDict(), dst_node_id=7, message_type="train.dpsgd")
    assert run_config(later, context) == config
    with pytest.raises(ValueError, match="partition 3 got a train message without the run"):
        run_config(later, fresh)


def test_a_saved_node_state_drops_the_groups_the_new_state_no_longer_has():
    # e.g. HyperPrism's "diverged" group: kept, every later merge would stay linear
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={})
    save_state(context, NodeState(3, {"shared": {"w": torch.ones(2)},
                                      "diverged": {"flag": torch.ones(())}}))
    save_state(context, NodeState(4, {"shared": {"w": torch.zeros(2)}}))
    state = load_state(context)
    assert state is not None and state.round == 4 and list(state.tensors) == ["shared"]
