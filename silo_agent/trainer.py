"""How a silo trains for a task: the interface the agent holds, and plain SGD behind it.

The agent never builds an optimizer or batches itself. For each training task it asks its
:class:`Trainer` first whether it will take the task (:meth:`Trainer.check`, before anything
is downloaded), then hands it a :class:`TrainingRun` (a fresh model holding the global
weights, the data, the device) and uploads the :class:`TrainingOutcome`. A trainer that will
not run a task raises :class:`gptfl.errors.TaskRefused` at either step; the agent declines the
task with that message verbatim and its kind.

:class:`SgdTrainer` is local SGD (FedAvg, or FedProx when the task's ``proximal_mu`` is set).
A trainer that wraps the pieces of :mod:`gptfl.training` (a DP-SGD engine such as Opacus) uses
:func:`own_state_dict` for what it returns, so a wrapper's key prefix never reaches the
coordinator, and :func:`without_inplace_activations` when the engine's hooks need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from gptfl.data.dataset import ArrayDataset
from gptfl.errors import ValidationError
from gptfl.fleet_messages import PrivacySpend
from gptfl.task import TaskSpec
from gptfl.training import train_local
from gptfl.weights import WeightMap

#: what wrappers put in front of the wrapped model's names: Opacus's GradSampleModule
#: (``_module.``), torch.compile (``_orig_mod.``), DataParallel and DDP (``module.``)
WRAPPER_PREFIXES = ("_module.", "_orig_mod.", "module.")


@dataclass(frozen=True)
class TrainingRun:
    """Everything a trainer gets for one training task.

    Attributes:
        task: the task (its ``local`` settings: epochs, batch size, SGD, FedProx, seed).
        model: a model built for this task alone, on ``device``, holding the global weights;
            the trainer may wrap it (nothing else holds it).
        global_weights: the round's global model as downloaded (cpu tensors under the
            model's own names; the FedProx anchors). Not to be modified.
        data: the silo's training examples for this model's input shape.
        device: where to train.
    """

    task: TaskSpec
    model: torch.nn.Module
    global_weights: Mapping[str, torch.Tensor]
    data: ArrayDataset
    device: torch.device


@dataclass(frozen=True)
class TrainingOutcome:
    """What a trainer hands back for upload.

    Attributes:
        weights: the trained state dict under the model's own names (those of
            ``global_weights``), as cpu tensors (see :func:`own_state_dict`).
        num_examples: the training examples, the update's FedAvg weight.
        metrics: training figures (``loss``, ``accuracy``); a DP trainer sends none (they
            are exact functions of the private examples).
        seconds: the training time.
        privacy: the silo's cumulative privacy spend in the job, this update included, for
            a trainer with differential privacy; it travels in the update's header.
    """

    weights: WeightMap
    num_examples: int
    metrics: Mapping[str, float]
    seconds: float
    privacy: PrivacySpend | None = None


class Trainer(Protocol):
    """A silo's way of training; the agent holds one and never knows which."""

    def check(self, task: TaskSpec, *, num_examples: int) -> None:
        """Decides whether to take a training task, before its model is downloaded.

        Args:
            task: the task.
            num_examples: the silo's training examples for the task's model.

        Raises:
            TaskRefused: the trainer will not run it (the reason goes to the coordinator).
        """

    def train(self, run: TrainingRun) -> TrainingOutcome:
        """Trains for a task the trainer has checked.

        Raises:
            TaskRefused: the trainer will not finish it (the reason goes to the coordinator).
        """


class SgdTrainer:
    """Local SGD with the task's settings (:func:`gptfl.training.train_local`); refuses nothing."""

    def check(self, task: TaskSpec, *, num_examples: int) -> None:
        """Takes every task."""

    def train(self, run: TrainingRun) -> TrainingOutcome:
        result = train_local(
            run.model,
            run.data,
            run.task.local,
            device=run.device,
            global_params=run.global_weights,
        )
        weights = own_state_dict(run.model, like=run.global_weights)
        return TrainingOutcome(
            weights=weights,
            num_examples=result.num_examples,
            metrics={"loss": result.loss, "accuracy": result.accuracy},
            seconds=result.seconds,
        )


def own_state_dict(model: torch.nn.Module, *, like: Mapping[str, torch.Tensor]) -> WeightMap:
    """A (possibly wrapped) model's state under the wrapped model's own names, on the cpu.

    A prefix of :data:`WRAPPER_PREFIXES` that every name carries is taken off, as often as
    wrappers were stacked. The result must name exactly the tensors of ``like`` (the global
    model), with their shapes: the coordinator refuses an update that does not.

    Args:
        model: the trained model, or a wrapper of it.
        like: the tensors the update must have (the global weights).

    Returns:
        Detached cpu tensors by name.

    Raises:
        ValidationError: a tensor of ``like`` is missing or has another shape, or the model
            has one ``like`` lacks.
    """
    state = model.state_dict()
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(name.startswith(prefix) for name in state):
                state = {name[len(prefix) :]: tensor for name, tensor in state.items()}
                stripped = True
    for name, reference in like.items():
        tensor = state.get(name)
        if tensor is None:
            raise ValidationError(f"the trained model has no tensor {name!r}")
        if tensor.shape != reference.shape:
            raise ValidationError(
                f"the trained model's {name!r} has shape {tuple(tensor.shape)}, "
                f"the global model's {tuple(reference.shape)}"
            )
    extra = sorted(set(state) - set(like))
    if extra:
        raise ValidationError(
            f"the trained model has a tensor the global model lacks: {extra[0]!r}"
        )
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


def without_inplace_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Turns off ``inplace`` on the model's activations (``nn.ReLU(inplace=True)`` ...).

    Per-sample gradient hooks (Opacus's ``GradSampleModule``) hand each layer's output on
    as a view, and an in-place activation right after such a layer fails the forward pass
    ("Output 0 of BackwardHookFunction is a view and is being modified inplace"), although
    Opacus's ``ModuleValidator`` accepts the model. The zoo's models use in-place ReLUs.
    The outputs, gradients and state dict are unchanged.

    Returns:
        ``model``, changed in place.
    """
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            setattr(module, "inplace", False)  # noqa: B010 (nn.Module types no such attribute)
    return model
