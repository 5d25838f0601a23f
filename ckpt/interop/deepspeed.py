"""DeepSpeed checkpoints (ZeRO 1/2/3, fp32/bf16, BF16_Optimizer; universal) read in place, parameter by parameter.

A DeepSpeed checkpoint directory holds tags (``global_step100/``...) and a
``latest`` file naming the newest. In a tag, ``*_model_states.pt`` hold the
module's weights (ZeRO 1/2; ZeRO 3 keeps empty placeholders), parameter shapes
in flattening order, frozen parameters and the engine's and client's state;
``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` hold rank R's partition
of each parameter group's flattened fp32 master weights and optimizer moments.
Every file is read with the safe unpickler (DeepSpeed's ``LossScaler``,
``ZeroStageEnum`` and ``fragment_address`` become records; no DeepSpeed code is
needed or run) and its tensors stay in the file until a region is asked for.

Where each parameter lies is computed, not copied:

- ZeRO 1/2 and ``BF16_Optimizer``: the ranks' partitions of a group, in rank
  order, concatenate to the group's flat buffer, in which the parameters follow
  each other in ``param_shapes`` order (plus any recorded alignment padding).
  A parameter is the flat range ``[offset, offset + numel)`` of that buffer,
  spanning one or more partition files. Checked against each rank's
  ``param_slice_mappings``.
- ZeRO 3: every parameter is split across all ranks, ``ceil(numel / world)``
  elements each (the last padded); rank R holds elements
  ``[R * n, (R + 1) * n)`` of each parameter at a running offset of its flat groups.

A region of a parameter is read as the pieces of those files that hold it: no
merged or temporary copy of a partition is ever made. A universal checkpoint
(``ds_to_universal``) holds one file per parameter and state (``zero/<name>/fp32.pt``...).

Keys: ``model.<name>`` (weights in the model's dtype, buffers and frozen
parameters included; under ZeRO 3, where the module's weights are not stored, the
fp32 master cast to the model's dtype, as DeepSpeed itself derives them),
``fp32.<name>`` (master weights), ``<state>.<name>`` for each optimizer state
(``exp_avg``, ``exp_avg_sq``, ``step``...); a tied weight (``shared_params``) has
both names under ``model.`` only, as the module's and the optimizer's state dicts do.
Values: ``deepspeed.<entry>`` (engine and client state from the model-states file) and ``optimizer.<entry>``
(``param_groups``, ``zero_stage``, loss scaler...), as JSON.
Tensor- or pipeline-parallel checkpoints (``mp_rank_01``..., ``layer_*``) are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..describe import check_json_value
from ..errors import UnsupportedValueError
from ..regions import Box, row_major_strides
from ..storage import open_storage
from .safe_pickle import LazyTensor, Record, to_plain
from .source import ForeignFormatError, Source, SourceInfo, TensorInfo
from .torchzip import TorchArchive

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
UNIVERSAL_DIR = "zero"
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_SKIP_VALUES = {
    "module",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "frozen_param_fragments",
    "shared_params",
    "buffer_names",
}


def looks_like_deepspeed(names: set[str]) -> bool:
    """A DeepSpeed root (``latest``) or tag directory (model or optimizer state files, or ``zero/``)."""
    if LATEST in names or LATEST_UNIVERSAL in names:
        return True
    return any(_MODEL.match(n) or _OPTIM.match(n) for n in names)


@dataclass(frozen=True)
class _Seg:
    """Elements [start, start + length) of a flat stored tensor."""

    src: LazyTensor
    start: int
    length: int


class _Flat:
    """A tensor whose row-major flattening is a sequence of pieces of stored flat tensors."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, segs: list[_Seg], cast: torch.dtype | None = None):
        self.shape, self.segs, self.cast = shape, segs, cast
        self.dtype = cast or dtype
        self.src_dtype = dtype
        self.bounds = [0]
        for s in segs:
            self.bounds.append(self.bounds[-1] + s.length)

    def read_flat(self, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop), each piece read straight into its place in one buffer."""
        out = torch.empty(stop - start, dtype=self.src_dtype)
        for s, lo in zip(self.segs, self.bounds):
            a, b = max(start, lo), min(stop, lo + s.length)
            if a < b:
                s.src.read_flat(s.start + a - lo, s.start + b - lo, out[a - start : b - start])
        return out

    def read(self, box: Box) -> torch.Tensor:
        if box.is_empty():
            return torch.empty(box.sizes, dtype=self.dtype)
        strides = row_major_strides(self.shape)
        first = sum(o * s for o, s in zip(box.offsets, strides))
        last = sum((e - 1) * s for e, s in zip(box.ends, strides))
        flat = self.read_flat(first, last + 1)
        out = flat.view(box.sizes) if last - first + 1 == box.numel else flat.as_strided(box.sizes, strides).clone()
        return out.to(self.cast) if self.cast else out


class _Whole:
    """A stored tensor read as it is (optionally cast)."""

    def __init__(self, t: LazyTensor, cast: torch.dtype | None = None) -> None:
        self.t, self.cast = t, cast
        self.shape, self.dtype = t.shape, cast or t.dtype

    def read(self, box: Box) -> torch.Tensor:
        out = self.t.read(box)
        return out.to(self.cast) if self.cast else out


def _cut(parts: list[LazyTensor], start: int, length: int, where: str) -> list[_Seg]:
    """Elements [start, start + length) of the concatenation of flat tensors ``parts``."""
    segs, at = [], 0
    for p in parts:
        n = p.numel
        a, b = max(start, at), min(start + length, at + n)
        if a < b:
            segs.append(_Seg(p, a - at, b - a))
        at += n
    if sum(s.length for s in segs) != length:
        raise ForeignFormatError(f"{where}: elements [{start}, {start + length}) lie past the partitions' {at}")
    return segs


def _int_list(x: Any) -> list[int]:
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


class DeepSpeedSource(Source):
    """A DeepSpeed checkpoint root (its ``latest`` tag), a tag directory, or a universal checkpoint."""

    format = "deepspeed"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.storage = open_storage(uri)
        self.tag = ""
        names = set(self.storage.listdir(""))
        prefix = ""
        if not any(_MODEL.match(n) for n in names):
            # the ZeRO checkpoint `latest` names comes first, as DeepSpeed loads it unless told otherwise
            marker = LATEST if LATEST in names or LATEST_UNIVERSAL not in names else LATEST_UNIVERSAL
            if marker not in names:
                tags = sorted(n for n in names if self.storage.fs.isdir(self.storage.path(n)))
                raise ForeignFormatError(
                    f"{uri}: no DeepSpeed model-states file and no {LATEST} file naming a tag; "
                    f"open one of its tag directories ({', '.join(tags) or 'none found'})"
                )
            self.tag = self.storage.read_bytes(marker).decode().strip()
            if not self.tag or "/" in self.tag or self.tag in (".", ".."):
                raise ForeignFormatError(f"{self.storage.uri_of(marker)}: names no tag ({self.tag!r})")
            prefix = self.tag + "/"
            try:
                names = set(self.storage.listdir(self.tag))
            except FileNotFoundError:
                names = set()
            if not names:
                raise ForeignFormatError(f"{self.storage.uri_of(marker)}: tag {self.tag!r} is not in {uri}")
        self.prefix = prefix
        self._entries: dict[str, _Flat | _Whole] = {}
        self._values: dict[str, Any] = {}
        self._archives: dict[str, TorchArchive] = {}
        model_files = sorted((n for n in names if _MODEL.match(n)), key=lambda n: int(_MODEL.match(n).group(1) or 0))
        if any(int(_MODEL.match(n).group(2)) for n in model_files) or any(n.startswith("layer_") for n in names):
            raise ForeignFormatError(
                f"{uri}: a tensor- or pipeline-parallel DeepSpeed checkpoint (mp_rank_01... or layer_* files); "
                "only data-parallel (ZeRO) checkpoints are read: convert it with ds_to_universal first"
            )
        if not model_files:
            raise ForeignFormatError(f"{self.storage.uri_of(prefix)}: no *_model_states.pt file")
        self.models = [self._open(n) for n in model_files]
        top = self.models[0]
        if not isinstance(top, dict) or not isinstance(top.get("module"), dict):
            raise ForeignFormatError(f"{self._where(model_files[0])}: not a DeepSpeed model-states file (no module)")
        self.universal = UNIVERSAL_DIR in names
        if self.universal:
            self.stage = "universal"
            self._read_universal()
        else:
            optim = sorted((n for n in names if _OPTIM.match(n)), key=lambda n: int(_OPTIM.match(n).group(2)))
            self._read_zero(optim)
        self._add_model(top)
        self._values.update(self._json_values("deepspeed", {k: v for k, v in top.items() if k not in _SKIP_VALUES}))
        self._tensors = {k: TensorInfo(tuple(e.shape), e.dtype) for k, e in sorted(self._entries.items())}

    # ---- files ------------------------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return self.storage.uri_of(self.prefix + name)

    def _open(self, name: str) -> Any:
        arc = TorchArchive(self.storage, self.prefix + name)
        self._archives[name] = arc
        return arc.obj

    def _json_values(self, prefix: str, entries: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in entries.items():
            key = f"{prefix}.{k}"
            v = _small_tensors(to_plain(v), key)
            try:
                check_json_value(key, v)
            except UnsupportedValueError as e:
                raise ForeignFormatError(f"{self.uri}: {e}") from None
            out[key] = v
        return out

    # ---- ZeRO partitions --------------------------------------------------------------------------------------

    def _read_zero(self, optim_names: list[str]) -> None:
        if not optim_names:
            raise ForeignFormatError(f"{self.storage.uri_of(self.prefix)}: no *_optim_states.pt files")
        osds = []
        for n in optim_names:
            sd = self._open(n)
            osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
            if not isinstance(osd, dict):
                raise ForeignFormatError(f"{self._where(n)}: not a DeepSpeed optimizer-states file")
            osds.append(osd)
        first = osds[0]
        stage_rec = first.get("zero_stage")
        stage = stage_rec.value if isinstance(stage_rec, Record) else stage_rec
        bf16_optimizer = stage is None and "single_partition_of_fp32_groups" in first
        world = max(_int_list(first.get("partition_count", len(osds))))
        if world != len(osds):
            raise ForeignFormatError(
                f"{self.storage.uri_of(self.prefix)}: partition_count is {world} but {len(osds)} optimizer "
                "files are present (a save that did not finish, or files of another save mixed in)"
            )
        self.world = world
        if stage == 3:
            self.stage = "3"
            self._zero3(optim_names, osds)
        elif stage in (1, 2) or bf16_optimizer:
            self.stage = "bf16_optimizer" if bf16_optimizer else str(stage)
            self._zero12(optim_names, osds)
        else:
            raise ForeignFormatError(f"{self._where(optim_names[0])}: unknown ZeRO stage {stage!r}")
        values = {k: v for k, v in first.items() if not _has_tensor(v) or k == "base_optimizer_state"}
        groups = _param_groups(first)
        values.pop("base_optimizer_state", None)
        values.pop("optimizer_state_dict", None)
        values.pop("param_slice_mappings", None)
        values["param_groups"] = groups
        self._values.update(self._json_values("optimizer", values))

    def _param_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        shapes = self.models[0].get("param_shapes")
        if not isinstance(shapes, list) or not all(isinstance(g, dict) for g in shapes):
            raise ForeignFormatError(f"{self.uri}: model states have no param_shapes list")
        return [{k: tuple(int(s) for s in v) for k, v in g.items()} for g in shapes]

    def _zero12(self, names: list[str], osds: list[dict]) -> None:
        shapes = self._param_shapes()
        flats = [osd["single_partition_of_fp32_groups"] for osd in osds]
        states = [_group_states(osd.get("base_optimizer_state"), self._where(n)) for osd, n in zip(osds, names)]
        paddings = osds[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            parts = [f[g] for f in flats]
            offsets = {}
            at = 0
            for i, (name, shape) in enumerate(group.items()):
                offsets[name] = at
                at += math.prod(shape)
                if paddings is not None:
                    at += int(paddings[g][i])
            total = sum(p.numel for p in parts)
            if at > total:
                raise ForeignFormatError(
                    f"{self.uri}: parameter group {g} needs {at} elements, its partitions hold {total}"
                )
            self._check_slices(names, osds, g, parts, offsets, group)
            for name, shape in group.items():
                n = math.prod(shape)
                where = f"{self.uri}: {name}"
                self._entries[f"fp32.{name}"] = _Flat(shape, parts[0].dtype, _cut(parts, offsets[name], n, where))
                for sname, per_rank in _state_tensors(states, g, parts, where).items():
                    if per_rank is None:  # a scalar state (step): rank 0's
                        self._entries[f"{sname}.{name}"] = _Whole(states[0][g][sname])
                        continue
                    segs = _cut(per_rank, offsets[name], n, where)
                    self._entries[f"{sname}.{name}"] = _Flat(shape, per_rank[0].dtype, segs)

    def _check_slices(self, names, osds, g, parts, offsets, group) -> None:
        """Each rank's own record of where its fragments lie must agree with the layout computed."""
        start = 0
        for r, (osd, part) in enumerate(zip(osds, parts)):
            mappings = osd.get("param_slice_mappings")
            if not isinstance(mappings, list) or g >= len(mappings):
                return
            for name, frag in mappings[g].items():
                if name not in group or not isinstance(frag, Record):
                    continue
                lo = max(offsets[name], start)
                want = (lo - start, min(offsets[name] + math.prod(group[name]), start + part.numel) - lo)
                got = (frag.get("start"), frag.get("numel"))
                if got != want:
                    raise ForeignFormatError(
                        f"{self._where(names[r])}: {name} is recorded at partition elements {got[0]}+{got[1]}, "
                        f"the layout puts it at {want[0]}+{want[1]}"
                    )
            start += part.numel

    def _zero3(self, names: list[str], osds: list[dict]) -> None:
        shapes = self._param_shapes()
        world = self.world
        flats = [osd["fp32_flat_groups"] for osd in osds]
        states = [_group_states(osd.get("optimizer_state_dict"), self._where(n)) for osd, n in zip(osds, names)]
        ngroups = len(flats[0])
        state_names = [k for k, v in states[0][0].items() if v.numel == flats[0][0].numel] if ngroups else []
        scalar_names = [k for k, v in states[0][0].items() if v.numel == 1 and v.shape == ()] if ngroups else []
        at = 0
        bounds = [0]
        for f in flats[0]:
            bounds.append(bounds[-1] + f.numel)
        model_dtype = {k: v.dtype for k, v in self.models[0]["module"].items() if isinstance(v, LazyTensor)}
        for group in shapes:
            for name, shape in group.items():
                n = math.prod(shape)
                pn = math.ceil(n / world)
                where = f"{self.uri}: {name}"
                g = next((i for i in range(ngroups) if bounds[i] <= at < bounds[i + 1]), None)
                if g is None:
                    raise ForeignFormatError(f"{where}: lies past the flat groups ({bounds[-1]} elements per rank)")

                def segs(pick: Callable[[int], list[LazyTensor]], n=n, pn=pn, at=at, where=where) -> list[_Seg]:
                    out = []
                    for r in range(world):
                        if r * pn < n:
                            out += _cut(pick(r), at, min(pn, n - r * pn), where)
                    return out

                self._entries[f"fp32.{name}"] = _Flat(shape, flats[0][0].dtype, segs(lambda r: flats[r]))
                if name in model_dtype and model_dtype[name] != flats[0][0].dtype:
                    self._entries[f"model.{name}"] = _Flat(
                        shape, flats[0][0].dtype, segs(lambda r: flats[r]), cast=model_dtype[name]
                    )
                else:
                    self._entries[f"model.{name}"] = self._entries[f"fp32.{name}"]
                for s in state_names:
                    per_rank = [[states[r][gi][s] for gi in range(ngroups)] for r in range(world)]
                    self._entries[f"{s}.{name}"] = _Flat(
                        shape, per_rank[0][0].dtype, segs(lambda r, p=per_rank: p[r])
                    )
                for s in scalar_names:
                    self._entries[f"{s}.{name}"] = _Whole(states[0][g][s])
                at += pn
        if at != bounds[-1]:
            raise ForeignFormatError(f"{self.uri}: parameters take {at} elements per rank, flat groups {bounds[-1]}")

    # ---- universal checkpoints --------------------------------------------------------------------------------

    def _read_universal(self) -> None:
        zero = self.prefix + UNIVERSAL_DIR
        for name in sorted(self.storage.listdir(zero)):
            if name == "optimizer_state.pt":
                osd = TorchArchive(self.storage, f"{zero}/{name}").obj
                if isinstance(osd, dict):
                    values = {k: v for k, v in osd.items() if not _has_tensor(v)}
                    self._values.update(self._json_values("optimizer", values))
                continue
            try:
                files = self.storage.listdir(f"{zero}/{name}")
            except (FileNotFoundError, NotADirectoryError):
                continue
            for f in sorted(files):
                if not f.endswith(".pt"):
                    continue
                obj = TorchArchive(self.storage, f"{zero}/{name}/{f}").obj
                t = obj.get("param") if isinstance(obj, dict) else obj
                if not isinstance(t, LazyTensor):
                    raise ForeignFormatError(f"{self.storage.uri_of(f'{zero}/{name}/{f}')}: holds no tensor")
                self._entries[f"{f[:-3]}.{name}"] = _Whole(t)

    # ---- model states -----------------------------------------------------------------------------------------

    def _add_model(self, top: dict) -> None:
        module = top["module"]
        zero3 = self.stage == "3" or (self.universal and len(self.models) > 1)
        for name, t in module.items():
            if not isinstance(t, LazyTensor):
                continue
            if zero3 and t.numel == 0 and f"model.{name}" not in self._entries:
                fp32 = self._entries.get(f"fp32.{name}")
                if isinstance(fp32, _Whole):  # universal ZeRO 3: the master cast, as DeepSpeed would
                    cast = t.dtype if t.dtype != fp32.t.dtype else None
                    self._entries[f"model.{name}"] = _Whole(fp32.t, cast=cast)
                continue
            if not zero3 or t.numel:  # under ZeRO 3 only buffers are stored whole in the module
                self._entries[f"model.{name}"] = _Whole(t)
        frozen = top.get("frozen_param_shapes") or {}
        for name, shape in frozen.items():
            shape = tuple(int(s) for s in shape)
            frags = [m.get("frozen_param_fragments", {}).get(name) for m in self.models]
            if not all(isinstance(f, LazyTensor) for f in frags):
                raise ForeignFormatError(f"{self.uri}: frozen parameter {name} has no stored fragment")
            n = math.prod(shape)
            if frags[0].numel == n:
                self._entries[f"model.{name}"] = _Flat(shape, frags[0].dtype, [_Seg(frags[0], 0, n)])
            else:  # ZeRO 3: one padded fragment per rank
                segs = _cut(frags, 0, n, f"{self.uri}: {name}")
                self._entries[f"model.{name}"] = _Flat(shape, frags[0].dtype, segs)
        # tied weights: the module's state dict has both names; the optimizer state only the owner's
        for alias, target in (top.get("shared_params") or {}).items():
            src = self._entries.get(f"model.{target}")
            if src is not None and f"model.{alias}" not in self._entries:
                self._entries[f"model.{alias}"] = src

    # ---- Source -----------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def values(self) -> dict[str, Any]:
        return dict(self._values)

    def info(self) -> SourceInfo:
        steps = self._values.get("deepspeed.global_steps")
        meta = {"source_format": "deepspeed", "zero_stage": self.stage}
        if self.tag:
            meta["tag"] = self.tag
        return SourceInfo(step=steps if isinstance(steps, int) else None, metadata=meta)

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        e = self._entries[key]
        return e.read(box or Box.full(tuple(e.shape)))

    def close(self) -> None:
        for a in self._archives.values():
            a.close()
        self._archives = {}


def _has_tensor(v: Any) -> bool:
    if isinstance(v, LazyTensor):
        return True
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_tensor(x) for x in v)
    return False


def _small_tensors(v: Any, key: str) -> Any:
    """Values may carry small tensors (a scheduler's counters): kept as lists; a large one is an error."""
    if isinstance(v, LazyTensor):
        if v.numel > 1024:
            raise ForeignFormatError(f"{key}: a tensor of shape {list(v.shape)} inside a value")
        return v.read().tolist()
    if isinstance(v, dict):
        return {k: _small_tensors(x, f"{key}.{k}") for k, x in v.items()}
    if isinstance(v, list):
        return [_small_tensors(x, f"{key}.{i}") for i, x in enumerate(v)]
    return v


def _param_groups(osd: dict) -> Any:
    for holder in ("base_optimizer_state", "optimizer_state_dict"):
        inner = osd.get(holder)
        if isinstance(inner, dict) and "param_groups" in inner:
            return inner["param_groups"]
    return None


def _group_states(opt: Any, where: str) -> list[dict[str, LazyTensor]]:
    """Per parameter group, the optimizer's state tensors (each a flat partition, or a scalar such as step)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
        raise ForeignFormatError(f"{where}: no optimizer state")
    state = opt["state"]
    out = []
    for g in sorted(state):
        entries = state[g]
        if not isinstance(entries, dict):
            raise ForeignFormatError(f"{where}: optimizer state of group {g} is not a dict")
        out.append({k: v for k, v in entries.items() if isinstance(v, LazyTensor)})
    return out


def _state_tensors(
    states: list[list[dict[str, LazyTensor]]], g: int, parts: list[LazyTensor], where: str
) -> dict[str, list[LazyTensor] | None]:
    """For group ``g``: each state partitioned like the master weights (per-rank tensors), or a scalar (None)."""
    if g >= len(states[0]):
        return {}
    out: dict[str, list[LazyTensor] | None] = {}
    for name, t in states[0][g].items():
        if t.shape == ():
            out[name] = None
            continue
        per_rank = [s[g].get(name) for s in states]
        # the last rank's master partition is stored without its padding, its moments with it
        if any(p is None or p.numel < part.numel or (p.numel != part.numel and r < len(parts) - 1)
               for r, (p, part) in enumerate(zip(per_rank, parts))):
            raise ForeignFormatError(f"{where}: optimizer state {name!r} is not partitioned like the master weights")
        out[name] = per_rank  # type: ignore[assignment]
    return out
