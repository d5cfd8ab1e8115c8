"""The one training loop, used by train_teacher.py (no teacher) and distill.py (with or without a teacher)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from kd import tracking as keys
from kd.checkpoint import TrainState
from kd.errors import UserError
from kd.features import LOGITS, FeatureTap, logits_of
from kd.methods import Method
from kd.optim import EpochSchedule
from kd.signals import StopRequest, Stopped


@dataclass
class Objective:
    """Cross-entropy, or a distillation method (kd.methods) when a teacher or a teacher cache is given. The
    teacher is frozen, in eval mode, not wrapped in DDP (no gradient sync, no buffer broadcasts) and runs under the
    same autocast as the student; a feature method gets its feature maps from the same forward (kd.features)."""

    teacher: nn.Module | None = None
    method: Method | None = None
    cache: object = None  # a kd.teacher_cache.TeacherCache replacing the teacher: its logits come with the batch

    def __post_init__(self):
        self.forward_method = self.method  # Session.fit puts its DDP wrapper here when it has trainable parts
        self.tap: FeatureTap | None = None

    @property
    def distills(self) -> bool:
        return self.method is not None and (self.teacher is not None or self.cache is not None)

    def attach(self, student: nn.Module) -> None:
        """Hooks on the (unwrapped) student's modules that a feature method reads."""
        if self.distills and self.method.student_layers:
            self.tap = FeatureTap(student, self.method.student_layers)

    def trainable(self) -> list[nn.Module]:
        """The method, when it has parameters to train (FitNet's regressor)."""
        has_params = self.distills and any(p.requires_grad for p in self.method.parameters())
        return [self.method] if has_params else []

    def prepare(self, accelerator: Accelerator) -> None:
        """After accelerator.prepare(student, optimizer...): the trainable parts in a DDP wrapper of their own, so
        their gradients are synced and the student's checkpoint keys and model file stay the student's alone."""
        if self.trainable():
            self.forward_method = accelerator.prepare(self.method)

    def teacher_outputs(self, accelerator: Accelerator, images: torch.Tensor) -> tuple[torch.Tensor, list]:
        with torch.inference_mode(), accelerator.autocast():
            out = self.teacher(images)
        if not isinstance(out, dict):
            return out, []
        # Cloned outside inference mode: a loss may save them for backward (an MSE does), inference tensors not.
        return out[LOGITS], [out[name].clone() for name in self.method.teacher_layers]

    def eval_teacher_logits(self, accelerator: Accelerator, images: torch.Tensor, indices) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.val_logits(indices)
        with torch.inference_mode(), accelerator.autocast():
            return logits_of(self.teacher(images))

    def __call__(self, accelerator: Accelerator, model: nn.Module, images, targets, teacher_logits=None,
                 epoch: int = 0):
        logits = model(images)
        if not self.distills:
            ce = F.cross_entropy(logits.float(), targets)
            return logits, ce, {keys.TRAIN_LOSS_CE: ce}
        teacher_features = []
        if teacher_logits is None:
            teacher_logits, teacher_features = self.teacher_outputs(accelerator, images)
        student_features = self.tap.pop() if self.tap is not None else []
        loss, parts = self.forward_method(logits, teacher_logits, targets, student_features, teacher_features, epoch)
        return logits, loss, parts


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, loader, objective: Objective | None = None,
             transform=None) -> dict:
    """Loss, top-1, top-5 (and teacher agreement) over exactly the val set: gather_for_metrics drops the samples
    that the distributed sampler repeats to even out the last batch. `transform(images)` readies a raw batch."""
    model.eval()
    compare = objective is not None and objective.distills  # agreement with the teacher (live or cached)
    sums, count = [], 0  # per batch, on the device: loss sum, correct@1, correct@5, agreements
    for images, targets, indices in loader:
        images = transform(images) if transform is not None else images
        logits = logits_of(model(images))
        k = min(5, logits.shape[1])
        per_sample = torch.stack([
            F.cross_entropy(logits.float(), targets, reduction="none"),
            (logits.argmax(1) == targets).float(),
            (logits.topk(k, dim=1).indices == targets[:, None]).any(1).float(),
            (logits.argmax(1) == objective.eval_teacher_logits(accelerator, images, indices).argmax(1)).float()
            if compare else torch.zeros_like(targets, dtype=torch.float),
        ], dim=1)
        per_sample = accelerator.gather_for_metrics(per_sample)
        sums.append(per_sample.sum(0))
        count += per_sample.shape[0]
    totals = torch.stack(sums).cpu().double().sum(0)  # the one host sync of the evaluation
    metrics = {keys.VAL_LOSS: totals[0].item() / count, keys.VAL_ACC1: totals[1].item() / count,
               keys.VAL_ACC5: totals[2].item() / count}
    if compare:
        metrics[keys.VAL_AGREEMENT] = totals[3].item() / count
    return metrics


@dataclass
class Trainer:
    accelerator: Accelerator
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    schedule: EpochSchedule | None
    train_loader: object
    val_loader: object
    tracker: keys.Tracker
    state: TrainState
    epochs: int
    log_every: int
    clip_grad_norm: float = 0.0
    on_epoch_end: object = None  # callable(trainer, val_metrics, is_best) -> None, saves files
    save_state: object = None  # callable(state) -> None
    checkpoint_every: int = 1
    stop: StopRequest = field(default_factory=StopRequest)
    batch_transform: object = None  # callable(images, indices, epoch) -> (model input, cached teacher logits | None)
    eval_transform: object = None  # callable(images) -> model input
    on_start: object = None  # callable() -> None, once, after the first step worked (the run then owns its dir)
    started: bool = False
    images_seen: int = 0
    train_seconds: float = 0.0

    def fit(self) -> dict:
        val_metrics = {}
        for epoch in range(self.state.epoch, self.epochs):
            self.train_one_epoch(epoch)
            val_metrics = self.evaluate()
            self.state.epoch, self.state.step_in_epoch, self.state.epoch_loss_sum = epoch + 1, 0, 0.0
            self.state.samples_in_epoch = 0
            is_best = val_metrics[keys.VAL_ACC1] > self.state.best_acc1
            if is_best:
                self.state.best_acc1, self.state.best_epoch = val_metrics[keys.VAL_ACC1], epoch + 1
            self.tracker.log({**val_metrics, keys.EPOCH: epoch + 1}, step=self.state.global_step)
            self.tracker.summary({keys.BEST_VAL_ACC1: self.state.best_acc1, keys.BEST_EPOCH: self.state.best_epoch})
            self.on_epoch_end(self, val_metrics, is_best)
            if (epoch + 1) % self.checkpoint_every == 0 or epoch + 1 == self.epochs:
                self.save_state(self.state)
        self.start()  # a resumed finished run trains nothing, but it is started
        return val_metrics

    def start(self) -> None:
        if not self.started:
            self.started = self.stop.training = True
            if self.on_start is not None:
                self.on_start()

    def evaluate(self) -> dict:
        return evaluate(self.accelerator, self.model, self.val_loader, self.objective, self.eval_transform)

    def _set_lr(self, epoch: int, done: int, epoch_samples: int) -> None:
        """The LR of the next optimizer step, from the training progress in epochs (samples, not steps)."""
        if self.schedule is None:
            return
        if done >= epoch_samples:
            epoch, done = epoch + 1, 0
        step = self.train_loader.total_batch_size * self.accelerator.gradient_accumulation_steps
        self.schedule.at(epoch + done / epoch_samples, epoch + min(done + step, epoch_samples) / epoch_samples)

    def train_one_epoch(self, epoch: int) -> None:
        acc, state = self.accelerator, self.state
        self.model.train()
        for module in self.objective.trainable():
            module.train()
        self.train_loader.set_epoch(epoch)
        # Progress counts samples over all processes: the train sampler continues a resumed epoch at sample
        # `start` (kd.data.EpochSampler) whatever the processes and batch size were when it stopped.
        global_batch = self.train_loader.total_batch_size
        epoch_samples = len(self.train_loader.dataset) // global_batch * global_batch
        start = state.samples_in_epoch
        done = start
        self._set_lr(epoch, done, epoch_samples)
        window = _Window(acc.device)
        # per process, sample-weighted; a resumed epoch carries the sum of the samples trained before the stop
        epoch_loss = torch.full((), state.epoch_loss_sum / acc.num_processes if start else 0.0, device=acc.device)
        first = start // global_batch
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.epochs}", initial=first,
                   total=first + len(self.train_loader), disable=not acc.is_local_main_process, leave=False)
        for batch_index, (images, targets, indices) in enumerate(bar, start=first):
            loss, parts = self.train_step(images, targets, indices, epoch)
            if not self.started:
                self.start()
            window.add(loss, parts, images.shape[0], state.global_step)
            epoch_loss += loss.detach() * images.shape[0]
            done += global_batch
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            self._set_lr(epoch, done, epoch_samples)
            if state.global_step % self.log_every == 0:
                self._log_window(window, epoch)
                # Stop only where a log window closes: one agreement per window, and a resumed run logs the
                # same records as an uninterrupted one.
                if self.stop.agreed(acc):
                    state.step_in_epoch, state.samples_in_epoch = batch_index + 1, done
                    state.epoch_loss_sum = acc.reduce(epoch_loss.clone(), reduction="sum").item()
                    self.save_state(state)
                    raise Stopped()
        if window.count:
            self._log_window(window, epoch)
        mean_loss = acc.reduce(epoch_loss, reduction="sum").item() / max(done, 1)
        self.tracker.log({keys.TRAIN_EPOCH_LOSS: mean_loss, keys.EPOCH: epoch + 1}, step=state.global_step)

    def train_step(self, images, targets, indices, epoch: int) -> tuple[torch.Tensor, dict]:
        """One batch: forward, backward and (at the end of an accumulation) optimizer step. No host sync."""
        acc = self.accelerator
        parts_to_train = self.objective.trainable()
        with acc.accumulate(self.model, *([self.objective.forward_method] if parts_to_train else [])):
            teacher_logits = None
            if self.batch_transform is not None:
                images, teacher_logits = self.batch_transform(images, indices, epoch)
            _, loss, parts = self.objective(acc, self.model, images, targets, teacher_logits, epoch)
            acc.backward(loss)
            if acc.sync_gradients and self.clip_grad_norm > 0:
                params = [*self.model.parameters(), *(p for m in parts_to_train for p in m.parameters())]
                acc.clip_grad_norm_(params, self.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, parts

    def _log_window(self, window: "_Window", epoch: int) -> None:
        acc = self.accelerator
        values, bad_step = window.reduce(acc)
        if bad_step >= 0:
            raise UserError(
                f"loss became NaN/inf at step {bad_step + 1} (epoch {epoch + 1}); the last good checkpoint is "
                f"kept: lower --lr, add --clip-grad-norm, or use --mixed-precision bf16 instead of fp16")
        seconds = window.elapsed()
        self.images_seen += window.images * acc.num_processes
        self.train_seconds += seconds
        values[keys.TRAIN_LR] = self.schedule.get_last_lr()[0]
        values[keys.TRAIN_IMG_PER_S] = window.images * acc.num_processes / seconds
        values[keys.EPOCH] = epoch + 1
        self.tracker.log(values, step=self.state.global_step)
        window.reset()


class _Window:
    """Loss sums kept on the device between log steps, so the training step never waits on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.count, self.images, self.start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict, batch: int, step: int) -> None:
        for key, value in {keys.TRAIN_LOSS: loss, **parts}.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        finite = torch.isfinite(loss.detach())
        # `step` as a Python scalar: a tensor made from it would be a blocking host-to-device copy every step.
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, step, self.bad_step)
        self.count += 1
        self.images += batch

    def reduce(self, accelerator: Accelerator) -> tuple[dict, int]:
        """(mean of each loss over the window and all processes, first non-finite step or -1): one host sync."""
        names = list(self.sums)
        row = torch.stack([self.sums[n] / self.count for n in names] + [self.bad_step.float()])
        rows = accelerator.gather(row[None]) if accelerator.num_processes > 1 else row[None]
        means, bad = rows[:, :-1].mean(0).tolist(), rows[:, -1]
        bad = bad[bad >= 0]
        return dict(zip(names, means)), int(bad.min().item()) if bad.numel() else -1

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)
