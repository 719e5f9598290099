"""One readable training loop for bags: AdamW, warm-up + cosine schedule, early stopping
on a validation metric (ties broken by validation loss), the best weights kept, seeds for reproducibility, mixed
precision on GPU. Also the prediction pass (full bags) used by evaluation and predict."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

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
    bags_per_batch: int = 1
    max_instances: int | None = 4096
    imbalance: str = "weighted"
    focal_gamma: float = 2.0
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bf16/fp16 autocast on CUDA only


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


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1) if kind == "multiclass" else torch.sigmoid(logits.float())


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


@torch.no_grad()
def predict(model: nn.Module, bags: list[Bag], task: Task, *, device: str = "cpu", amp: bool = True,
            loss_fn: nn.Module | None = None) -> Predictions:
    """Full bags, one at a time (no subsampling, no padding)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        reuse_freed_memory()
    model.eval().to(dev)
    probs, att, losses = [], [], []
    for bag in bags:
        x, mask, coords, y = collate([bag_item(bag, None, None)])
        x, mask, coords, y = x.to(dev), mask.to(dev), coords.to(dev), y.to(dev)
        with _autocast(dev, amp):
            out = model(x, mask, coords)
        probs.append(probabilities(out.logits, task.kind)[0].cpu().numpy())
        att.append(out.attention[0].float().cpu().numpy())
        if loss_fn is not None:
            losses.append(float(loss_fn(out.logits, y)))
    targets = np.stack([b.target for b in bags]) if bags else np.zeros((0, task.n_outputs), np.float32)
    return Predictions([b.slide_id for b in bags], targets, np.stack(probs) if probs else np.zeros((0, task.n_outputs)),
                       att, float(np.mean(losses)) if losses else None)


def score(pred: Predictions, task: Task) -> float | None:
    """The validation metric: AUC (binary), macro one-vs-rest AUC (multi-class), mean AUC
    over labels (multi-label); None when it is undefined (a single class)."""
    from wsi_mil.eval.metrics import auc

    if task.kind == "multiclass":
        y = pred.targets.argmax(axis=1)
        if len(np.unique(y)) < task.n_outputs:
            return None
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, pred.probs, multi_class="ovr", labels=list(range(task.n_outputs))))
    aucs = [auc(pred.targets[:, c], pred.probs[:, c]) for c in range(task.n_outputs)]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def fit(model: nn.Module, train: list[Bag], val: list[Bag], task: Task, s: FitSettings,
        log: Any = None) -> FitResult:
    """Train ``model`` on ``train``; early stopping and model selection on ``val`` (when
    ``val`` is empty: a fixed number of epochs, the last weights are kept)."""
    seed_everything(s.seed)
    dev = torch.device(s.device)
    if dev.type == "cpu":
        reuse_freed_memory()  # no page faults per layer per step (wsi_mil/runtime.py)
    model.to(dev)
    targets = np.stack([b.target for b in train])
    loss_fn = BagLoss(task.kind, s.imbalance, label_weights(targets, task.kind), s.focal_gamma).to(dev)
    eval_loss = BagLoss(task.kind, "none").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(train) / s.bags_per_batch)
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
    history: list[dict[str, Any]] = []
    for epoch in range(1, s.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        load_s, losses = 0.0, []
        order = rng.choice(len(train), len(train), p=draw) if draw is not None else rng.permutation(len(train))
        for a in range(0, len(order), s.bags_per_batch):
            tl = time.perf_counter()
            x, mask, coords, y = collate([bag_item(train[i], s.max_instances, rng) for i in order[a:a + s.bags_per_batch]])
            load_s += time.perf_counter() - tl
            x, mask, coords, y = x.to(dev), mask.to(dev), coords.to(dev), y.to(dev)
            with _autocast(dev, s.amp):
                out = model(x, mask, coords, labels=y)
                loss = loss_fn(out.logits, y)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.detach().item())
        train_s = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0],
                               "train_seconds": train_s, "load_seconds": load_s, "bags_per_s": len(train) / train_s}
        if val:
            pred = predict(model, val, task, device=s.device, amp=s.amp, loss_fn=eval_loss)
            metric = score(pred, task)
            row.update(val_loss=pred.loss, val_auc=metric)
            # AUC first, validation loss breaks ties: once AUC saturates (small validation sets
            # reach 1.0 within a few epochs) the model keeps improving its calibration instead
            # of stopping at the first, barely trained epoch with that AUC
            primary = -pred.loss if (s.monitor == "loss" or metric is None) else float(metric)  # type: ignore[arg-type]
            key = (primary, -pred.loss)
            if key[0] > best_key[0] + 1e-6 or (abs(key[0] - best_key[0]) <= 1e-6 and key[1] > best_key[1] + 1e-6):
                best_key, stale = key, 0
                best = FitResult(state_copy(model), epoch, primary)
            else:
                stale += 1
        history.append(row)
        if log:
            log(row)
        if val and epoch >= s.min_epochs and stale >= s.patience:
            break
    if not val:
        best = FitResult(state_copy(model), len(history), None)
    best.history = history
    model.load_state_dict(best.state)
    return best
