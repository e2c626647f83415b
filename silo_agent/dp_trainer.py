"""DP-SGD at the silo: Opacus on the trainer's pieces, under a budget the silo enforces.

:class:`DpSgdTrainer` is the :class:`~silo_agent.trainer.Trainer` of a silo whose config has a
``privacy`` section (docs/privacy.md). For every training task it

1. checks, before anything is downloaded, that Opacus can train the task's model, that the
   task's batch size leaves a sampling rate of at most 1, and that the round fits both the
   job's budget (``target_epsilon``) and the lifetime budget (``lifetime_epsilon``) given
   what the ledger says was spent; otherwise it refuses the task
   (:class:`~gptfl.errors.TaskRefused`, kind ``privacy_budget``) and trains nothing;
2. trains with ``PrivacyEngine.make_private`` on the pieces of :mod:`gptfl.training` (per-
   sample clipping, Poisson sampling, Gaussian noise; the FedProx term is kept), with a fresh
   engine per task: the spend is the ledger's, never an engine's;
3. writes the round's accountant history to the ledger before the update leaves, and reports
   the job's cumulative (epsilon, delta) with the update. The training loss and accuracy
   are not reported (they are computed from the private examples without noise).

The noise of a job is fixed at its first round: ``noise_multiplier`` when the config gives
one, else the noise that keeps every step the job could take (``rounds`` x local epochs x
steps per epoch at the task's sampling rate) within ``target_epsilon``
(:func:`~silo_agent.dp_budget.calibrate`), so the target holds at the end of the job.

Batches and noise are drawn from the silo's own entropy, never from the task's seed (which
the coordinator chose): the sampling must be secret for its privacy amplification to hold.
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from gptfl.errors import ConfigError, TaskRefused
from gptfl.fleet_messages import PrivacySpend
from gptfl.models import ModelSpec, build_model
from gptfl.task import TaskSpec
from gptfl.training import ProximalTerm, make_loader, make_optimizer, run_epochs
from silo_agent.config import PrivacyConfig
from silo_agent.dp_budget import Mechanism, StepPlan, calibrate, epsilon, step_plan
from silo_agent.privacy_ledger import PrivacyLedger
from silo_agent.trainer import (
    TrainingOutcome,
    TrainingRun,
    own_state_dict,
    without_inplace_activations,
)

log = logging.getLogger(__name__)


def check_privacy_config(privacy: PrivacyConfig, *, num_examples: int) -> None:
    """What the ``privacy`` section promises and this silo cannot keep, found at start.

    Args:
        privacy: the section.
        num_examples: the silo's training examples (n).

    Raises:
        ConfigError: one line naming the key: a ``target_delta`` of at least 1/n, a
            ``noise_multiplier`` under which even one local epoch (at batch size 1) spends
            more than ``target_epsilon``, or ``secure_rng`` without ``torchcsprng``.
    """
    if num_examples < 1:
        raise ConfigError("privacy: the silo has no training examples to protect")
    if privacy.target_delta >= 1 / num_examples:
        raise ConfigError(
            f"privacy.target_delta: {privacy.target_delta:g} is not below 1/n = "
            f"{1 / num_examples:.3g} for this silo's n = {num_examples} training examples "
            "(a delta that large allows leaking an example outright)"
        )
    if privacy.noise_multiplier is not None:
        one_epoch = Mechanism(privacy.noise_multiplier, 1 / num_examples, num_examples)
        spent = epsilon([one_epoch], delta=privacy.target_delta, accountant=privacy.accountant)
        if spent > privacy.target_epsilon:
            raise ConfigError(
                f"privacy.noise_multiplier: {privacy.noise_multiplier:g} contradicts "
                f"target_epsilon {privacy.target_epsilon:g}: even one local epoch at batch "
                f"size 1 spends epsilon {spent:.3g}"
            )
    if privacy.secure_rng and importlib.util.find_spec("torchcsprng") is None:
        raise ConfigError(
            "privacy.secure_rng: Opacus's secure mode needs the torchcsprng package, which is "
            "not installed"
        )


class DpSgdTrainer:
    """DP-SGD through Opacus under the silo's privacy budget (see the module docstring)."""

    def __init__(self, privacy: PrivacyConfig, ledger: PrivacyLedger) -> None:
        """Use :meth:`start` (which checks the config and opens the ledger).

        Args:
            privacy: the silo's ``privacy`` section.
            ledger: the silo's ledger.
        """
        self.privacy = privacy
        self.ledger = ledger
        self._models_checked: set[ModelSpec] = set()
        #: calibrated noise by (job, sampling rate, planned steps): computed once per job
        self._calibrated: dict[tuple[str, float, int], float] = {}

    @classmethod
    def start(cls, privacy: PrivacyConfig, *, state_dir: Path, num_examples: int) -> DpSgdTrainer:
        """Checks ``privacy`` against the silo's data and opens the ledger in ``state_dir``.

        Raises:
            ConfigError: a key the silo cannot keep (:func:`check_privacy_config`), or a
                damaged ledger (:class:`~silo_agent.privacy_ledger.LedgerDamagedError`).
        """
        check_privacy_config(privacy, num_examples=num_examples)
        ledger = PrivacyLedger.open(state_dir)
        trainer = cls(privacy, ledger)
        lifetime = trainer.lifetime_epsilon()
        log.info(
            "DP-SGD on: target (%g, %g) per job, %s accountant, %d training examples; "
            "ledger %s: %d job(s), lifetime epsilon %.4g%s",
            privacy.target_epsilon,
            privacy.target_delta,
            privacy.accountant,
            num_examples,
            ledger.path,
            sum(1 for _ in ledger.jobs()),
            lifetime,
            f" of {privacy.lifetime_epsilon:g}" if privacy.lifetime_epsilon is not None else "",
        )
        if not privacy.secure_rng:
            log.warning(
                "privacy.secure_rng is off: DP noise and sampling come from torch's generator "
                "seeded from os.urandom, not from a cryptographically secure generator"
            )
        return trainer

    def job_epsilon(self, job_id: str) -> float:
        """The epsilon this silo has spent in ``job_id`` (at ``target_delta``)."""
        return self._epsilon(self.ledger.job_history(job_id))

    def lifetime_epsilon(self) -> float:
        """The epsilon of every job in the ledger together (at ``target_delta``)."""
        return self._epsilon(self.ledger.lifetime_history())

    def _epsilon(self, history: tuple[Mechanism, ...]) -> float:
        return epsilon(history, delta=self.privacy.target_delta, accountant=self.privacy.accountant)

    # ---- the Trainer protocol ---------------------------------------------------------

    def check(self, task: TaskSpec, *, num_examples: int) -> None:
        """Refuses a task this silo cannot train privately or within its budgets.

        Raises:
            TaskRefused: the model cannot be made private, the sampling rate would exceed 1,
                or the round would exceed the job's or the lifetime budget.
        """
        self._check_model(task.model_spec)
        self._admit(task, num_examples)

    def train(self, run: TrainingRun) -> TrainingOutcome:
        """Trains the task with DP-SGD, records the spend, and returns the update.

        Raises:
            TaskRefused: as :meth:`check` (checked again, against the data handed over).
        """
        task = run.task
        plan, noise = self._admit(task, len(run.data))
        started = time.perf_counter()
        model = without_inplace_activations(run.model)
        proximal = ProximalTerm.toward(
            model, task.local.proximal_mu, device=run.device, global_params=run.global_weights
        )
        noise_source = None
        if not self.privacy.secure_rng:
            noise_source = torch.Generator(device=run.device)
            noise_source.manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():
            # Opacus warns of the secure RNG at every engine (said once at start) and of
            # full backward hooks on inputs that need no gradient.
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(
                accountant=self.privacy.accountant, secure_mode=self.privacy.secure_rng
            )
            private_model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=make_optimizer(model, task.local),
                data_loader=make_loader(
                    run.data, batch_size=task.local.batch_size, seed=secrets.randbits(63)
                ),
                noise_multiplier=noise,
                max_grad_norm=self.privacy.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=self.privacy.grad_sample_mode,
                noise_generator=noise_source,
            )
            if loader.sample_rate != plan.sample_rate or len(loader) != plan.steps_per_epoch:
                raise RuntimeError(
                    f"Opacus samples at rate {loader.sample_rate} for {len(loader)} steps per "
                    f"epoch; the plan was {plan.sample_rate} for {plan.steps_per_epoch}"
                )
            stats = run_epochs(
                private_model,
                optimizer,
                loader,
                epochs=task.local.epochs,
                device=run.device,
                proximal=proximal,
            )
        spent = [Mechanism(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
        job = self.ledger.record(
            task.job_id, round_=task.round, noise_multiplier=noise, spent=spent
        )
        spend = PrivacySpend(
            epsilon=self._epsilon(job.history),
            delta=self.privacy.target_delta,
            accountant=self.privacy.accountant,
        )
        weights = own_state_dict(private_model, like=run.global_weights)
        seconds = time.perf_counter() - started
        log.info(
            "round %d of job %s: DP-SGD, noise %.4g, sampling rate %.4g, %d steps; epsilon "
            "%.4g of %g in the job, %.4g over all jobs",
            task.round,
            task.job_id,
            noise,
            plan.sample_rate,
            sum(entry.steps for entry in spent),
            spend.epsilon,
            self.privacy.target_epsilon,
            self.lifetime_epsilon(),
        )
        log.debug(
            "round %d: last epoch's training loss %.4f, accuracy %.3f (kept in this log: "
            "figures of the private examples without noise are not sent)",
            task.round,
            stats.loss,
            stats.accuracy,
        )
        return TrainingOutcome(
            weights=weights,
            num_examples=len(run.data),
            # The loss and accuracy of the training batches are exact functions of the
            # private examples: sent, they would leak beyond the DP guarantee.
            metrics={},
            seconds=seconds,
            privacy=spend,
        )

    # ---- what a task may spend ----------------------------------------------------------

    def _check_model(self, spec: ModelSpec) -> None:
        if spec in self._models_checked:
            return
        model = without_inplace_activations(build_model(spec))
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise TaskRefused(
                f"the job's model {spec.arch} cannot be trained with DP-SGD here "
                f"(Opacus: {errors[0]})",
                kind="refused",
            )
        self._models_checked.add(spec)

    def _admit(self, task: TaskSpec, num_examples: int) -> tuple[StepPlan, float]:
        """The task's plan and noise, once the round is known to fit both budgets."""
        privacy = self.privacy
        if privacy.target_delta >= 1 / max(num_examples, 1):
            raise TaskRefused(
                f"this silo's target_delta {privacy.target_delta:g} is not below 1/n for the "
                f"task's {num_examples} training examples",
                kind="refused",
            )
        plan = step_plan(num_examples, task.local)
        noise = self._noise(task, plan)
        job = self.ledger.job(task.job_id)
        history = self.ledger.job_history(task.job_id)
        after = self._epsilon((*history, plan.at(noise)))
        if after > privacy.target_epsilon:
            raise TaskRefused(
                f"privacy budget: round {task.round} would bring this silo's epsilon in job "
                f"{task.job_id} to {after:.4g} (delta {privacy.target_delta:g}), above its "
                f"target_epsilon {privacy.target_epsilon:g}; spent so far "
                f"{self._epsilon(history):.4g} in {len(job.rounds) if job else 0} round(s)",
                kind="privacy_budget",
            )
        if privacy.lifetime_epsilon is not None:
            lifetime = self._epsilon((*self.ledger.lifetime_history(), plan.at(noise)))
            if lifetime > privacy.lifetime_epsilon:
                raise TaskRefused(
                    f"privacy budget: round {task.round} of job {task.job_id} would bring "
                    f"this silo's lifetime epsilon over all jobs on its data to "
                    f"{lifetime:.4g}, above its lifetime_epsilon {privacy.lifetime_epsilon:g}",
                    kind="privacy_budget",
                )
        return plan, noise

    def _noise(self, task: TaskSpec, plan: StepPlan) -> float:
        """The job's noise multiplier: kept from its first round, else configured, else
        calibrated for every step the job could take."""
        job = self.ledger.job(task.job_id)
        if job is not None:
            return job.noise_multiplier
        if self.privacy.noise_multiplier is not None:
            self._warn_if_short(task, plan, self.privacy.noise_multiplier)
            return self.privacy.noise_multiplier
        if task.rounds < 1:
            raise TaskRefused(
                "the coordinator does not say how many rounds the job has (an older "
                "coordinator?); this silo calibrates its DP noise for the whole job and "
                "cannot without it (or set privacy.noise_multiplier)",
                kind="refused",
            )
        steps = task.rounds * plan.steps
        key = (task.job_id, plan.sample_rate, steps)
        if key not in self._calibrated:
            self._calibrated[key] = calibrate(
                target_epsilon=self.privacy.target_epsilon,
                delta=self.privacy.target_delta,
                sample_rate=plan.sample_rate,
                steps=steps,
                accountant=self.privacy.accountant,
            )
            log.info(
                "job %s: noise multiplier %.4g keeps %d rounds x %d steps at sampling rate "
                "%.4g within epsilon %g",
                task.job_id,
                self._calibrated[key],
                task.rounds,
                plan.steps,
                plan.sample_rate,
                self.privacy.target_epsilon,
            )
        return self._calibrated[key]

    def _warn_if_short(self, task: TaskSpec, plan: StepPlan, noise: float) -> None:
        """Says once per job when a configured noise cannot last the whole job."""
        key = (task.job_id, plan.sample_rate, task.rounds * plan.steps)
        if task.rounds < 1 or key in self._calibrated:
            return
        self._calibrated[key] = noise
        planned = self._epsilon((Mechanism(noise, plan.sample_rate, key[2]),))
        if planned > self.privacy.target_epsilon:
            log.warning(
                "job %s: at noise_multiplier %g its %d rounds would spend epsilon %.4g, above "
                "target_epsilon %g: this silo will refuse its rounds once the budget is spent",
                task.job_id,
                noise,
                task.rounds,
                planned,
                self.privacy.target_epsilon,
            )
