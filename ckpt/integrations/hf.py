"""HF Trainer and accelerate: their checkpoints saved and resumed through ckpt, nothing pickled.

**Trainer.** ``CkptTrainerMixin`` (or ``CkptTrainer``, the mixin on ``transformers.Trainer``)
keeps the Trainer's own checkpoint life cycle (``checkpoint-<step>`` folders,
``trainer_state.json``, ``save_total_limit`` rotation, ``resume_from_checkpoint=True``, data
skipping on resume) and replaces what it writes with ``torch.save``: the model, optimizer,
scheduler, grad scaler and every process's RNG states go into one ckpt checkpoint,
``checkpoint-<step>/ckpt``, saved by every rank (sharded state stays sharded: model and
optimizer go through ``torch.distributed.checkpoint.state_dict``, so DDP and FSDP2 models
save their own shards and resume under another world size). Under DeepSpeed the Trainer's own
checkpointing runs unchanged (ckpt reads those in place). ``trainer.save_model()`` outside
checkpoints still writes transformers' own files, for ``from_pretrained``.

Trainer saves are asynchronous (``ckpt_async_save = False`` keeps them synchronous): training
stalls only while the state is snapshotted into host memory. Until the save commits, the whole
checkpoint (ckpt data, ``trainer_state.json``, whatever else the Trainer writes) sits in
``<output_dir>/ckpt-pending/checkpoint-<step>``, which neither ``resume_from_checkpoint=True`` nor
``save_total_limit`` rotation looks at; once committed it is renamed to ``checkpoint-<step>`` and
rotation runs. The pending save is waited for before the next save, a resume, loading the best
model and the end of ``train()``. A run killed mid-save resumes from the previous checkpoint; one
killed after the commit but before the rename has that checkpoint moved into place when
``train()`` starts again.

**accelerate.** Its ``save_state`` pickles optimizer, scheduler, sampler, RNG and custom states
(its pre-hooks see only the model weights), so :func:`save_state` / :func:`load_state` replace
the pair: every prepared model, optimizer, scheduler and data loader, the grad scaler, objects
registered with ``register_for_checkpointing`` and every process's RNG states, in one ckpt
checkpoint. Resuming mid-epoch stays the loop's business, as with accelerate: load, then
``accelerator.skip_first_batches``. For bitwise resumes give the data loader its own
``generator=``: creating an iterator otherwise draws from torch's global RNG, which the resumed
run does at another point of the stream than the saved one did.

transformers and accelerate are imported here only, so ``import ckpt`` needs neither.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..format import MANIFEST
from ..load import load
from ..options import LoadOptions, SaveOptions
from ..save import SaveHandle, async_save, save

# CkptTrainer is built by the module __getattr__ on first use (it subclasses transformers.Trainer)
__all__ = ["CKPT_DIR", "CkptTrainer", "CkptTrainerMixin", "load_state", "save_state"]  # noqa: F822

log = logging.getLogger(__name__)

CKPT_DIR = "ckpt"  # the ckpt checkpoint inside a Trainer's checkpoint-<step> folder
PENDING_DIR = "ckpt-pending"  # in output_dir: checkpoints whose async save has not committed (no "checkpoint-*")
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME


# --- what both share: RNG states, model and optimizer state dicts ----------------------------


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: Python, numpy (if installed), torch CPU and every CUDA
    device. Tensors, not JSON values: a checkpoint keeps every rank's tensors under per-rank keys,
    but only rank 0's values (docs/FORMAT.md), and each process has its own streams."""
    version, words, gauss = random.getstate()
    state = {
        "python": torch.tensor(words, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss is not None, gauss or 0.0], dtype=torch.float64),
        "cpu": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, key, pos, has_gauss, cached = np.random.get_state()
        assert kind == "MT19937", kind  # the legacy global generator's only kind
        state["numpy"] = torch.from_numpy(key.astype(np.int64))
        state["numpy_meta"] = torch.tensor([pos, has_gauss, cached], dtype=torch.float64)
    if torch.cuda.is_available():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Undo :func:`rng_state`."""
    version, has_gauss, gauss = state["python_meta"].tolist()
    random.setstate((int(version), tuple(state["python"].tolist()), gauss if has_gauss else None))
    torch.set_rng_state(state["cpu"])
    if "numpy" in state:
        import numpy as np

        pos, has_gauss, cached = state["numpy_meta"].tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    cuda = [state[f"cuda_{i}"] for i in range(sum(k.startswith("cuda_") for k in state))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's ``AcceleratedOptimizer`` wraps the torch optimizer as ``.optimizer``."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _owner(models: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The model whose parameters ``optimizer`` updates (its state is keyed by their names)."""
    first = next(p for g in optimizer.param_groups for p in g["params"])
    for model in models:
        if any(p is first for p in model.parameters()):
            return model
    raise ValueError("an optimizer updates parameters of none of the models; prepare its model with it")


def _load_rng(uri: str, key: str, options: LoadOptions) -> bool:
    """Set this process's RNG states from ``rng.<key>``; False when the checkpoint has none for it
    (saved by fewer processes), as the Trainer does without an RNG file."""
    target = {"rng": {key: rng_state()}}
    result = load(target, uri, strict=False, options=options)
    if any(k.startswith(f"rng.{key}.") for k in result.missing_keys):
        log.warning("%s: no RNG state for process %s; its random streams are not resumed", uri, key)
        return False
    set_rng_state(target["rng"][key])
    return True


# --- HF Trainer --------------------------------------------------------------------------------


def _ckpt_in(folder: str | None) -> str | None:
    """The ckpt checkpoint inside a Trainer checkpoint folder, if it holds one."""
    if folder is None:
        return None
    uri = os.path.join(folder, CKPT_DIR)
    return uri if os.path.exists(os.path.join(uri, MANIFEST)) else None


@dataclass
class _Pending:
    """A Trainer checkpoint whose async save has not been settled: where it is staged, where it goes."""

    handle: SaveHandle
    staged: str  # <run_dir>/ckpt-pending/checkpoint-<step>
    run_dir: str


def _publish(staged: str, run_dir: str) -> str:
    """Move a committed staged checkpoint folder to ``run_dir`` (its ``trainer_state.json``'s best
    checkpoint, if staged too, renamed with it); return its new path."""
    final = os.path.join(run_dir, os.path.basename(staged))
    state_file = os.path.join(staged, TRAINER_STATE)
    if os.path.exists(state_file):
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        best = state.get("best_model_checkpoint")
        if best is not None and os.path.dirname(best) == os.path.dirname(staged):
            state["best_model_checkpoint"] = os.path.join(run_dir, os.path.basename(best))
            with open(state_file + ".tmp", "w", encoding="utf-8") as f:
                f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
            os.replace(state_file + ".tmp", state_file)
    if os.path.exists(final):  # the step saved again: the Trainer overwrites its folder
        shutil.rmtree(final)
    os.rename(staged, final)
    try:
        os.rmdir(os.path.dirname(staged))  # the pending folder, once nothing else is staged
    except OSError:
        pass
    return final


def settle_staged(run_dir: str) -> list[str]:
    """Publish the committed checkpoints a killed run left in ``run_dir/ckpt-pending`` (ckpt data
    and ``trainer_state.json`` both there) and delete the rest; return those published."""
    pending = os.path.join(run_dir, PENDING_DIR)
    if not os.path.isdir(pending):
        return []
    published = []
    for name in sorted(os.listdir(pending)):
        staged = os.path.join(pending, name)
        if _ckpt_in(staged) is not None and os.path.exists(os.path.join(staged, TRAINER_STATE)):
            published.append(_publish(staged, run_dir))
        else:
            log.warning("%s: deleting a checkpoint whose save never committed", staged)
            shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(pending, ignore_errors=True)
    return published


class CkptTrainerMixin:
    """Mix into a ``transformers.Trainer`` (before it: ``class T(CkptTrainerMixin, Seq2SeqTrainer)``)
    so that its checkpoints are ckpt checkpoints; see the module docstring.

    ``ckpt_save_options`` / ``ckpt_load_options`` are ckpt's options (``overwrite`` defaults to
    True: the Trainer reuses a step's folder when it saves that step again). ``ckpt_async_save``
    (class or instance attribute): False saves synchronously, as does ``push_to_hub`` (it uploads
    the folder as soon as it is written)."""

    ckpt_save_options: SaveOptions = SaveOptions(overwrite=True)
    ckpt_load_options: LoadOptions = LoadOptions()
    ckpt_async_save: bool = True
    _ckpt_saving = False
    _ckpt_stage_dir: str | None = None  # while an async checkpoint save runs: where the Trainer writes it
    _ckpt_handle: SaveHandle | None = None
    _ckpt_pending: _Pending | None = None

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._ckpt_settle()
        # before the Trainer looks for the last checkpoint: publish what a killed run committed
        with self.args.main_process_first(local=not self.args.save_on_each_node, desc="ckpt: staged checkpoints"):
            if self.args.should_save:
                settle_staged(self.args.output_dir)
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            try:  # the snapshot taken is consistent: commit it, but raise what stopped training
                self._ckpt_settle(publish=self.args.world_size == 1)
            except Exception:
                log.exception("the checkpoint save in flight when training stopped failed")
            raise
        finally:
            self._ckpt_settle()

    def _ckpt_settle(self, block: bool = True, publish: bool = True) -> None:
        """Wait for the pending async save (``block=False``: only if already done), then publish
        its folder and rotate (the process that saves), as the Trainer does after a save.

        With several processes only at points they all reach (``block``), and after a barrier:
        the others still poll the staged folder for the commit until they are done. Without one
        (``publish=False``: a process stopped by an exception) the folder stays staged, for the
        next ``train()`` to publish."""
        pending, distributed = self._ckpt_pending, self.args.world_size > 1
        if pending is None or not (block or (pending.handle.done() and not distributed)):
            return
        self._ckpt_pending = None
        try:
            pending.handle.wait()  # committed on every rank, or raises why not
        except BaseException:
            if self.args.should_save and not distributed:
                shutil.rmtree(pending.staged, ignore_errors=True)
            raise
        if not publish:
            return
        if distributed:
            self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint
        if best is not None and os.path.dirname(best) == os.path.dirname(pending.staged):
            self.state.best_model_checkpoint = os.path.join(pending.run_dir, os.path.basename(best))
        if self.args.should_save:
            _publish(pending.staged, pending.run_dir)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=pending.run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        self._ckpt_settle(block=False)  # each step's end: publish a save that has committed meanwhile
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _finalize_training(self, *args: Any, **kwargs: Any) -> Any:
        self._ckpt_settle()  # before the best model is loaded and save_total_limit=1 deletes
        return super()._finalize_training(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        return self._ckpt_stage_dir or super()._get_output_dir(trial)

    # Saving: the Trainer calls save_model, then the optimizer/scaler/RNG savers, then writes
    # trainer_state.json and rotates. Within its checkpoint save, the first writes everything.
    # Asynchronously, all of it goes to the pending folder (its rotation there finds nothing
    # else to delete); _ckpt_settle publishes it once committed.

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.is_deepspeed_enabled:  # its engine checkpoints itself (ckpt reads those: ckpt.load, ckpt convert)
            log.warning("DeepSpeed checkpoints are written by DeepSpeed itself, not through ckpt")
            return super()._save_checkpoint(model, trial)
        self._ckpt_settle()
        run_dir = super()._get_output_dir(trial)
        if self.ckpt_async_save and not self.args.push_to_hub:
            self._ckpt_stage_dir = os.path.join(run_dir, PENDING_DIR)
        self._ckpt_saving = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._ckpt_saving, self._ckpt_stage_dir = False, None
            handle, self._ckpt_handle = self._ckpt_handle, None
        if handle is not None:
            staged = os.path.join(run_dir, PENDING_DIR, f"checkpoint-{self.state.global_step}")
            self._ckpt_pending = _Pending(handle, staged, run_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._ckpt_saving:
            return super().save_model(output_dir, _internal_call)
        self._ckpt_save(output_dir or self.args.output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._ckpt_saving:
            super()._save_optimizer_and_scheduler(output_dir)

    def _save_scaler(self, output_dir: str) -> None:
        if not self._ckpt_saving:
            super()._save_scaler(output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        if not self._ckpt_saving:
            super()._save_rng_state(output_dir)

    def _ckpt_save(self, folder: str) -> None:
        model = self.model_wrapped if self.is_fsdp_enabled else self.model
        state: dict[str, Any] = {"model": get_model_state_dict(model)}
        if not self.args.save_only_model:
            state.update(self._ckpt_training_state(model))
            state["rng"] = {str(self.args.process_index): rng_state()}
        uri = os.path.join(folder, CKPT_DIR)
        if self._ckpt_stage_dir is None:
            save(state, uri, step=self.state.global_step, options=self.ckpt_save_options)
            return
        os.makedirs(folder, exist_ok=True)  # the Trainer writes trainer_state.json there next
        self._ckpt_handle = async_save(state, uri, step=self.state.global_step, options=self.ckpt_save_options)

    def _ckpt_training_state(self, model: torch.nn.Module) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(model, _torch_optimizer(self.optimizer))
        if self.lr_scheduler is not None:
            state["scheduler"] = self.lr_scheduler.state_dict()
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    # Resuming: each loader the Trainer calls reads its part of the ckpt checkpoint, or defers
    # to transformers for a folder the Trainer wrote itself.

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._ckpt_settle()
        uri = _ckpt_in(resume_from_checkpoint)
        if uri is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._ckpt_load_model(model if model is not None else self.model, uri)

    def _load_best_model(self) -> None:
        self._ckpt_settle()
        self.accelerator.wait_for_everyone()  # the process that saves has published the folder
        uri = _ckpt_in(self.state.best_model_checkpoint)
        if uri is None:
            return super()._load_best_model()
        self._ckpt_load_model(self.model_wrapped if self.is_fsdp_enabled else self.model, uri)

    def _ckpt_load_model(self, model: torch.nn.Module, uri: str) -> None:
        target = {"model": get_model_state_dict(model)}
        load(target, uri, partial=True, options=self.ckpt_load_options)
        set_model_state_dict(model, target["model"])

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        uri = _ckpt_in(checkpoint)
        if uri is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        model = self.model_wrapped if self.is_fsdp_enabled else self.model
        target = self._ckpt_training_state(model)
        target.pop("scaler", None)  # _load_scaler's
        if not target:
            return
        load(target, uri, partial=True, options=self.ckpt_load_options)
        if "optimizer" in target:
            set_optimizer_state_dict(model, _torch_optimizer(self.optimizer), target["optimizer"])
        if "scheduler" in target:
            self.lr_scheduler.load_state_dict(target["scheduler"])

    def _load_scaler(self, checkpoint: str | None) -> None:
        uri = _ckpt_in(checkpoint)
        if uri is None:
            return super()._load_scaler(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            target = {"scaler": scaler.state_dict()}
            load(target, uri, partial=True, options=self.ckpt_load_options)
            scaler.load_state_dict(target["scaler"])

    def _load_rng_state(self, checkpoint: str | None) -> None:
        uri = _ckpt_in(checkpoint)
        if uri is None:
            return super()._load_rng_state(checkpoint)
        _load_rng(uri, str(self.args.process_index), self.ckpt_load_options)


def _trainer_class() -> type:
    from transformers import Trainer

    return type("CkptTrainer", (CkptTrainerMixin, Trainer), {"__module__": __name__, "__doc__": CKPT_TRAINER_DOC})


CKPT_TRAINER_DOC = "``transformers.Trainer`` whose checkpoints are ckpt checkpoints (``CkptTrainerMixin``)."


def __getattr__(name: str) -> Any:
    # CkptTrainer is built on first use, so importing this module (for accelerate) needs no transformers
    if name == "CkptTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- accelerate ---------------------------------------------------------------------------------


def _accelerator_state(accelerator: Any) -> tuple[dict[str, Any], list[torch.nn.Module]]:
    models = list(accelerator._models)
    state: dict[str, Any] = {"models": {str(i): get_model_state_dict(m) for i, m in enumerate(models)}}
    optimizers = [_torch_optimizer(o) for o in accelerator._optimizers]
    state["optimizers"] = {str(i): get_optimizer_state_dict(_owner(models, o), o) for i, o in enumerate(optimizers)}
    state["schedulers"] = {str(i): s.state_dict() for i, s in enumerate(accelerator._schedulers)}
    state["dataloaders"] = {str(i): _loader_state(d) for i, d in enumerate(accelerator._dataloaders)}
    state["custom"] = {str(i): o.state_dict() for i, o in enumerate(accelerator._custom_objects)}
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    state["step"] = accelerator.step
    return state, models


def _loader_state(loader: Any) -> dict[str, Any]:
    """Where a prepared data loader is in its epochs: its iteration count and, for accelerate's
    seedable sampler, the sampler's seed and epoch."""
    state = {"iteration": getattr(loader, "iteration", 0)}
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    if sampler is not None and hasattr(sampler, "initial_seed") and hasattr(sampler, "epoch"):
        state["sampler"] = {"initial_seed": sampler.initial_seed, "epoch": sampler.epoch}
    return state


def save_state(
    accelerator: Any,
    uri: str,
    step: int | None = None,
    metrics: dict[str, float] | None = None,
    options: SaveOptions | None = None,
) -> str:
    """``accelerator.save_state`` through ckpt: every prepared object's state, the scaler,
    registered custom objects and every process's RNG states, in one checkpoint at ``uri``.
    Call on every process. Returns the save id."""
    state, _ = _accelerator_state(accelerator)
    state["rng"] = {str(accelerator.process_index): rng_state()}
    return save(state, uri, step=step, metrics=metrics, options=options)


def load_state(accelerator: Any, uri: str, options: LoadOptions | None = None) -> Any:
    """``accelerator.load_state`` from a :func:`save_state` checkpoint, on every process, after
    ``accelerator.prepare`` with the same objects (any world size: model and optimizer states
    reshard). Returns the manifest (``.step``, ``.metrics``)."""
    options = options or LoadOptions()
    state, models = _accelerator_state(accelerator)
    manifest = load(state, uri, partial=True, options=options)
    for i, m in enumerate(models):
        set_model_state_dict(m, state["models"][str(i)])
    for i, o in enumerate(accelerator._optimizers):
        opt = _torch_optimizer(o)
        set_optimizer_state_dict(_owner(models, opt), opt, state["optimizers"][str(i)])
    for i, s in enumerate(accelerator._schedulers):
        s.load_state_dict(state["schedulers"][str(i)])
    for i, d in enumerate(accelerator._dataloaders):
        _set_loader_state(d, state["dataloaders"][str(i)])
    for i, o in enumerate(accelerator._custom_objects):
        o.load_state_dict(state["custom"][str(i)])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    accelerator.step = state["step"]
    _load_rng(uri, str(accelerator.process_index), options)
    return manifest


def _set_loader_state(loader: Any, state: dict[str, Any]) -> None:
    if hasattr(loader, "iteration"):
        loader.iteration = state["iteration"]
    sampler = loader.get_sampler() if hasattr(loader, "get_sampler") else None
    if "sampler" in state and sampler is not None and hasattr(sampler, "initial_seed"):
        sampler.initial_seed = state["sampler"]["initial_seed"]
        sampler.epoch = state["sampler"]["epoch"]
