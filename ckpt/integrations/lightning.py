"""Lightning: a ``CheckpointIO`` plugin that saves and loads Trainer checkpoints with ckpt.

``Trainer(plugins=[ckpt.integrations.lightning.CkptCheckpointIO()])`` makes every checkpoint
Lightning writes (``ModelCheckpoint``, ``trainer.save_checkpoint``) a ckpt checkpoint: a
directory (or object-store prefix) at the path Lightning chose, committed atomically, every
block checksummed, nothing pickled. Lightning's usual contents round-trip: the model and
optimizer state, ``loops``, callback states, ``hyper_parameters`` (dicts, ``Namespace``),
scheduler state and the bookkeeping scalars.

Saves are asynchronous: ``save_checkpoint`` returns once the state is snapshotted (so
training goes on while it persists), a later save or ``teardown`` waits for the earlier one,
and ``remove_checkpoint`` of a checkpoint still being written waits for it first.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from ..catalog import delete, entry_at
from ..options import LoadOptions, SaveOptions
from ..save import SaveHandle, async_save
from ..tree import read

__all__ = ["CkptCheckpointIO"]


class CkptCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` backed by ckpt (see the module docstring).

    ``save_options`` / ``load_options`` are ckpt's; ``storage_options`` passed by Lightning
    to ``save_checkpoint`` are taken as fsspec options (credentials, endpoint).
    """

    def __init__(self, save_options: SaveOptions | None = None, load_options: LoadOptions | None = None) -> None:
        self.save_options = save_options or SaveOptions(overwrite=True)
        self.load_options = load_options or LoadOptions()
        self._pending: dict[str, SaveHandle] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        uri = os.fspath(path)
        self._wait(uri)
        options = self.save_options
        if storage_options:
            options = dataclasses.replace(options, storage_options=dict(storage_options))
        self._pending[uri] = async_save(checkpoint, uri, step=checkpoint.get("global_step"), options=options)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint as Lightning expects it: the saved dict, tensors on ``map_location``
        (a device or device string; CPU otherwise). ``weights_only`` changes nothing: ckpt never
        unpickles, so every load is as safe as ``weights_only=True``."""
        uri = os.fspath(path)
        self._wait(uri)
        device = map_location if isinstance(map_location, str | int) or hasattr(map_location, "type") else "cpu"
        return read(uri, device=device, options=self.load_options)

    def remove_checkpoint(self, path: Any) -> None:
        uri = os.fspath(path)
        self._wait(uri)
        entry = entry_at(uri, os.path.basename(uri.rstrip("/")), self.load_options.storage_options)
        if entry is not None:
            delete(entry, self.load_options.storage_options)

    def teardown(self) -> None:
        """Wait for every save still persisting (raises the first that failed)."""
        for uri in list(self._pending):
            self._wait(uri)

    def _wait(self, uri: str) -> None:
        handle = self._pending.pop(uri, None)
        if handle is not None:
            handle.wait()

