"""The training loop shared by the distillation stages: resumable, reproducible, data-parallel.

- Every ``ckpt_every`` steps (and at the end) the full state (model, EMA, Adam moments, step) goes
  to ``train_state.safetensors`` + ``train_state.json`` in the run directory, written atomically
  (the JSON last, naming the step the tensors hold). Running the same command again resumes from
  it: after a ``kill -9`` nothing is lost beyond the last checkpoint.
- Step k draws its randomness from a generator seeded by (seed, k, rank), so a resumed run is
  bitwise the uninterrupted one (single process; deterministic algorithms on).
- Under ``torchrun --nproc_per_node P`` (env WORLD_SIZE > 1) the model is wrapped in
  DistributedDataParallel over gloo (CPU): each rank takes ``batch / P`` of every step's batch,
  rank 0 writes checkpoints and draws the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FewstepError
from ..runtime.plan import atomic_write_bytes, atomic_write_text

STATE_FILE = "train_state.safetensors"
STATE_JSON = "train_state.json"


class TrainError(FewstepError):
    pass


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 100  # linear LR warm-up; constant afterwards, so resuming never depends on the total
    grad_clip: float = 1.0
    ema_halflife: float = 0.0  # steps; 0 = no EMA (the final weights are the model's own)
    ckpt_every: int = 200
    lr_decay: bool = False  # linear decay to 0 over ``steps`` (progressive distillation anneals per halving)


def save_safetensors(path: str, tensors: dict) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in tensors.items()}))


def jsonable(d):
    return json.loads(json.dumps(d))


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the gloo process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    _barrier(dist_info()[1])


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def default_step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1024 + rank


def run(model: nn.Module, loss_fn: Callable, loop: LoopConfig, out_dir: str, seed: int, record: dict,
        desc: str, progress: bool = True, resume: bool = True,
        step_seed: Callable[[int, int, int], int] = default_step_seed) -> tuple[nn.Module, dict]:
    """Train ``model`` in place; returns (the weights to ship: EMA or model, state info).

    ``loss_fn(net, gen, batch)`` computes one step's loss on ``batch`` samples drawn with ``gen``;
    ``net`` is the (possibly DDP-wrapped) model. ``record`` (JSON-able: the stage's config, its
    inputs' hashes) must match on resume, so a checkpoint is never continued with other settings.
    ``step_seed(seed, step, rank)`` seeds step ``step``'s generator (a stage may keep its own historical
    formula, so artifacts trained before the shared loop are reproduced bit for bit).
    """
    from tqdm import tqdm

    rank, world = dist_info()
    if loop.batch % world:
        raise TrainError(f"--batch {loop.batch} must divide evenly over {world} processes")
    os.makedirs(out_dir, exist_ok=True)
    # The step count is part of the settings only when the LR schedule depends on it: otherwise a run may
    # be resumed to train longer (the first `steps` are the same either way).
    loop_rec = {k: v for k, v in loop.__dict__.items() if k != "steps" or loop.lr_decay}
    record = jsonable({**record, "loop": loop_rec, "seed": seed, "world_size": world})
    ema = None
    if loop.ema_halflife > 0:
        import copy

        ema = copy.deepcopy(model).requires_grad_(False)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=loop.lr, foreach=False)

    start, wall, loss_avg = 0, 0.0, float("nan")
    if resume and os.path.exists(os.path.join(out_dir, STATE_JSON)):
        start, wall, loss_avg = _resume(out_dir, record, loop, model, ema, opt, params)

    def save_state(step):
        if rank == 0:
            _save(out_dir, step, record, model, ema, opt, params, loss_avg, wall)
        _barrier(world)

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    gen = torch.Generator()
    decay = 0.5 ** (1.0 / loop.ema_halflife) if ema is not None else 0.0
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    bar = tqdm(total=loop.steps, initial=start, disable=not progress or rank != 0, desc=desc, dynamic_ncols=True)
    model.train()
    try:
        t0 = time.perf_counter()
        for step in range(start, loop.steps):
            gen.manual_seed(step_seed(seed, step, rank))
            loss = _step(net, model, ema, opt, loss_fn, gen, loop, step, world, decay)
            if not math.isfinite(loss):
                raise TrainError(f"{desc}: the loss became {loss} at step {step}; the last checkpoint "
                                 f"in {out_dir} is intact (lower --lr?)")
            loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4g}")
            done = step + 1
            if done % loop.ckpt_every == 0 or done == loop.steps:
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_state(done)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(prev_det)
    model.eval()
    final = ema if ema is not None else model
    return final, {"steps": max(loop.steps, start), "loss": loss_avg, "wall_seconds": round(wall, 1),
                   "world_size": world, "rank": rank, "threads": torch.get_num_threads()}


def _step(net, model, ema, opt, loss_fn, gen, loop: LoopConfig, step: int, world: int, decay: float) -> float:
    """One optimisation step (LR warm-up / decay, clipped gradients, Adam, EMA); returns the loss (a loss that
    is not finite returns before anything is updated)."""
    for g in opt.param_groups:
        g["lr"] = loop.lr * min(1.0, (step + 1) / max(1, loop.warmup)) \
            * ((1.0 - step / loop.steps) if loop.lr_decay else 1.0)
    loss = loss_fn(net, gen, loop.batch // world)
    if not torch.isfinite(loss):
        return float(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
    opt.step()
    if ema is not None:
        k = min(decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - k)
    return float(loss.detach())


def _resume(out_dir: str, record: dict, loop: LoopConfig, model, ema, opt, params) -> tuple[int, float, float]:
    """Load the checkpoint in ``out_dir`` into model, EMA and Adam; returns (step, wall seconds, loss)."""
    from safetensors.torch import load_file

    state_json = os.path.join(out_dir, STATE_JSON)
    with open(state_json) as f:
        st = json.load(f)
    legacy = jsonable({**record, "loop": loop.__dict__})  # checkpoints written before `steps` left the record
    if st.get("record") not in (record, legacy):
        raise TrainError(f"{state_json}: written by a run with other settings (config, seed, inputs or "
                         f"process count); use a fresh --out, or delete it to start over")
    tensors = load_file(os.path.join(out_dir, STATE_FILE))
    if int(tensors["step"]) != st["step"]:
        raise TrainError(f"{out_dir}: {STATE_FILE} and its JSON disagree on the step (interrupted write?)")
    start = st["step"]
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if start > 0:
        sd = opt.state_dict()
        # per-parameter Adam step counts (a loss may update only some parameters on a step, e.g. DMD2's
        # alternating generator / critic updates); checkpoints without them: every parameter at `start`
        sd["state"] = {i: {"step": tensors.get(f"adam_step.{n}", torch.tensor(float(start))),
                           "exp_avg": tensors[f"adam_m.{n}"], "exp_avg_sq": tensors[f"adam_v.{n}"]}
                       for i, n in enumerate(params)}
        opt.load_state_dict(sd)
    return start, st["wall_seconds"], st["loss"]


def _save(out_dir: str, step: int, record: dict, model, ema, opt, params, loss_avg: float, wall: float) -> None:
    """The full state (model, EMA, Adam moments and step counts), tensors first, then the JSON naming the step."""
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        t.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for n, p in params.items():
        s = opt.state.get(p, {})
        t[f"adam_m.{n}"] = s.get("exp_avg", torch.zeros_like(p))
        t[f"adam_v.{n}"] = s.get("exp_avg_sq", torch.zeros_like(p))
        t[f"adam_step.{n}"] = torch.as_tensor(s.get("step", 0.0), dtype=torch.float32).reshape(())
    t["step"] = torch.tensor(step)
    save_safetensors(os.path.join(out_dir, STATE_FILE), t)
    atomic_write_text(os.path.join(out_dir, STATE_JSON),
                      json.dumps({"format": "fewstep.train-state/1", "step": step, "loss": loss_avg,
                                  "wall_seconds": wall, "record": record}, indent=1) + "\n")
