"""``python -m ckpt.demo`` (``make demo``): train, get killed mid-save, resume elsewhere, merge.

A small transformer is trained with FSDP2 on CPU gloo ranks; ``ckpt.Manager``
hands a snapshot to a node-local ``ckpt-server`` every few steps. The job is
SIGKILLed right after handing over a save, so that save is in flight; it is
resumed on another number of ranks from the newest complete checkpoint (from
the daemon's RAM tier), trained to the end, and its last checkpoints are
merged. The report gives the stall per save, checkpoint sizes, the step
resumed from, loss continuity across the kill, and the merged model's
held-out loss against the last checkpoint's.

Modules: ``model`` (the transformer, synthetic data, schedule), ``train`` (one
rank), ``launch`` (ranks and daemon processes), ``story`` (the phases and
their invariants), ``report``, ``cli``.
"""

from .cli import main
from .model import ModelConfig
from .report import report
from .story import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "ModelConfig", "main", "report", "run_demo"]
