"""Plug-in mode's learner: the user's own train handler trains the node's model.

What the rules need besides a trained model is a gradient of the local loss. The user's loss is
unknown to the mod, so it uses the pseudo-gradient g = (start - trained) / lr, with ``lr`` the
run config's learning rate (set it to the step size of the user's optimizer). For one plain SGD
step this is the minibatch gradient at the start; for several steps it is the mean gradient
along the local trajectory times their number, and for momentum or adaptive optimizers their
average update direction. HyperPrism's learned degree (p-mode tracking) tracks g; its
hypernetwork (p-mode hypernetwork) takes its step along <g, merged(p)> after training instead of
on a fresh minibatch; Mudag and ADOM+ hand the point they need a gradient at (Mudag: y; ADOM+:
x_g) to the handler, their step sizes stay 1 / ``smoothness``, Mudag's extra FastMix round-trips
(stages 1..K-1) only mix and do not call the handler, and the evaluate message scores the model
of the round (Mudag: x; ADOM+: x_f).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from flwr_hyperprism.math.models import DECISION, REPRESENTATION
from flwr_hyperprism.setup.config import RunConfig
from strategies.base.learner import LocalUpdate
from strategies.base.rule import NodeState, StateDict

log = logging.getLogger("flwr")


def parameter_groups(names: list[str]) -> dict[str, list[str]]:
    """Layer groups of an unknown model: the last module's tensors are the decision layers.

    ``names`` are the floating-point tensors in state-dict order; the tensors that share the
    last one's module prefix (e.g. ``fc3.weight``, ``fc3.bias``) form the phi group.
    """
    last = names[-1].rpartition(".")[0]
    decision = [n for n in names if n.rpartition(".")[0] == last]
    return {REPRESENTATION: [n for n in names if n not in decision], DECISION: decision}


TrainHandler = Callable[[StateDict], tuple[StateDict, dict[str, float]]]
"""The user's train handler as the mod calls it: a full model in, the trained model and the
handler's scalar metrics out."""


EVALUATED = "evaluated"  # the state group the evaluate message scores: the model after the round


class HandlerLearner:
    """Plug-in mode's ``Learner``: the user's train handler trains, the user's evaluate handler
    scores.

    ``train`` hands the model to the handler and takes the pseudo-gradient (start - trained) /
    ``lr`` as the local gradient; ``gradient`` (Mudag, ADOM+) trains from the point and returns
    that pseudo-gradient; there is no fresh-minibatch ``probe``, so HyperPrism's hypernetwork
    steps on the pseudo-gradient. ``evaluate`` scores nothing: the node rule returns the model
    it evaluated, which the mod keeps and the evaluate message after the round scores with the
    user's handler.

    Parameters
    ----------
    model : the node's current full model (integer buffers too); its floating-point tensors
        outside ``local-layers`` are what the algorithms merge, its last module is the
        decision group (``parameter_groups``)
    handler : the user's train handler
    config : the run config (``lr``: the step size of the user's optimizer, the
        pseudo-gradient's scale; ``local-layers``: the personal layers)
    previous : the node's own model before this round's merge (gossip algorithms): a merged
        tensor that the handler returns closer to it than to the merged value was put back by
        the handler (a personal layer not declared in ``local-layers``), which is logged
    partition_id : for the log
    """

    num_examples = None
    device = torch.device("cpu")  # the user's handler chooses its own device

    def __init__(self, model: StateDict, handler: TrainHandler, config: RunConfig,
                 previous: StateDict | None = None, partition_id: int = 0) -> None:
        self.initial_model, self.handler, self.lr = model, handler, config.lr
        self.names = tuple(k for k, v in model.items()
                           if v.is_floating_point() and not config.is_local(k))
        self.groups = parameter_groups(list(self.names))
        self.previous, self.partition_id = previous, partition_id

    def load(self, state: NodeState) -> None:
        """Nothing to load: the handler keeps its own optimizer."""

    def save(self) -> dict[str, StateDict]:
        return {}

    def evaluate(self, model: StateDict) -> dict[str, float]:
        return {}

    def train(self, model: StateDict, gen: torch.Generator) -> LocalUpdate:
        trained, metrics = self.handler(model)
        if trained.keys() != model.keys():
            raise ValueError(f"the train handler returned arrays {sorted(trained)}; the model "
                             f"it was given has {sorted(model)}: return the whole model")
        self.check_restored(model, trained)
        pseudo = {n: (model[n] - trained[n]) / self.lr for n in self.names}
        return LocalUpdate(dict(trained), metrics, pseudo)

    def check_restored(self, given: StateDict, trained: StateDict) -> None:
        """Warn about merged tensors the handler replaced by the node's own previous ones."""
        if self.previous is None:
            return
        restored = [n for n in self.names if not torch.equal(given[n], self.previous[n])
                    and float(torch.dist(trained[n], self.previous[n]))
                    < 0.5 * float(torch.dist(trained[n], given[n]))]
        if restored:
            log.warning("partition %s: the train handler returned %s closer to the node's own "
                        "previous values than to the merged model it was given: it seems to "
                        "put personal layers back; declare them local_layers=%r so that they "
                        "stay out of the merge and the pseudo-gradient", self.partition_id,
                        restored, ",".join(sorted({n.rpartition(".")[0] + ".*"
                                                   for n in restored})))

    def gradient(self, params: StateDict, gen: torch.Generator
                 ) -> tuple[dict[str, float], StateDict]:
        update = self.train({**self.initial_model, **params}, gen)
        return update.metrics, {n: update.gradient[n] for n in params}

    def probe(self, model: StateDict, gen: torch.Generator) -> None:
        return None

    def training_fault(self, update: LocalUpdate) -> None:
        """None: the handler's loss (if it reports one) has no known scale to judge it by."""
        return None
