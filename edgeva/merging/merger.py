"""Incremental merging (Gemel's heuristic) with label-free retraining by distillation.

Each trial shares one candidate's layers (starting from the members' mean, or the anchor's
weights), checks every affected query's agreement with its original on held-out frames at the
model's configured input size, retrains only what the trial changed -- the blocks from the
first shared layer on, fed with cached activations of the untouched blocks before it -- jointly
for all affected models (distilling from the originals' cached outputs, loss weighted toward
lagging queries) until all targets hold, the step budget ends or agreement stops improving,
then accepts the trial or undoes it and backs off. With `residuals="int8"` a last pass holds
each layer still apart as a shared base plus an int8 residual per model (`residual`), checked
the same way and never retrained. What agreement is and how it is judged lives in `agreement`;
the order of trials and the back-off in `planner`.

One module of ~460 lines: the sharing trials, their retraining and the residual pass act on
one merge state, one set of runners and one checkpoint, and splitting them would pass that
state between files.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..models.base import ZooModel
from .agreement import AgreementCheck
from .analysis import Analysis, SharingGroup, analyse_modules
from .blocks import ActivationCache
from .bundle import ModelMeta, install_state, read_bundle, save_bundle
from .distill import adapter_for
from .memory import MemoryMeasurement, cuda_loaded_bytes, resident_weight_bytes
from . import residual
from .planner import (Candidate, ResidualLayer, after_acceptance, back_off, plan_candidates, plan_residuals,
                      residual_back_off)
from .probe import CANDIDATES_PER_FRAME, PROBE, select_for
from .retrain_budget import RetrainBudget
from .runner import ModelRunner
from .sharing import Snapshot, layer_of, share_group, sharing_closure
from .workload import Workload, file_digest

CHECKPOINT_BUNDLE = "checkpoint.pt"
PROGRESS_FILE = "progress.json"
Progress = Callable[[str], None]


@dataclass
class MergeSettings:
    train_steps: int = 60            # most optimiser steps per trial
    eval_every: int = 10             # steps between agreement checks (training stops once all targets hold)
    batch_size: int = 16
    lr: float = 3e-4
    lag_floor: float = 0.05          # epsilon in the loss weight max(0, target - agreement) + epsilon
    max_layers_per_step: int = 8
    init: str = "mean"               # shared tensor starts at: mean (of the members) | anchor (Gemel)
    patience: int = 2                # checks without a better worst gap before a trial gives up
    distil_on: str = "own"           # frames a model is distilled on: own (its queries' cameras) | all cameras
    check_on: str = "own"            # held-out frames a query's agreement is checked on: own camera | all cameras
    accept_on: str = "mean"          # a target holds when the mean agreement | its Wilson 95 % lower bound reaches it
    cache_bytes: int = 2 * 2**30     # cached activations entering blocks (LRU beyond this)
    time_budget_s: Optional[float] = None
    max_trials: Optional[int] = None
    seed: int = 0
    residuals: str = "none"          # layers still apart after full sharing: none | int8 (base + int8 residual)
    residual_reserve_checks: float = 3.0   # full-sharing trials stop this many checks of every model early


@dataclass
class Attempt:
    index: int
    origin: str
    layer: str
    models: list[str]
    group_ids: list[str]
    bytes_saved: int
    agreement_shared: dict[str, float]      # right after sharing, before retraining
    agreement_final: dict[str, float]
    train_steps: int
    seconds: float
    outcome: str                            # accepted | backed off: ... | skipped | aborted (time budget)
    failing_queries: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)          # module paths shared (in the first model)
    lower_bound_final: dict[str, float] = field(default_factory=dict)   # Wilson 95 % lower bound
    trained_from: dict[str, str] = field(default_factory=dict)          # model -> first retrained block
    trained_bytes: int = 0                  # distinct parameter bytes the retraining changed
    retrain_seconds: float = 0.0
    note: str = ""                          # e.g. why a failing trial was not retrained


@dataclass
class MergeState:
    accepted: list[SharingGroup]
    queue: deque
    attempts: list[Attempt]
    agreement: dict[str, float]
    elapsed_s: float = 0.0
    residuals: list[ResidualLayer] = field(default_factory=list)

    @property
    def bytes_saved(self) -> int:
        """What the accepted steps save by their analysis (full sharing and residual layers)."""
        return sum(g.bytes_saved for g in self.accepted) + sum(r.bytes_saved for r in self.residuals)


class IncrementalMerger:
    def __init__(self, workload: Workload, settings: MergeSettings, out_dir: Optional[Path] = None,
                 progress: Optional[Progress] = None) -> None:
        self.workload = workload
        self.settings = settings
        self.out_dir = out_dir
        self.progress = progress or (lambda _msg: None)
        self.stopped_reason = "not run"
        self.modules = workload.modules
        self.device = next(iter(workload.models.values())).device
        self.original_bytes = resident_weight_bytes(self.modules.values())
        self.analysis: Analysis = analyse_modules(self.modules, workload.architectures)
        self.cache = ActivationCache(settings.cache_bytes)
        plan = plan_candidates(self.analysis.groups, settings.max_layers_per_step)
        self.runners: dict[str, ModelRunner] = {}
        for key, model in workload.models.items():
            cameras = list(dict.fromkeys(q.camera for q in workload.queries_of(key)))
            # "all": the merged model must agree with its original on any camera's frames, not
            # only its own (a model meets other scenes when cameras are re-pointed or moved)
            distil = workload.cameras_for(cameras, settings.distil_on == "all")
            checked = workload.cameras_for(cameras, settings.check_on == "all")
            heldout = {c: self.frames_for(model, c, "heldout") for c in checked}
            train = [f for c in distil for f in self.frames_for(model, c, "train")]
            runner = ModelRunner(key, model, adapter_for(model), heldout, train, self.cache)
            # the activations the planned steps start from are kept while the originals run
            runner.stash_at({runner.start_of([m.path for g in c.groups for m in g.members if m.model == key])
                             for c in plan if key in c.models})
            if settings.train_steps > 0:      # distillation targets: only a merge that retrains needs them
                runner.prepare()
            self.runners[key] = runner
        self.check = AgreementCheck(workload, self.runners, settings.check_on, settings.accept_on)
        self.teachers = {k: r.teacher for k, r in self.runners.items() if r.teacher is not None}

    def frames_for(self, model: ZooModel, camera: str, part: str) -> list[np.ndarray]:
        """A camera's training or held-out frames; of the probe's candidates, the model's own choice
        (made now, while every model is still its original): a classifier is distilled on the
        region it is checked on."""
        frames = getattr(self.workload.frames[camera], part)
        if camera != PROBE:
            return frames
        return select_for(model, frames, len(frames) // CANDIDATES_PER_FRAME)

    # ------------------------------------------------------------------ run
    def initial_state(self) -> MergeState:
        plan = plan_candidates(self.analysis.groups, self.settings.max_layers_per_step)
        return MergeState([], deque(plan), [], {q: 1.0 for q in self.check.targets})

    def run(self, state: Optional[MergeState] = None) -> MergeState:
        state = state or self.initial_state()
        started = time.monotonic() - state.elapsed_s
        deadline = None if self.settings.time_budget_s is None else started + self.settings.time_budget_s
        self.stopped_reason = "plan exhausted"
        with_residuals = self.settings.residuals != "none"
        sharing_deadline = deadline
        if deadline is not None and with_residuals:   # the residual pass gets the end of the budget
            sharing_deadline = deadline - self.settings.residual_reserve_checks * self.check.reference_seconds
        trials = 0
        while state.queue and not state.residuals:    # residual layers come last: a resumed run goes on with them
            if sharing_deadline is not None and time.monotonic() >= sharing_deadline:
                self.stopped_reason = "time budget reached"
                break
            if self.settings.max_trials is not None and trials >= self.settings.max_trials:
                self.stopped_reason = "trial limit reached"
                break
            candidate = state.queue.popleft()
            trials += 1
            attempt = self._try(candidate, state, len(state.attempts), deadline)
            state.attempts.append(attempt)
            if attempt.outcome == "accepted":
                state.accepted.extend(candidate.groups)
                state.agreement.update(attempt.agreement_final)
                state.queue.extendleft(reversed(after_acceptance(candidate)))
            elif attempt.outcome.startswith("aborted"):
                state.queue.appendleft(candidate)
                self.stopped_reason = "time budget reached"
            else:
                failing_models = {self.check.query(q).model_key for q in attempt.failing_queries}
                follow_ups = back_off(candidate, failing_models)
                attempt.outcome = ("backed off: " + ", ".join(c.origin for c in follow_ups)) if follow_ups else "skipped"
                state.queue.extendleft(reversed(follow_ups))
            state.elapsed_s = time.monotonic() - started
            self.progress(self._progress_line(attempt, state))
            self._checkpoint(state, bundle=attempt.outcome == "accepted")
            if self.stopped_reason == "time budget reached":
                break
        if with_residuals and (self.settings.max_trials is None or trials < self.settings.max_trials):
            self._residual_pass(state, started, deadline)
        state.elapsed_s = time.monotonic() - started
        return state

    # ------------------------------------------------------ residual pass
    def _residual_pass(self, state: MergeState, started: float, deadline: Optional[float]) -> None:
        if self.settings.residuals != "int8":
            raise ValueError(f"unknown residual format {self.settings.residuals!r} (none | int8)")
        plan = plan_residuals(self.analysis.groups, state.accepted, done={r.layer_id for r in state.residuals})
        steps: deque[list[ResidualLayer]] = deque([plan] if plan else [])
        while steps:
            if deadline is not None and time.monotonic() >= deadline:
                self.stopped_reason = "time budget reached (residual pass)"
                return
            layers = steps.popleft()
            attempt = self._try_residual(layers, state, len(state.attempts))
            state.attempts.append(attempt)
            if attempt.outcome == "accepted":
                state.residuals.extend(layers)
                state.agreement.update(attempt.agreement_final)
            else:
                failing_models = {self.check.query(q).model_key for q in attempt.failing_queries}
                follow_ups = residual_back_off(layers, failing_models)
                attempt.outcome = "backed off: residual" if follow_ups else "skipped"
                steps.extendleft(reversed(follow_ups))
            state.elapsed_s = time.monotonic() - started
            self.progress(self._progress_line(attempt, state))
            self._checkpoint(state, bundle=attempt.outcome == "accepted")

    def _try_residual(self, layers: list[ResidualLayer], state: MergeState, index: int) -> Attempt:
        """Hold `layers` as base + int8 residual in their members, check the models that changed
        (stopping at the first miss), keep or undo."""
        t0 = time.monotonic()
        own_weights = {}
        for layer in layers:
            base = layer_of(self.modules, layer.base).weight
            for ref in layer.members:
                module = layer_of(self.modules, ref)
                own_weights[ref] = module.weight
                residual.attach(module, base)
        paths: dict[str, list[str]] = {}
        for ref in own_weights:
            paths.setdefault(ref.model, []).append(ref.path)
        starts = {key: self.runners[key].start_of(p) for key, p in paths.items()}
        agreement = self.check.until_failure(starts, lambda q: self._slack(q, state.agreement))
        failing = [q for q, a in agreement.items() if not self.check.target_met(q, a)]
        if failing:
            for ref, weight in own_weights.items():
                residual.detach(layer_of(self.modules, ref), weight)
        members = [m.path for layer in layers for m in layer.members[:1]]
        return Attempt(index, "residual", f"int8 residual x{len(layers)} layers" if len(layers) > 1 else
                       f"int8 residual {layers[0].layer}", sorted(paths), [layer.layer_id for layer in layers],
                       sum(layer.bytes_saved for layer in layers), agreement, agreement, 0,
                       round(time.monotonic() - t0, 2), "accepted" if not failing else "failed", failing,
                       layers=members,
                       lower_bound_final={q: round(b, 4) for q, b in self.check.lower_bounds(agreement).items()})

    # --------------------------------------------------------------- trial
    def _try(self, candidate: Candidate, state: MergeState, index: int, deadline: Optional[float]) -> Attempt:
        t0 = time.monotonic()
        closure = sharing_closure([*state.accepted, *candidate.groups], candidate.models)
        snapshot = Snapshot.take(self.modules, closure)
        for g in candidate.groups:
            share_group(self.modules, g, init=self.settings.init)
        starts, trainable = self._scope(candidate, closure)
        budget, archs = self.retrain_budget(state), [self.architecture(k) for k in starts]
        # retraining displaces untried candidates only when the time left cannot try them all
        spare = self.time_to_spare(state, deadline)
        can_retrain = self.settings.train_steps > 0 and all(k in self.teachers for k in starts)
        retrainable = can_retrain and (spare or budget.worth_retraining(archs, candidate.bytes_saved))
        # a trial that will not be retrained only needs to know whether it fails, and only on
        # the models holding a tensor the sharing changed
        shared = (self.check.of_models(starts) if retrainable
                  else self.check.until_failure(self._changed_by_sharing(candidate, starts),
                                                lambda q: self._slack(q, state.agreement)))
        final, steps, aborted, retrain_s, note = dict(shared), 0, False, 0.0, ""
        if not self.check.all_met(final):
            if retrainable:
                t_retrain = time.monotonic()
                # short of time, and until retraining has rescued a trial of these architectures,
                # one check without progress ends it
                patience = self.settings.patience if spare or budget.has_rescued(archs) else 1
                final, steps, aborted = self._retrain(starts, trainable, final, deadline, self.settings.seed + index,
                                                      patience)
                retrain_s = time.monotonic() - t_retrain
            elif can_retrain:
                note = budget.reason_to_skip(archs, candidate.bytes_saved)
        failing = [q for q, a in final.items() if not self.check.target_met(q, a)]
        if aborted or failing:
            snapshot.restore(self.modules, candidate.groups)
        outcome = "aborted (time budget)" if aborted else ("accepted" if not failing else "failed")
        return Attempt(index, candidate.origin, candidate.describe(), list(candidate.models),
                       [g.group_id for g in candidate.groups], candidate.bytes_saved, shared, final, steps,
                       round(time.monotonic() - t0, 2), outcome, failing,
                       layers=[g.members[0].path for g in candidate.groups],
                       lower_bound_final={q: round(b, 4) for q, b in self.check.lower_bounds(final).items()},
                       trained_from={k: self.runners[k].block_name(s) for k, s in starts.items()},
                       trained_bytes=sum(p.numel() * p.element_size() for p in trainable) if steps else 0,
                       retrain_seconds=round(retrain_s, 2), note=note)

    def _changed_by_sharing(self, candidate: Candidate, starts: dict[str, int]) -> dict[str, int]:
        """The models (with their start blocks) that hold a tensor of the candidate's shared
        layers: sharing alone changes nothing else."""
        changed = {id(p) for g in candidate.groups for p in layer_of(self.modules, g.members[0]).parameters()}
        return {k: s for k, s in starts.items() if any(id(p) in changed for p in self.modules[k].parameters())}

    def time_to_spare(self, state: MergeState, deadline: Optional[float]) -> bool:
        """Whether the time left covers trying every queued candidate without retraining (at the
        mean time of the run's untrained trials so far, else of one check of every model)."""
        if deadline is None:
            return True
        untrained = [a.seconds for a in state.attempts if a.retrain_seconds <= 0 and not a.outcome.startswith("aborted")]
        per_trial = float(np.mean(untrained)) if untrained else self.check.reference_seconds
        return len(state.queue) * per_trial < deadline - time.monotonic()

    def architecture(self, model_key: str) -> str:
        return self.workload.architectures.get(model_key, self.workload.models[model_key].name)

    def retrain_budget(self, state: MergeState) -> RetrainBudget:
        """What retraining has paid in this run so far, from its trials (so a resumed run judges
        from the same history)."""
        budget = RetrainBudget()
        for a in state.attempts:
            if a.outcome.startswith("aborted"):
                continue
            accepted = a.outcome == "accepted"
            budget.record([self.architecture(k) for k in a.models if k in self.workload.models], a.retrain_seconds,
                          rescued=accepted and a.retrain_seconds > 0, trial_seconds=a.seconds,
                          bytes_accepted_untrained=a.bytes_saved if accepted and a.retrain_seconds <= 0 else 0)
        return budget

    def _scope(self, candidate: Candidate, closure: set[str]) -> tuple[dict[str, int], list[torch.nn.Parameter]]:
        """Which models a trial changes and from which block, and the parameters it may retrain:
        every block from the first shared layer on in the candidate's models; in the others only
        the tensors they share with those."""
        starts: dict[str, int] = {}
        for key in candidate.models:
            paths = [m.path for g in candidate.groups for m in g.members if m.model == key]
            starts[key] = self.runners[key].start_of(paths)
        trainable = {id(p): p for k, s in starts.items() for p in self.runners[k].trainable(s)}
        for key in closure - set(starts):
            runner = self.runners[key]
            touched = [runner.start_of([path]) for path, p in runner.model.module.named_parameters() if id(p) in trainable]
            if touched:
                starts[key] = min(touched)
        return starts, list(trainable.values())

    def _retrain(self, starts: dict[str, int], trainable: list[torch.nn.Parameter], agreement: dict[str, float],
                 deadline: Optional[float], seed: int, patience: int) -> tuple[dict[str, float], int, bool]:
        s = self.settings
        keys = sorted(starts)
        chosen = {id(p) for p in trainable}
        flags = {id(p): (p, p.requires_grad) for k in keys for p in self.modules[k].parameters()}
        inputs = {k: self.runners[k].train_prefix(starts[k]) for k in keys}
        optimiser = torch.optim.Adam(trainable, lr=s.lr)
        generator = torch.Generator().manual_seed(seed)
        weights = self._lag_weights(keys, agreement)
        # the best state seen (by worst gap to target) is what the trial keeps: retraining that
        # makes things worse is undone, not accepted or blamed on the layers
        best_gap, stale = self.check.worst_gap(agreement), 0
        best = (agreement, [p.detach().clone() for p in trainable])
        step = 0
        try:
            for p, _ in flags.values():
                p.requires_grad_(id(p) in chosen)
            for step in range(1, s.train_steps + 1):
                if deadline is not None and time.monotonic() >= deadline:
                    return agreement, step - 1, True
                optimiser.zero_grad(set_to_none=True)
                for key in keys:
                    runner, teacher = self.runners[key], self.teachers[key]
                    idx = torch.randint(len(teacher.inputs), (min(s.batch_size, len(teacher.inputs)),),
                                        generator=generator)
                    out = runner.student(inputs[key][idx], starts[key])
                    (weights[key] * runner.adapter.loss(out, teacher.targets[idx].to(runner.device))).backward()
                optimiser.step()
                if step % s.eval_every == 0 or step == s.train_steps:
                    agreement = self.check.of_models(starts)
                    if self.check.all_met(agreement):
                        return agreement, step, False
                    gap = self.check.worst_gap(agreement)
                    if gap < best_gap - 1e-9:
                        best_gap, stale, best = gap, 0, (agreement, [p.detach().clone() for p in trainable])
                    else:
                        stale += 1
                    if stale >= patience:
                        break
                    weights = self._lag_weights(keys, agreement)
            with torch.no_grad():
                for p, value in zip(trainable, best[1]):
                    p.copy_(value)
            return best[0], step, False
        finally:
            for p, flag in flags.values():
                p.requires_grad_(flag)

    def _slack(self, query_id: str, agreement: dict[str, float]) -> float:
        """How far a query's judged agreement (1.0 when not measured) is above its target."""
        return self.check.judged(query_id, agreement.get(query_id, 1.0)) - self.check.targets[query_id]

    def _lag_weights(self, keys: list[str], agreement: dict[str, float]) -> dict[str, float]:
        raw = {k: sum(max(0.0, -self._slack(q.query_id, agreement)) + self.settings.lag_floor
                      for q in self.workload.queries_of(k)) for k in keys}
        mean = sum(raw.values()) / max(1, len(raw))
        return {k: v / mean for k, v in raw.items()}

    def memory(self) -> MemoryMeasurement:
        return MemoryMeasurement("storages", self.original_bytes, resident_weight_bytes(self.modules.values()))

    def cuda_memory(self) -> Optional[MemoryMeasurement]:
        """Measured on CUDA: allocation of the modules copied one by one (sharing broken, the
        unmerged layout) vs copied together (sharing kept). None without CUDA."""
        if not torch.cuda.is_available():
            return None
        import copy

        before = cuda_loaded_bytes(lambda: [copy.deepcopy(m).to("cuda") for m in self.modules.values()])
        after = cuda_loaded_bytes(lambda: [m.to("cuda") for m in copy.deepcopy(list(self.modules.values()))])
        return MemoryMeasurement("cuda.memory_allocated", int(before or 0), int(after or 0))

    def _progress_line(self, a: Attempt, state: MergeState) -> str:
        saved = state.bytes_saved
        worst = min(a.agreement_final.values()) if a.agreement_final else 1.0
        tried, left = a.index + 1, len(state.queue)
        done = tried / (tried + left)
        budget = self.settings.time_budget_s
        if budget:
            done = max(done, min(1.0, state.elapsed_s / budget))   # whichever ends the run first
        bar = "#" * round(24 * done) + "." * (24 - round(24 * done))
        return (f"[{bar}] {100 * done:3.0f}% [{tried} tried, {left} queued] {a.layer}: {a.outcome} "
                f"(min agreement {worst:.3f}, {a.train_steps} steps, {a.seconds:.1f}s; "
                f"saved so far {saved / 2**20:.2f} MiB, {state.elapsed_s:.0f}s)")

    # -------------------------------------------------------- checkpoints
    def meta(self) -> dict[str, ModelMeta]:
        return {k: ModelMeta(self.workload.architectures.get(k, m.name), self.workload.weights.get(k, m.weights), m.kind,
                             input_size=m.input_size, weights_digest=self.workload.digests.get(k),
                             queries=[q.query_id for q in self.workload.queries_of(k)])
                for k, m in self.workload.models.items()}

    def _checkpoint(self, state: MergeState, bundle: bool) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if bundle:
            save_bundle(self.out_dir / CHECKPOINT_BUNDLE, self.modules, state.accepted, self.meta())
        progress = {"accepted": [[g.layer_id, list(g.models)] for g in state.accepted],
                    "queue": [c.to_json() for c in state.queue], "attempts": [asdict(a) for a in state.attempts],
                    "agreement": state.agreement, "elapsed_s": state.elapsed_s,
                    "residuals": [r.to_json() for r in state.residuals], "workload": self.fingerprint()}
        tmp = self.out_dir / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        tmp.replace(self.out_dir / PROGRESS_FILE)

    def fingerprint(self) -> str:
        """The workload and the settings that decide what agreement means: resuming under other
        ones would mix figures measured on other frames or judged otherwise."""
        return (",".join(f"{g.group_id}" for g in self.analysis.groups[:50]) + f"|{len(self.analysis.groups)}"
                + f"|check_on={self.settings.check_on}|accept_on={self.settings.accept_on}"
                + "".join(f"|{c}={len(self.workload.frames[c].heldout)}" for c in self.workload.probes))

    def resume(self) -> MergeState:
        """State saved in out_dir; the accepted groups' tensors come back from the checkpoint bundle."""
        if self.out_dir is None or not (self.out_dir / PROGRESS_FILE).exists():
            raise FileNotFoundError(f"no merge progress to resume in {self.out_dir}")
        progress = json.loads((self.out_dir / PROGRESS_FILE).read_text())
        if progress["workload"] != self.fingerprint():
            raise ValueError(f"{self.out_dir} holds progress of a different workload; start without --resume")
        by_layer = self.analysis.by_layer_id()
        accepted = [by_layer[lid].restricted_to(tuple(models)) for lid, models in progress["accepted"]]
        residuals = [ResidualLayer.from_json(r) for r in progress.get("residuals", [])]
        if accepted or residuals:
            install_state(self.modules, read_bundle(self.out_dir / CHECKPOINT_BUNDLE))
        queue = deque(Candidate.from_json(c, by_layer) for c in progress["queue"])
        attempts = [Attempt(**a) for a in progress["attempts"]]
        return MergeState(accepted, queue, attempts, dict(progress["agreement"]), float(progress["elapsed_s"]),
                          residuals)
