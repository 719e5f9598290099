"""One readable training loop for every modality: AdamW, warm-up + cosine schedule, early
stopping on a validation metric (ties broken by validation loss), the best weights kept,
seeds for reproducibility, mixed precision on GPU. Also the prediction pass used by
evaluation and predict.

What is trained is fed through a :class:`Feeder`: slides as bags of instance features
(:class:`BagFeeder`, the default for a list of bags), whole images with augmentation or
cached image features (``wsi_mil.data.image_feed``). The loop itself does not know which."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from wsi_mil.data.bags import Bag, Task, bag_item, collate
from wsi_mil.runtime import reuse_freed_memory
from wsi_mil.train.checkpoint import state_copy
from wsi_mil.train.losses import BagLoss, label_weights, sample_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    patience: int = 10
    min_epochs: int = 5
    monitor: str = "auc"  # "auc" (higher is better) or "loss"
    select: str = "best"  # "best": the best validation epoch; "swa": weights averaged over the second half, no early stop
    bags_per_batch: int = 1
    max_instances: int | None = 4096
    imbalance: str = "weighted"
    focal_gamma: float = 2.0
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16/fp16 autocast on CUDA only


class Feeder(Protocol):
    """Samples as model inputs. ``targets`` (n, C) may hold NaN for blank labels."""

    ids: list[str]
    targets: np.ndarray

    def __len__(self) -> int: ...
    def n_steps(self) -> int: ...
    def train_batches(self, order: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]: ...
    def eval_batches(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]: ...
    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor | None = None) -> Any: ...
    def attention(self, out: Any, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]: ...


class BagFeeder:
    """Slides as bags: padded batches of ``bags_per_batch`` bags in training (at most
    ``max_instances`` random instances each), one full bag at a time in evaluation."""

    def __init__(self, bags: Sequence[Bag], max_instances: int | None = None, bags_per_batch: int = 1) -> None:
        self.bags, self.max_instances, self.per_batch = list(bags), max_instances, bags_per_batch
        self.ids = [b.slide_id for b in self.bags]
        self.targets = np.stack([b.target for b in self.bags]) if self.bags else np.zeros((0, 1), np.float32)

    def __len__(self) -> int:
        return len(self.bags)

    def n_steps(self) -> int:
        return math.ceil(len(self.bags) / self.per_batch)

    def _covariates(self, bags: Sequence[Bag]) -> tuple[torch.Tensor, ...]:
        """The bags' encoded covariates as one more input (none when the run has none)."""
        if bags[0].covariates is None:
            return ()
        return (torch.from_numpy(np.stack([np.asarray(b.covariates, np.float32) for b in bags])),)

    def train_batches(self, order: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        for a in range(0, len(order), self.per_batch):
            batch = [self.bags[i] for i in order[a:a + self.per_batch]]
            x, mask, coords, y = collate([bag_item(b, self.max_instances, rng) for b in batch])
            yield (x, mask, coords, *self._covariates(batch)), y

    def eval_batches(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        for bag in self.bags:
            x, mask, coords, y = collate([bag_item(bag, None, None)])
            yield (x, mask, coords, *self._covariates([bag])), y

    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor | None = None) -> Any:
        return model(*inputs, labels=labels) if labels is not None else model(*inputs)

    def attention(self, out: Any, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        return [out.attention[0].float().cpu().numpy()]


def as_feeder(samples: Any, s: FitSettings | None = None) -> Feeder:
    """A feeder as is; a list of bags as a :class:`BagFeeder`."""
    if hasattr(samples, "train_batches"):
        return samples  # type: ignore[no-any-return]
    return BagFeeder(samples, s.max_instances if s else None, s.bags_per_batch if s else 1)


def instance_moments(feeder: Feeder) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation over every real instance the feeder holds
    (padding excluded), accumulated in float64."""
    total, sq, n = None, None, 0
    for inputs, _ in feeder.eval_batches():
        x = inputs[0].double()
        x = x[inputs[1]] if len(inputs) > 1 and inputs[1].shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        n += x.shape[0]
    if total is None or sq is None or n == 0:
        raise ValueError("no training instances to standardise the inputs with")
    mean = total / n
    return mean.float(), (sq / n - mean * mean).clamp(min=0).sqrt().float()


def _accumulate(mean: dict[str, torch.Tensor] | None, model: nn.Module, n: int) -> dict[str, torch.Tensor]:
    """The running mean of ``model``'s floating-point weights after ``n`` earlier ones
    (other buffers: the latest)."""
    state = state_copy(model)
    if mean is None:
        return state
    return {k: (mean[k] * n + v) / (n + 1) if v.is_floating_point() else v for k, v in state.items()}


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def probabilities(logits: torch.Tensor, kind: str, task: Task | None = None) -> torch.Tensor:
    """The task kind's output activation (softmax for multi-class, sigmoid per output, the
    target's units for a regression, the log risk for survival)."""
    from wsi_mil.tasks import kind_of

    return kind_of(kind).activation(logits, task)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class Predictions:
    slide_ids: list[str]
    targets: np.ndarray  # (n, C)
    probs: np.ndarray  # (n, C)
    attention: list[np.ndarray]  # per bag, (n_instances,)
    loss: float | None = None
    #: per bag, (n_instances, C): each instance's share of the output (models with an additive readout), in the
    #: output's units (the task kind's); None when the model has none
    contribution: list[np.ndarray] | None = None


@torch.no_grad()
def predict(model: nn.Module, bags: Any, task: Task, *, device: str = "cpu", amp: bool = True,
            loss_fn: nn.Module | None = None) -> Predictions:
    """Every sample once, in order (bags: full bags, one at a time; no subsampling, no padding)."""
    feeder = as_feeder(bags)
    dev = torch.device(device)
    if dev.type == "cpu":
        reuse_freed_memory()
    model.eval().to(dev)
    probs, att, losses, weights = [], [], [], []
    shares: list[np.ndarray] | None = []
    logits_all: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    over_set = task.kind_obj.loss_over_set
    for inputs, y in feeder.eval_batches():
        inputs = tuple(t.to(dev) for t in inputs)
        y = y.to(dev)
        with _autocast(dev, amp):
            out = feeder.forward(model, inputs)
        probs.append(probabilities(out.logits, task.kind, task).cpu().numpy())
        att += feeder.attention(out, inputs)
        c = getattr(out, "contribution", None)
        share = task.kind_obj.contribution_units(task, c[0].float()) if c is not None and c.shape[0] == 1 else None
        if shares is not None and share is not None:
            shares.append(share.cpu().numpy())
        else:
            shares = None
        if loss_fn is not None and over_set:
            logits_all.append(out.logits.float())
            ys.append(y)
        elif loss_fn is not None:
            losses.append(float(loss_fn(out.logits, y)))
            weights.append(int((~torch.isnan(y)).sum()))
    targets = feeder.targets if len(feeder) else np.zeros((0, task.n_targets), np.float32)
    loss = float(np.average(losses, weights=weights)) if losses and sum(weights) else None
    if loss_fn is not None and over_set and logits_all:  # (a Cox likelihood ranks the whole set: one bag has none)
        known = int((~torch.isnan(torch.cat(ys))).sum())
        loss = float(loss_fn(torch.cat(logits_all), torch.cat(ys))) if known else None
    return Predictions(list(feeder.ids), targets, np.concatenate(probs) if probs else np.zeros((0, task.n_outputs)),
                       att, loss, shares if shares else None)


def score(pred: Predictions, task: Task) -> float | None:
    """The validation metric: AUC (binary), macro one-vs-rest AUC (multi-class), mean AUC
    over labels (multi-label); None when it is undefined (a single class)."""
    return task.kind_obj.score(task, pred.targets, pred.probs)


def fit(model: nn.Module, train: Any, val: Any, task: Task, s: FitSettings,
        log: Any = None, param_groups: list[dict[str, Any]] | None = None) -> FitResult:
    """Train ``model`` on ``train``; early stopping and model selection on ``val`` (when
    ``val`` is empty: a fixed number of epochs, the last weights are kept). ``train`` and
    ``val`` are lists of bags or :class:`Feeder` s; ``param_groups`` (AdamW groups whose
    ``lr_scale`` multiplies ``s.lr``: discriminative learning rates) default to every
    trainable parameter at ``s.lr``."""
    seed_everything(s.seed)
    dev = torch.device(s.device)
    if dev.type == "cpu":
        reuse_freed_memory()  # no page faults per layer per step (wsi_mil/runtime.py)
    model.to(dev)
    train = as_feeder(train, s)
    val = as_feeder(val, s) if val is not None and len(val) else None
    if s.select not in ("best", "swa"):
        raise ValueError(f"FitSettings.select must be best or swa, not {s.select!r}")
    select = s.select
    fit_inputs = getattr(model, "fit_inputs", None)  # a method of some models (Module.__getattr__ types only tensors/modules)
    if fit_inputs is not None:  # input standardisation from the training instances (kept with the weights)
        fit_inputs(*(t.to(dev) for t in instance_moments(train)))
    targets = train.targets
    loss_fn = BagLoss(task.kind, s.imbalance, label_weights(targets, task.kind, task), s.focal_gamma, task=task).to(dev)
    eval_loss = BagLoss(task.kind, "none", task=task).to(dev)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for g in groups:
        g["lr"] = s.lr * g.pop("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)
    trained = [p for g in groups for p in g["params"]]
    steps_per_epoch = train.n_steps()
    total, warm = s.epochs * steps_per_epoch, s.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and s.amp and not torch.cuda.is_bf16_supported())
    rng = np.random.default_rng(s.seed)
    draw = sample_weights(targets, task.kind) if s.imbalance == "sampler" else None
    best: FitResult = FitResult(state_copy(model), 0, None)
    best_key, stale = (-math.inf, -math.inf), 0
    averaged: dict[str, torch.Tensor] | None = None  # --select swa: the running mean of the weights
    n_avg = 0
    history: list[dict[str, Any]] = []
    for epoch in range(1, s.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        load_s, losses = 0.0, []
        order = rng.choice(len(train), len(train), p=draw) if draw is not None else rng.permutation(len(train))
        tl = time.perf_counter()
        for inputs, y in train.train_batches(order, rng):
            load_s += time.perf_counter() - tl
            inputs, y = tuple(t.to(dev) for t in inputs), y.to(dev)
            with _autocast(dev, s.amp):
                out = train.forward(model, inputs, labels=y)
                loss = loss_fn(out.logits, y)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(trained, s.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.detach().item())
            tl = time.perf_counter()
        train_s = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                               "train_seconds": train_s, "load_seconds": load_s, "bags_per_s": len(train) / train_s}
        if val:
            pred = predict(model, val, task, device=s.device, amp=s.amp, loss_fn=eval_loss)
            metric = score(pred, task)
            row.update(val_loss=pred.loss, val_auc=metric)
            row.update({f"val_score_{k}": v for k, v in task.kind_obj.score_parts(task, pred.targets, pred.probs).items()})
            # AUC first, validation loss breaks ties: once AUC saturates (small validation sets
            # reach 1.0 within a few epochs) the model keeps improving its calibration instead
            # of stopping at the first, barely trained epoch with that AUC
            val_loss = pred.loss
            if val_loss is None:  # predict weighs each bag's loss by its known targets: none known, no loss
                raise ValueError("no validation loss: none of the validation bags has a known target")
            primary = -val_loss if (s.monitor == "loss" or metric is None) else float(metric)
            key = (primary, -val_loss)
            if key[0] > best_key[0] + 1e-6 or (abs(key[0] - best_key[0]) <= 1e-6 and key[1] > best_key[1] + 1e-6):
                best_key, stale = key, 0
                best = FitResult(state_copy(model), epoch, primary)
            else:
                stale += 1
        history.append(row)
        if log:
            log(row)
        if select == "swa":
            if epoch > s.epochs // 2:  # stochastic weight averaging (Izmailov et al. 2018) of the second half
                averaged, n_avg = _accumulate(averaged, model, n_avg), n_avg + 1
            continue  # a fixed schedule: validation is watched, never used to stop or choose
        if val and epoch >= s.min_epochs and stale >= s.patience:
            break
    if select == "swa" and averaged is not None:
        best = FitResult(averaged, len(history), None)
    elif not val:
        best = FitResult(state_copy(model), len(history), None)
    best.history = history
    model.load_state_dict(best.state)
    return best
