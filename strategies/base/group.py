"""A node group: the partitions one process hosts, stepped together each round-trip.

The in-process engine is one group of all partitions; a SuperNode that hosts several
partitions steps them as one group per message. With ``node-batching`` (the default) and the
native learner, a group runs its nodes' local SGD as one batched loop over their stacked
parameters and evaluates all their models of the round in one batched pass
(``flwr_hyperprism.math.stacked``); merges and the rest of each round-trip stay per node
(``LearningNode.begin``, ``Pending.finish``). Without batching, or with a learner it cannot
batch (a plug-in train handler), the nodes step one after another (``LearningNode.step``). Both
give the same metrics up to float rounding (tests/strategies/test_group.py); for a given seed
and group layout they are deterministic. Pure torch, no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flwr_hyperprism.math.stacked import stack, stacked_forward
from flwr_hyperprism.setup.data import Split

from .learner import EVAL_BATCH, DataLearner, LocalUpdate, NodeData, to_device
from .node import LearningNode, intra_op_threads, on_cpu
from .rule import NodeState, NodeTask, Outcome, StateDict


class NodeGroup:
    """The node rules of the partitions one process hosts, {partition id: rule}.

    ``batched``: train and evaluate the nodes together when there are several and every rule
    has a native learner (``DataLearner``) whose model is all parameters; else step them one
    by one (each single-threaded; a group of one is a SuperNode's single partition).
    ``threads``: torch's intra-op threads for the batched computation (0: torch's default,
    the process's CPUs or, in a Ray actor, its CPU share).
    """

    def __init__(self, rules: Mapping[int, LearningNode], batched: bool = True,
                 threads: int = 0) -> None:
        self.rules, self.threads = dict(rules), threads
        learners = [rule.learner for rule in self.rules.values()]
        self.batched = batched and len(self.rules) > 1 and all(
            isinstance(learner, DataLearner)
            and set(learner.initial_model) == {n for n, _ in learner.model.named_parameters()}
            for learner in learners)
        self.pool = TrainingPool({pid: rule.learner for pid, rule in self.rules.items()
                                  if isinstance(rule.learner, DataLearner)}) \
            if self.batched else None

    def step(self, states: Mapping[int, NodeState], tasks: Mapping[int, NodeTask],
             routed: Mapping[int, StateDict]) -> dict[int, Outcome]:
        """One round-trip of every partition in ``tasks`` (each must be in the group), from
        its state in ``states``, with ``routed`` holding (at least) every neighbour's shared
        tensors. Outcomes on the CPU, as ``LearningNode.step``'s."""
        if self.pool is None:
            return {pid: self.rules[pid].step(states[pid], task,
                                              {j: routed[j] for j in task.neighbours})
                    for pid, task in tasks.items()}
        device = next(iter(self.rules.values())).learner.device
        needed = {j for task in tasks.values() for j in task.neighbours}
        on_device = {j: to_device(routed[j], device) for j in needed}
        with intra_op_threads(self.threads):
            pending = {pid: self.rules[pid].begin(states[pid].to(device), task,
                                                  {j: on_device[j] for j in task.neighbours},
                                                  self.rules[pid].generator(task))
                       for pid, task in tasks.items()}
            training = {pid: (start, p.gen) for pid, p in pending.items()
                        if (start := p.train_from) is not None}
            trained = self.pool.train(list(training), [s for s, _ in training.values()],
                                      [g for _, g in training.values()]) if training else []
            updates = dict(zip(training, trained))
            outcomes = {pid: p.finish(updates.get(pid)) for pid, p in pending.items()}
            scored = {pid: model for pid, outcome in outcomes.items()
                      if (model := outcome.evaluated) is not None}
            if scored:
                for pid, metrics in zip(scored, self.pool.evaluate(list(scored),
                                                                   list(scored.values()))):
                    outcomes[pid].metrics.update(metrics)
        return {pid: on_cpu(outcome) for pid, outcome in outcomes.items()}


class TrainingPool:
    """The native learners of a group with their training partitions in one tensor.

    Each learner's ``data.train`` becomes a slice of the pool (no second copy), so that one
    index gathers the minibatches of all nodes. ``train`` and ``evaluate`` do what the
    learners' own ``train`` and ``evaluate`` do, for many nodes at once.
    """

    def __init__(self, learners: Mapping[int, DataLearner]) -> None:
        self.learners = dict(learners)
        parts = [learner.data.train for learner in self.learners.values()]
        self.x, self.y = torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])
        self.offset: dict[int, int] = {}
        start = 0
        for pid, learner in self.learners.items():
            size = len(learner.data.train)
            self.offset[pid] = start
            learner.data = NodeData(Split(self.x[start:start + size], self.y[start:start + size]),
                                    learner.data.test)
            start += size

    def train(self, pids: Sequence[int], starts: Sequence[StateDict],
              gens: Sequence[torch.Generator]) -> list[LocalUpdate]:
        """``DataLearner.train`` of each partition in ``pids`` from its model in ``starts``,
        with its generator in ``gens``, as one batched SGD loop: each node takes its own
        ``local_steps`` on its own minibatches and keeps its own momentum buffers.

        The nodes are stacked longest schedule first, so that step t computes the prefix of
        nodes that still take a step: no work on padding."""
        learners = [self.learners[pid] for pid in pids]
        first = learners[0]
        model, config = first.model, first.config
        names = [name for name, _ in model.named_parameters()]
        index, weight, steps = self._minibatches(pids, learners, gens)
        rank = sorted(range(len(pids)), key=lambda i: -steps[i])  # stable: ties keep pid order
        index, weight = index[:, rank], weight[:, rank]
        params = stack([starts[i] for i in rank], names)
        momentum = config.momentum
        buffers = stack([_buffers(learners[i], names, params) for i in rank], names)
        last_gradient = {name: torch.zeros_like(value) for name, value in params.items()}
        loss_sum = torch.zeros(len(pids), dtype=torch.float64, device=index.device)
        for t in range(index.shape[0]):
            k = sum(steps[i] > t for i in rank)  # nodes still stepping: a prefix
            live = {name: value[:k].detach().requires_grad_() for name, value in params.items()}
            rows = index[t, :k]
            flat = rows.flatten()
            x = self.x.index_select(0, flat).view(*rows.shape, *self.x.shape[1:])
            logits = stacked_forward(model, live, x, shared_input=False)
            losses = F.cross_entropy(logits.flatten(0, 1), self.y.index_select(0, flat),
                                     reduction="none").view(rows.shape)
            node_losses = (losses * weight[t, :k]).sum(1)
            gradients = torch.autograd.grad(node_losses.sum(), list(live.values()))
            with torch.no_grad():
                for (name, value), gradient in zip(params.items(), gradients):
                    direction = gradient
                    if momentum != 0:  # a node without a buffer has zeros: 0 * m + g = g
                        direction = buffers[name][:k].mul_(momentum).add_(gradient)
                    value[:k].add_(direction, alpha=-config.lr)
                    last_gradient[name][:k] = gradient
            loss_sum[:k] += node_losses.detach().double()
            if t == 0:  # every node takes a first step
                first_loss = node_losses.detach().double().tolist()
        train_loss = loss_sum.tolist()
        updates: dict[int, LocalUpdate] = {}  # by position in ``pids``
        for position, i in enumerate(rank):
            learner = learners[i]
            if momentum != 0:
                learner.optimizer.buffers = {k: buffers[name][position].clone()
                                             for k, name in enumerate(names)}
            updates[i] = LocalUpdate(
                {**starts[i], **{n: params[n][position].clone() for n in names}},
                {"train_loss": train_loss[position] / steps[i]},
                {n: last_gradient[n][position].clone() for n in learner.names},
                first_loss[position])
        return [updates[i] for i in range(len(pids))]

    def _minibatches(self, pids: Sequence[int], learners: Sequence[DataLearner],
                     gens: Sequence[torch.Generator]) -> tuple[Tensor, Tensor, list[int]]:
        """Pool indices (steps, nodes, batch) of every node's minibatches, drawn as
        ``DataLearner.train`` draws them; weights (1 / batch length, 0 past a short batch or
        a node's last step); each node's number of steps."""
        batch = learners[0].config.batch_size
        schedules = []
        for learner, gen in zip(learners, gens):
            size, order, schedule = len(learner.data.train), torch.empty(0, dtype=torch.int64), []
            for _ in range(learner.local_steps):
                if len(order) == 0:
                    order = torch.randperm(size, generator=gen)
                schedule.append(order[:batch])
                order = order[batch:]
            schedules.append(schedule)
        longest = max(len(schedule) for schedule in schedules)
        index = torch.zeros(longest, len(pids), batch, dtype=torch.int64)
        weight = torch.zeros(longest, len(pids), batch)
        for i, (pid, schedule) in enumerate(zip(pids, schedules)):
            for t, rows in enumerate(schedule):
                index[t, i, :len(rows)] = rows + self.offset[pid]
                weight[t, i, :len(rows)] = 1.0 / len(rows)
        device = learners[0].device
        return index.to(device), weight.to(device), [len(s) for s in schedules]

    @torch.inference_mode()
    def evaluate(self, pids: Sequence[int], models: Sequence[StateDict]
                 ) -> list[dict[str, float]]:
        """``DataLearner.evaluate`` of each partition's model in ``models``, in one pass over
        the evaluation set the group's learners share (each its own when they do not)."""
        learners = [self.learners[pid] for pid in pids]
        test = learners[0].data.test
        if any(learner.data.test is not test for learner in learners):
            return [learner.evaluate(model) for learner, model in zip(learners, models)]
        model, device = learners[0].model, learners[0].device
        params = stack(models, [name for name, _ in model.named_parameters()])
        correct = torch.zeros(len(pids), dtype=torch.int64, device=device)
        loss = torch.zeros(len(pids), dtype=torch.float64, device=device)
        for start in range(0, len(test), EVAL_BATCH):
            x = test.x[start:start + EVAL_BATCH].to(device)
            y = test.y[start:start + EVAL_BATCH].to(device)
            logits = stacked_forward(model, params, x, shared_input=True)
            loss += F.cross_entropy(logits.flatten(0, 1), y.repeat(len(pids)),
                                    reduction="none").view(len(pids), -1).sum(1).double()
            correct += (logits.argmax(2) == y).sum(1)
        return [{"accuracy": c / len(test), "loss": s / len(test)}
                for c, s in zip(correct.tolist(), loss.tolist())]


def _buffers(learner: DataLearner, names: Sequence[str], like: StateDict) -> StateDict:
    """The learner's momentum buffers by parameter name (zeros where it has none)."""
    return {name: learner.optimizer.buffers[k] if k in learner.optimizer.buffers
            else torch.zeros_like(like[name][0]) for k, name in enumerate(names)}
