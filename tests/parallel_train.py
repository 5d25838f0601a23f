"""One small llama-like model with an MoE layer, trained under each parallelism real jobs use.

Every layout builds the same model from a seed, trains it with AdamW on the same
batches and exposes its model and optimizer state under the same flat keys
(``model.<fqn>``, ``optim.<fqn>.{step,exp_avg,exp_avg_sq}``), each the way its
framework lays it out:

* ``fsdp_tp``: FSDP2 over TP on a (dp=2, tp=2) mesh with torchtitan's llama plan
  (colwise wq/wk/wv/w1/w3, rowwise wo/w2, sequence-parallel norms, rowwise
  embedding, colwise output; the MoE block computes replicated over TP), a
  ``fully_shard`` per block and at the root: column-parallel weights get
  ``_StridedShard``;
* ``hsdp``: ``fully_shard`` on a (replicate=2, shard=2) mesh;
* ``pp_fsdp``: two pipeline stages (``torch.distributed.pipelining``, GPipe, 2
  microbatches), each holding a different subset of the keys, FSDP2 over dp=2 in
  each stage;
* ``ep``: expert parallel over 4 ranks (one expert per rank, ``Shard(0)`` DTensors
  left out of FSDP; tokens all-gathered to the experts and their outputs
  reduce-scattered back), FSDP2 over 4 ranks for everything else;
* ``megatron``: TP=2 x DP=2 by hand, as Megatron-LM lays it out: vocab-parallel
  embedding and output, fused local QKV and gate/up weights, and a distributed
  optimizer whose AdamW state is a flat partition of each rank's flattened local
  parameters, all described with ``ckpt.Sharded`` (boxes, flat ranges of boxes);
* ``plain``: one rank, plain tensors.

Model, optimizer and DCP state-dict helpers are torch's own; only the Megatron
layout and the expert dispatch are written here, as those frameworks do by hand.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

import ckpt

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, EXPERTS, TOPK = 64, 32, 4, 2, 8, 48, 4, 2
SEQ, BATCH = 8, 8
LR, WEIGHT_DECAY = 1e-2, 0.01


# ---------------------------------------------------------------- the model (torchtitan's llama shape)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under TP the projections return this rank's heads: sizes come from the tensors.
        return self.wo(attend(self.wq(x), self.wk(x), self.wv(x)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, s = q.shape[:2]
    q, k, v = (t.reshape(b, s, -1, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
        self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, EXPERTS, bias=False)


class GroupedExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(EXPERTS, HIDDEN, DIM) * 0.1)
        self.w2 = nn.Parameter(torch.randn(EXPERTS, DIM, HIDDEN) * 0.1)
        self.w3 = nn.Parameter(torch.randn(EXPERTS, HIDDEN, DIM) * 0.1)


def route(gate_w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts of each token and their softmax weights."""
    return F.softmax(t @ gate_w.T, dim=-1).topk(TOPK, dim=-1)


def run_experts(t, weights, chosen, first: int, w1, w2, w3) -> torch.Tensor:
    """Sum over the experts ``first, first+1, ...`` held here of their weighted outputs."""
    y = torch.zeros_like(t)
    for j in range(w1.shape[0]):
        gate = (weights * (chosen == first + j)).sum(-1)
        rows = gate.nonzero().squeeze(1)
        if rows.numel():
            x = t[rows]
            out = (F.silu(x @ w1[j].T) * (x @ w3[j].T)) @ w2[j].T
            y = y.index_add(0, rows, gate[rows, None] * out)
    return y


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router()
        self.experts = GroupedExperts()
        self.ep_group: dist.ProcessGroup | None = None  # set by the expert-parallel layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        t = x.reshape(-1, shape[-1])
        weights, chosen = route(self.router.gate.weight, t)
        e = self.experts
        if self.ep_group is None:
            return run_experts(t, weights, chosen, 0, e.w1, e.w2, e.w3).view(shape)
        # Expert parallel: every rank's tokens go to every rank's experts (all-gather dispatch);
        # each rank's outputs for all tokens are summed back to the tokens' ranks (reduce-scatter).
        g = self.ep_group
        w1, w2, w3 = e.w1.to_local(), e.w2.to_local(), e.w3.to_local()
        all_t = funcol.all_gather_single_autograd(t, 0, g)
        all_w = funcol.all_gather_single_autograd(weights, 0, g)
        all_c = funcol.wait_tensor(funcol.all_gather_single(chosen, 0, g))
        first = dist.get_rank(g) * w1.shape[0]
        y = run_experts(all_t, all_w, all_c, first, w1, w2, w3)
        return funcol.reduce_scatter_single_autograd(y, "sum", 0, g).view(shape)


class Block(nn.Module):
    def __init__(self, moe: bool) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(DIM, eps=1e-6)
        self.attention = Attention()
        self.ffn_norm = nn.RMSNorm(DIM, eps=1e-6)
        if moe:
            self.moe = MoE()
        else:
            self.feed_forward = FeedForward()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        ffn = self.moe if hasattr(self, "moe") else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """Layer 0 dense, layer 1 MoE. Parts may be None: a pipeline stage holds some of them."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({"0": Block(moe=False), "1": Block(moe=True)})
        self.norm = nn.RMSNorm(DIM, eps=1e-6)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h


def make_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (step -1: the probe batch): inputs and next-token targets."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)


def mean_over_world(value: float, weight: float = 1.0) -> float:
    """Mean over ranks of ``value``, counting each rank ``weight`` times (0: not at all)."""
    t = torch.tensor([value * weight, weight], dtype=torch.float64)
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


# ---------------------------------------------------------------- layouts on torch's own APIs


class DCPLayout:
    """A layout whose model and optimizer are torch modules: state through get/set_state_dict."""

    model: nn.Module
    opt: torch.optim.Optimizer
    dp_rank: int
    dp_size: int

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch(step)
        n = BATCH // self.dp_size
        return x[self.dp_rank * n : (self.dp_rank + 1) * n], y[self.dp_rank * n : (self.dp_rank + 1) * n]

    def train_step(self, step: int) -> float:
        x, y = self.local_batch(step)
        loss = loss_fn(self.model(x), y)
        loss.backward()
        self.after_backward()
        self.opt.step()
        self.opt.zero_grad()
        return mean_over_world(loss.item())

    def after_backward(self) -> None:
        pass

    @torch.no_grad()
    def probe_loss(self) -> float:
        x, y = self.local_batch(-1)
        return mean_over_world(loss_fn(self.model(x), y).item())

    def state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd["state"]}

    def restore(self, state: dict) -> None:
        groups = get_state_dict(self.model, self.opt)[1]["param_groups"]
        set_state_dict(
            self.model,
            self.opt,
            model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"], "param_groups": groups},
        )


class Plain(DCPLayout):
    def __init__(self, seed: int) -> None:
        self.model = make_model(seed)
        self.opt = adamw(self.model.parameters())
        self.dp_rank, self.dp_size = 0, 1


def tp_plan(model: Transformer, tp_mesh) -> None:
    """torchtitan's llama3 tensor/sequence-parallel plan (apply_tp), plus its MoE input/output layouts."""
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True),
        },
    )
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if hasattr(block, "moe"):  # the experts compute whole on each TP rank, on the whole sequence
            plan["moe"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )
            parallelize_module(
                block.moe,
                tp_mesh,
                PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),)),
            )
        else:
            plan.update(
                {
                    "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                    "feed_forward.w1": ColwiseParallel(),
                    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                    "feed_forward.w3": ColwiseParallel(),
                }
            )
        parallelize_module(block, tp_mesh, plan)


def fsdp(model: Transformer, mesh, ignored: set | None = None) -> None:
    """torchtitan's apply_fsdp: one FSDP unit per block, then the root."""
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


class FsdpTp(DCPLayout):
    def __init__(self, seed: int) -> None:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        self.model = make_model(seed)
        tp_plan(self.model, mesh["tp"])
        fsdp(self.model, mesh["dp"])
        self.opt = adamw(self.model.parameters())
        self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), 2


class Hsdp(DCPLayout):
    def __init__(self, seed: int) -> None:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        self.model = make_model(seed)
        fsdp(self.model, mesh)
        self.opt = adamw(self.model.parameters())
        self.dp_rank, self.dp_size = dist.get_rank(), 4


class ExpertParallel(DCPLayout):
    def __init__(self, seed: int) -> None:
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))
        self.model = make_model(seed)
        moe = self.model.layers["1"].moe
        for name in ("w1", "w2", "w3"):  # EXPERTS / 4 experts per rank
            full = getattr(moe.experts, name).detach()
            setattr(moe.experts, name, nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])))
        moe.ep_group = mesh.get_group()
        self.experts = set(moe.experts.parameters())
        fsdp(self.model, mesh, ignored=self.experts)
        self.opt = adamw(self.model.parameters())
        self.dp_rank, self.dp_size = dist.get_rank(), 4

    def after_backward(self) -> None:
        # Expert gradients sum every rank's loss (FSDP averages the others): average them too.
        for p in self.experts:
            p.grad.div_(self.dp_size)


class PipelineFsdp(DCPLayout):
    MICROBATCHES = 2

    def __init__(self, seed: int) -> None:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        self.stage_index = mesh.get_local_rank("pp")
        self.model = make_model(seed)
        if self.stage_index == 0:  # torchtitan's splitting: drop what the other stage holds
            del self.model.layers["1"]
            self.model.norm = self.model.output = None
        else:
            del self.model.layers["0"]
            self.model.tok_embeddings = None
        fsdp(self.model, mesh["dp"])
        self.opt = adamw(self.model.parameters())
        self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), 2
        stage = PipelineStage(self.model, self.stage_index, 2, torch.device("cpu"), group=mesh.get_group("pp"))
        self.schedule = ScheduleGPipe(stage, n_microbatches=self.MICROBATCHES, loss_fn=loss_fn)

    def _run(self, step: int, train: bool) -> float:
        x, y = self.local_batch(step)
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        if self.stage_index == 0:
            run(x)
        else:
            run(target=y, losses=losses)
        last = self.stage_index == 1
        return mean_over_world(torch.stack(losses).mean().item() if last else 0.0, 1.0 if last else 0.0)

    def train_step(self, step: int) -> float:
        loss = self._run(step, train=True)
        self.opt.step()
        self.opt.zero_grad()
        return loss

    @torch.no_grad()
    def probe_loss(self) -> float:
        return self._run(-1, train=False)


# ---------------------------------------------------------------- Megatron-style TP + distributed optimizer


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient over TP backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward, this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        r = dist.get_rank(ctx.group)
        return g[..., r * ctx.n : (r + 1) * ctx.n].contiguous(), None


class Megatron:
    """TP=2 x DP=2 written by hand, with Megatron-LM's layout of state.

    Local parameters: vocab-parallel ``emb`` and ``out`` (rows), fused ``qkv`` (this
    rank's q heads, then its kv heads: [q_r; k_r; v_r]) and fused ``fc1`` ([w1_r; w3_r])
    column-parallel, ``wo`` and ``fc2`` row-parallel (columns), norms, router and
    experts whole. Each canonical key is a box of one local parameter (a row range of
    it), so a fused weight is three or two boxes. The distributed optimizer flattens
    the local parameters into one buffer, and DP rank d owns the d-th half of it: its
    AdamW state for a key is the flat range of that key's box that falls in the half.
    """

    def __init__(self, seed: int) -> None:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        self.tp_group, self.dp_group = mesh.get_group("tp"), mesh.get_group("dp")
        self.tp, self.dp = mesh.get_local_rank("tp"), mesh.get_local_rank("dp")
        full = {k: v.detach() for k, v in make_model(seed).state_dict().items()}
        tp = self.tp
        qh, kh, hh, vh = HEADS * HEAD_DIM // 2, KV_HEADS * HEAD_DIM // 2, HIDDEN // 2, VOCAB // 2
        local: dict[str, torch.Tensor] = {}
        # key -> (local parameter, first row, global offsets, sizes): the key's box of the
        # global tensor is rows [first, first + sizes[0]) of the local parameter.
        self.regions: dict[str, tuple[str, int, tuple[int, ...], tuple[int, ...]]] = {}

        def whole(name: str, key: str) -> None:
            local[name] = full[key]
            self.regions[key] = (name, 0, (0,) * full[key].dim(), tuple(full[key].shape))

        def rows(name: str, keys: list[str], per: list[int]) -> None:
            at, parts = 0, []
            for key, n in zip(keys, per):
                parts.append(full[key][tp * n : (tp + 1) * n])
                self.regions[key] = (name, at, (tp * n, 0), tuple(parts[-1].shape))
                at += n
            local[name] = torch.cat(parts)

        def cols(name: str, key: str, n: int) -> None:
            local[name] = full[key][:, tp * n : (tp + 1) * n]
            self.regions[key] = (name, 0, (0, tp * n), tuple(local[name].shape))

        rows("emb", ["tok_embeddings.weight"], [vh])
        for i in ("0", "1"):
            p = f"layers.{i}."
            whole(f"{i}.attn_norm", p + "attention_norm.weight")
            rows(f"{i}.qkv", [f"{p}attention.{w}.weight" for w in ("wq", "wk", "wv")], [qh, kh, kh])
            cols(f"{i}.wo", p + "attention.wo.weight", qh)
            whole(f"{i}.ffn_norm", p + "ffn_norm.weight")
        rows("0.fc1", ["layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"], [hh, hh])
        cols("0.fc2", "layers.0.feed_forward.w2.weight", hh)
        for key in ("router.gate.weight", "experts.w1", "experts.w2", "experts.w3"):
            whole(f"1.{key}", "layers.1.moe." + key)
        whole("norm", "norm.weight")
        rows("out", ["output.weight"], [vh])
        self.global_shapes = {k: tuple(v.shape) for k, v in full.items()}
        self.params = {name: nn.Parameter(t.clone().contiguous()) for name, t in local.items()}

        # The distributed optimizer: this DP rank's half of the flattened local parameters.
        self.starts, n = {}, 0
        for name, t in self.params.items():
            self.starts[name] = n
            n += t.numel()
        self.numel, self.part = n, -(-n // 2)
        self.lo, self.hi = min(self.dp * self.part, n), min((self.dp + 1) * self.part, n)
        self.main = nn.Parameter(self.flat_params()[self.lo : self.hi].clone())
        self.opt = adamw([self.main])
        self.main.grad = torch.zeros_like(self.main)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.param_groups[0]["lr"] = 0.0  # create the AdamW state (to load into) without moving anything
        self.opt.step()
        self.opt.param_groups[0]["lr"] = lr
        self.opt.state[self.main]["step"].zero_()
        self.opt.zero_grad(set_to_none=True)

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params.values()])

    # -- forward: Megatron's column/row-parallel pattern
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        P, g = self.params, self.tp_group
        vh = VOCAB // 2
        lo = self.tp * vh
        mine = (tokens >= lo) & (tokens < lo + vh)
        h = F.embedding((tokens - lo).clamp(0, vh - 1), P["emb"]) * mine.unsqueeze(-1)
        h = _ReduceFromTP.apply(h, g)
        for i in ("0", "1"):
            x = _CopyToTP.apply(F.rms_norm(h, (DIM,), P[f"{i}.attn_norm"], 1e-6), g)
            q, k, v = (x @ P[f"{i}.qkv"].T).split([HEADS * HEAD_DIM // 2] + [KV_HEADS * HEAD_DIM // 2] * 2, -1)
            h = h + _ReduceFromTP.apply(attend(q, k, v) @ P[f"{i}.wo"].T, g)
            x = F.rms_norm(h, (DIM,), P[f"{i}.ffn_norm"], 1e-6)
            if i == "0":
                a, b = (_CopyToTP.apply(x, g) @ P["0.fc1"].T).chunk(2, -1)
                h = h + _ReduceFromTP.apply((F.silu(a) * b) @ P["0.fc2"].T, g)
            else:  # the MoE layer computes whole on each TP rank
                t = x.reshape(-1, DIM)
                weights, chosen = route(P["1.router.gate.weight"], t)
                y = run_experts(t, weights, chosen, 0, P["1.experts.w1"], P["1.experts.w2"], P["1.experts.w3"])
                h = h + y.view(x.shape)
        x = _CopyToTP.apply(F.rms_norm(h, (DIM,), P["norm"], 1e-6), g)
        return _GatherFromTP.apply(x @ P["out"].T, g)

    def local_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch(step)
        n = BATCH // 2
        return x[self.dp * n : (self.dp + 1) * n], y[self.dp * n : (self.dp + 1) * n]

    def train_step(self, step: int) -> float:
        x, y = self.local_batch(step)
        loss = loss_fn(self.forward(x), y)
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in self.params.values()])
        dist.all_reduce(grads, group=self.dp_group)
        self.main.grad = (grads / 2)[self.lo : self.hi].clone()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for p in self.params.values():
            p.grad = None
        self._gather_main()
        return mean_over_world(loss.item())

    def _gather_main(self) -> None:
        """All-gather the DP halves into the model's parameters."""
        mine = torch.zeros(self.part)
        mine[: self.hi - self.lo] = self.main.detach()
        halves = [torch.empty(self.part) for _ in range(2)]
        dist.all_gather(halves, mine, group=self.dp_group)
        flat = torch.cat(halves)[: self.numel]
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(flat[self.starts[name] : self.starts[name] + p.numel()].view_as(p))

    @torch.no_grad()
    def probe_loss(self) -> float:
        x, y = self.local_batch(-1)
        return mean_over_world(loss_fn(self.forward(x), y).item())

    def state(self) -> dict:
        model, optim = {}, {}
        st = self.opt.state[self.main]
        for key, (name, first, offsets, sizes) in self.regions.items():
            p, shape = self.params[name], self.global_shapes[key]
            view = p.detach()[first : first + sizes[0]]
            model[key] = ckpt.Sharded.box(view, shape, offsets)
            # The box is [a, a + numel) of the flat buffer (rows of a row-major parameter are
            # contiguous); this DP rank's AdamW state covers [lo, hi) of it.
            a = self.starts[name] + first * p[0].numel()
            lo, hi = max(a, self.lo), min(a + view.numel(), self.hi)
            lo = min(lo, hi)
            optim[key] = {"step": st["step"]}
            for s in ("exp_avg", "exp_avg_sq"):
                part = st[s][lo - self.lo : hi - self.lo]
                optim[key][s] = ckpt.Sharded.flat(part, shape, lo - a if hi > lo else 0, within=(offsets, sizes))
        return {"model": model, "optim": optim}

    def restore(self, state: dict) -> None:
        # The model's parameters were filled in place; the optimizer's fp32 main copy follows them.
        with torch.no_grad():
            self.main.copy_(self.flat_params()[self.lo : self.hi])


LAYOUTS = {
    "plain": Plain,
    "fsdp_tp": FsdpTp,
    "hsdp": Hsdp,
    "pp_fsdp": PipelineFsdp,
    "ep": ExpertParallel,
    "megatron": Megatron,
}
WORLD = {"plain": 1, "fsdp_tp": 4, "hsdp": 4, "pp_fsdp": 4, "ep": 4, "megatron": 4}
