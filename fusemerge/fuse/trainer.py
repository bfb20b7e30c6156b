"""`FusionTrainer`: transformers' Trainer with the FuseChat loss, and its two terms in the training log.

Why the Trainer: checkpoints, resume, schedules, gradient accumulation, mixed precision and accelerate
(DDP, DeepSpeed ZeRO, FSDP) come for free; the only thing it does not know is our loss, so `FusionTrainer`
overrides `compute_loss`, and `log` to show the loss's CLM and fusion terms apart, as distillation
trainers (TRL, DistillKit) do. The model is always called through its (possibly wrapped) forward, so
sharding wrappers see an ordinary step.

Two things every fusemerge training shares live here too, for the TRL trainers of implicit fusion as
well: `guard_divergence` (a NaN or Inf loss or gradient norm stops the run before that update is
applied, so no checkpoint or target of a diverged model is ever written) and `last_complete_checkpoint`
(what a resume may start from: never a checkpoint that a kill left half-written).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from fusemerge.checkpoint.layout import remove_path
from fusemerge.errors import FusemergeError
from fusemerge.fuse.loss import LossParts, fusion_loss

TRAINER_STATE = "trainer_state.json"  # transformers writes it last into a checkpoint folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FusionTrainer(Trainer):
    """transformers' Trainer with the sparse fusion loss (fusemerge.fuse.loss) as its loss."""

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        lambda_: float = 0.9,
        loss_kind: str = "ce",
        echo: Callable[[str], Any] = print,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        one_line_logs(self, echo)
        guard_divergence(self)
        # Releases without `loss_is_scaled_for_ga` (5.17, for one) skip the division by the accumulation
        # steps when the model's forward takes **kwargs; our loss never sees num_items_in_batch, so say no.
        self.model_accepts_loss_kwargs = False
        self.lambda_ = lambda_
        self.loss_kind = loss_kind
        # (CLM, fusion) summed over the training micro-batches since the last log line, and their count
        self._terms: torch.Tensor | None = None
        self._batches = 0

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The recipe's schedule, with a warm-up whose first step learns (`first_step_learns`)."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        if created and warmup > 0 and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.lr_lambdas = [first_step_learns(f, warmup) for f in scheduler.lr_lambdas]
            # LambdaLR set the learning rates of step 0 when it was made: set them again
            groups = scheduler.optimizer.param_groups
            for group, factor, base in zip(groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]
        return scheduler

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        parts = fusion_loss(
            outputs.logits,
            inputs["labels"],
            inputs.get("target_ids"),
            inputs.get("target_probs"),
            lambda_=self.lambda_,
            kind=self.loss_kind,  # type: ignore[arg-type]
        )
        if model.training:
            self._record(parts)
        return (parts.loss, outputs) if return_outputs else parts.loss

    def _record(self, parts: LossParts) -> None:
        """Add one micro-batch's two terms to the logging window (on the device: no sync per step)."""
        terms = torch.stack([parts.clm, parts.fusion]).float()
        self._terms = terms if self._terms is None else self._terms + terms
        self._batches += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log line, with `clm_loss` and `fusion_loss` next to `loss` on training steps.

        Each is the mean over the micro-batches since the last line, averaged over processes, the way the
        Trainer averages `loss`; so `lambda * clm_loss + (1 - lambda) * fusion_loss` is the logged `loss`
        (exactly, when every optimizer step of the window has as many micro-batches).
        They go wherever the Trainer's logs go: the console, `trainer_state.json`'s log_history, reporters.
        """
        if "loss" in logs and self._terms is not None:
            mean = nested_gather(self._terms / self._batches, self.args.parallel_mode)
            clm, fusion = mean.reshape(-1, 2).mean(0).tolist()
            logs = {"loss": logs["loss"], "clm_loss": clm, "fusion_loss": fusion, **logs}
            self._terms, self._batches = None, 0
        super().log(logs, start_time)


def first_step_learns(schedule: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    """A warm-up that starts above 0: step s < `warmup` takes the schedule's factor of step s + 1.

    transformers' warm-ups give step 0 the factor 0 / warmup, so the first optimizer step moves nothing
    (with `warmup_ratio: 0.03` of 25 steps the whole one-step warm-up is that step). Shifted by one, the
    warm-up rises 1/warmup, 2/warmup, ... to the peak on its last step; the steps after it are unchanged.
    """

    def factor(step: int) -> float:
        return schedule(step + 1) if step < warmup else schedule(step)

    return factor


def one_line_logs(trainer: Trainer, echo: Callable[[str], Any] = print) -> None:
    """Make `trainer` print each log as one `log_line`, where transformers prints a dict of strings
    (`{'loss': '1.761', ...}`): above its progress bar, or through `echo` without one."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressLines())
    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(LogLines(echo))


def log_line(step: int, steps: int, logs: Mapping[str, Any]) -> str:
    """One Trainer log as `step 10/25: loss 1.761, clm_loss 1.7, ...` (4 significant digits, no total_flos)."""
    parts = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "total_flos"
    ]
    return f"step {step}/{steps}: " + ", ".join(parts)


class LogLines(TrainerCallback):
    """Without progress bars: each log as one `log_line` through `echo` (the main process only)."""

    def __init__(self, echo: Callable[[str], Any] = print) -> None:
        self.echo = echo

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            self.echo(log_line(state.global_step, state.max_steps, logs))


class ProgressLines(ProgressCallback):
    """transformers' progress bar, with each log written above it as one `log_line`."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(log_line(state.global_step, state.max_steps, logs))


# ---------------------------------------------------------------- divergence


class DivergenceGuard(TrainerCallback):
    """Stop training at the first optimizer step whose loss or gradient norm is NaN or Inf.

    transformers logs such a step (`'loss': 0, 'grad_norm': nan`: its NaN filter hides the loss), applies
    it, and goes on to save an all-NaN model as a finished target. The guard checks just before the
    optimizer applies the step, so the model in memory and every checkpoint on disk are still the last
    good ones, and raises a `FusemergeError` naming the step and the cause: no target is published.

    The micro-batch losses since the last step are summed on the device (one sync per optimizer step);
    the gradient norm is the one the Trainer computed for clipping and the log. Under fp16 mixed precision
    an infinite gradient norm is the loss scaler's business (it skips that step), so only the loss counts.
    """

    def __init__(self) -> None:
        self._loss_sum: Any = None
        self._grad_norm: Any = None

    def observe_loss(self, loss: Any) -> None:
        value = loss.detach().float().sum()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def observe_grad_norm(self, norm: Any) -> None:
        self._grad_norm = norm

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        loss = None if self._loss_sum is None else float(self._loss_sum)
        norm = self._grad_norm
        if norm is None and kwargs.get("model") is not None:
            norm = _grad_norm(kwargs["model"])
        norm = None if norm is None else float(norm)
        self._loss_sum = self._grad_norm = None
        cause = None
        if loss is not None and not math.isfinite(loss):
            cause = f"the loss is {loss}" + (f" (gradient norm {norm:.4g})" if norm is not None else "")
        elif norm is not None and not math.isfinite(norm) and not args.fp16:
            cause = f"the gradient norm is {norm}" + (f" (loss {loss:.4g})" if loss is not None else "")
        if cause is not None:
            raise FusemergeError(diverged_message(state, cause, Path(args.output_dir)), file=args.output_dir)


def guard_divergence(trainer: Trainer) -> DivergenceGuard:
    """Install a `DivergenceGuard` on `trainer` (ours or TRL's): it sees each micro-batch's loss through
    `training_step` and the Trainer's gradient norm, and checks both before each optimizer step."""
    guard = DivergenceGuard()
    step = trainer.training_step

    def checked_step(*args: Any, **kwargs: Any) -> Any:
        loss = step(*args, **kwargs)
        guard.observe_loss(loss)
        return loss

    trainer.training_step = checked_step  # type: ignore[method-assign]
    norm_of = getattr(trainer, "_get_grad_norm", None)  # transformers 5.2x; else the guard computes it
    if callable(norm_of):

        def recorded_norm(*args: Any, **kwargs: Any) -> Any:
            norm = norm_of(*args, **kwargs)
            guard.observe_grad_norm(norm)
            return norm

        trainer._get_grad_norm = recorded_norm  # type: ignore[attr-defined]
    trainer.add_callback(guard)
    return guard


def diverged_message(state: Any, cause: str, checkpoints: Path) -> str:
    """`training diverged at step 3/25: the loss is nan; ...`: what stopped, what is kept, what to try."""
    last = last_complete_checkpoint(checkpoints=checkpoints, remove=False)
    kept = (
        f"the last good checkpoint {Path(last).name} is kept (a rerun resumes from it, and diverges again "
        "unless something changes)"
        if last
        else "no checkpoint was written before it"
    )
    return (
        f"training diverged at step {state.global_step + 1}/{state.max_steps}: {cause}; stopped before "
        f"applying that step, no target saved; {kept}: lower training.learning_rate or max_grad_norm, or "
        "check the data, the pivot and the teacher stores for NaN/Inf"
    )


def _grad_norm(model: Any) -> Any:
    """The total L2 norm of the gradients that `model`'s parameters hold (None when none holds one)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


# ---------------------------------------------------------------- checkpoints


def last_complete_checkpoint(
    *, checkpoints: Path, remove: bool = True, echo: Callable[[str], Any] | None = None
) -> str | None:
    """The newest checkpoint written to the end; newer, half-written ones are removed (with `remove`).

    transformers writes `checkpoint-N/` in place, its trainer state last: a kill -9, Ctrl-C or full disk
    while it writes leaves a folder that `get_last_checkpoint` picks, and every rerun fails to resume
    from it ("Can't find a valid checkpoint"). Complete means: its `trainer_state.json` reads as JSON.
    The one rule for explicit and implicit training; under a launcher the main process removes, first.

    Args:
        checkpoints: the Trainer's output folder (absent: nothing to resume).
        remove: delete the incomplete ones newer than the one returned.
        echo: where the line saying that a checkpoint was skipped goes.
    """
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))
    )
    for _, path in reversed(found):
        if _complete(path):
            return str(path)
        if echo is not None:
            echo(
                f"{path.name} is incomplete (interrupted while it was written: no readable {TRAINER_STATE})"
                + ("; removed, not resumed from" if remove else "; skipped")
            )
        if remove:
            remove_path(path)
    return None


def _complete(checkpoint: Path) -> bool:
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict)
