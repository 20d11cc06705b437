"""The training loop: a plain torch loop on an `accelerate.Accelerator`, so the same code runs on CPU, one GPU, and
several GPUs under `accelerate launch` (DDP or FSDP), and resumes exactly from any checkpoint."""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from clakit.errors import ClakitError
from clakit.uptrain import checkpoint
from clakit.uptrain.card import run_provenance
from clakit.uptrain.distill import causal_lm_loss, uptrain_loss
from clakit.uptrain.packing import BatchOrder, PackedData
from clakit.uptrain.recipe import ONE_STEP_WARMUP, warmup_steps
from clakit.uptrain.student import count_parameters

METRICS = "metrics.jsonl"


@dataclass
class Plan:
    """How many steps, and how many tokens each consumes (over all processes)."""

    total_steps: int
    tokens_per_step: int
    warmup_steps: int


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step reads its blocks: `batch_size` blocks per micro-batch, `accumulation` micro-batches,
    on each of `world` processes."""

    batch_size: int
    accumulation: int
    world: int

    @property
    def blocks(self) -> int:
        return self.batch_size * self.accumulation * self.world


def step_shape(train, world: int, blocks: int | None = None) -> StepShape:
    """The recipe's step on `world` processes. `blocks`: the blocks a step of a resumed run read where it started on
    another number of processes. Its steps keep them (the same blocks in the same order, the same schedule and
    tokens a step: what an uninterrupted run trains, up to the order of the sums), split into micro-batches no
    larger than the recipe's, more of them where fewer processes share the step; a `world` that does not divide
    them is refused (a step of other blocks would train some twice and skip others)."""
    batch, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
    if blocks is None or blocks == batch * accumulation * world:
        return StepShape(batch, accumulation, world)
    if blocks % world:
        divisors = [n for n in range(1, blocks + 1) if blocks % n == 0][:8]
        raise ClakitError(
            f"--resume: this run's steps read {blocks} blocks each (train.per_device_train_batch_size x "
            f"train.gradient_accumulation_steps x the processes it started on), which {world} processes cannot "
            f"share evenly; resume on {', '.join(map(str, divisors))}{', ...' if len(divisors) == 8 else ''} "
            "processes, or start over with --overwrite"
        )
    share = blocks // world  # each process's blocks a step
    batch = max(b for b in range(1, min(batch, share) + 1) if share % b == 0)
    return StepShape(batch, share // batch, world)


def blocks_per_step(train, world: int) -> int:
    """Training blocks one optimizer step reads over all processes (batch x accumulation x processes)."""
    return step_shape(train, world).blocks


def make_plan(train, n_blocks: int, seq_len: int, shape: StepShape) -> Plan:
    per_step = shape.blocks
    tokens_per_step = per_step * seq_len
    if train.max_steps > 0:
        total = train.max_steps
    elif train.max_tokens:
        total = math.ceil(train.max_tokens / tokens_per_step)
    else:
        total = max(1, math.ceil(train.num_train_epochs * n_blocks / per_step))
    return Plan(total, tokens_per_step, warmup_steps(train, total))


def check_plan(train, plan: Plan) -> None:
    """The warmup against the planned run (its steps from max_steps, max_tokens or epochs; the warmup from
    warmup_steps or warmup_ratio). A warmup starts at learning rate 0 (transformers' schedulers, all but `constant`):
    a run of one step with any warmup trains at 0 and returns the converted model unchanged while its card counts a
    step of training; a longer run whose warmup lasts it never reaches train.learning_rate."""
    if plan.total_steps == 1 and plan.warmup_steps > 0 and train.lr_scheduler_type != "constant":
        raise ClakitError(ONE_STEP_WARMUP)
    if plan.total_steps > 1 and plan.warmup_steps >= plan.total_steps:
        raise ClakitError(
            f"the warmup ({_warmup_source(train, plan)}) is not shorter than the run ({_steps_source(train, plan)}): "
            "the learning rate would never reach its peak; lower train.warmup_steps / train.warmup_ratio, or train "
            "more steps"
        )


def _warmup_source(train, plan: Plan) -> str:
    return (
        f"train.warmup_steps={train.warmup_steps}"
        if train.warmup_steps
        else f"{plan.warmup_steps} steps from train.warmup_ratio={train.warmup_ratio}"
    )


def _steps_source(train, plan: Plan) -> str:
    if train.max_steps > 0:
        return f"{plan.total_steps} steps"
    budget = (
        f"train.max_tokens={train.max_tokens}"
        if train.max_tokens
        else f"train.num_train_epochs={train.num_train_epochs}"
    )
    return f"{plan.total_steps} steps from {budget}"


def make_optimizer(model, train):
    """AdamW, fused (transformers' default `adamw_torch_fused`): torch's default on CPU tensors is its per-tensor
    loop, 5.9x slower over the CPU recipe's 26M trained parameters (fused 370 ms a step against 2,184 ms, 10% of a
    step), the same update to ~3e-8 after 20 steps. A device torch has no fused kernel for gets its default."""
    params = [p for p in model.parameters() if p.requires_grad]
    settings = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        weight_decay=train.weight_decay,
    )
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
        return torch.optim.AdamW(params, **settings)


def make_scheduler(optimizer, train, plan: Plan):
    from transformers import get_scheduler

    extra = {"min_lr_rate": 0.1} if train.lr_scheduler_type == "cosine_with_min_lr" else None
    return get_scheduler(
        train.lr_scheduler_type,
        optimizer,
        num_warmup_steps=plan.warmup_steps,
        num_training_steps=plan.total_steps,
        scheduler_specific_kwargs=extra,
    )


def padded_share(n_blocks: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which held-out blocks process `rank` scores: its share `rank::world`, padded by repeating block 0 up to the
    largest share (FSDP gathers each layer's weights in every forward, so all processes must run the same number of
    forwards: with equal shares at one batch size they do, e.g. 9 blocks on 2 processes: 5 each, 1 of them padding).

    Returns (block indices, weights): weight 0 marks a padding block, left out of the sums."""
    mine = torch.arange(rank, n_blocks, world)
    pad = math.ceil(n_blocks / world) - len(mine)
    index = torch.cat([mine, torch.zeros(pad, dtype=torch.long)])
    return index, torch.cat([torch.ones(len(mine)), torch.zeros(pad)]).double()


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int, device=None) -> dict:
    """Mean next-token loss and perplexity over the held-out blocks (collective: each process scores its share,
    the sums are all-reduced over torch.distributed when it is initialised)."""
    rank, world = checkpoint.rank_and_world()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    index, weight = padded_share(len(blocks), rank, world)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(index), batch_size):
        ids = blocks[index[i : i + batch_size]].to(device)
        per_block = causal_lm_loss(model(input_ids=ids).logits, ids, reduction="none").sum(1).double().cpu()
        loss_sum += (per_block * weight[i : i + batch_size]).sum()
    total = torch.stack([loss_sum, weight.sum() * (blocks.shape[1] - 1)]).to(device)  # (sum of losses, tokens)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    mean = (total[0] / total[1]).item()
    return {"loss": mean, "perplexity": math.exp(min(mean, 700)), "tokens": int(total[1].item())}


class LossNotFinite(ClakitError):
    """The training loss turned NaN/inf: a resume continues the same recipe bit for bit into the same loss, so the
    fix is another recipe, started over."""


def stop_if_not_finite(loss_sum: float, step: int, accelerator) -> None:
    """A NaN/inf loss (a learning rate too high, a bf16 overflow, broken data) would poison the weights: stop before
    the optimizer step, so no checkpoint and no result holds them. Every process stops together (or the others
    would wait forever in the next collective)."""
    bad = not math.isfinite(loss_sum)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(torch.tensor([float(bad)], device=accelerator.device), "sum").item() > 0
    if bad:
        raise LossNotFinite(
            f"the training loss is not finite (nan or inf) at step {step}; nothing was saved from this step on. Lower "
            "train.learning_rate (or set train.max_grad_norm) or check the data, and start over with --overwrite "
            "(--resume continues the same recipe into the same loss)"
        )


@dataclass
class Window:
    """Loss parts averaged over the steps since the last log line."""

    sums: dict = field(default_factory=dict)
    steps: int = 0

    def add(self, parts: dict) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def pop(self) -> dict:
        out = {k: v / max(1, self.steps) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return out


class Trainer:
    def __init__(
        self, recipe, model, teacher, data: PackedData, accelerator, run_dir: Path, quiet=False, shape=None
    ):
        self.recipe, self.train, self.accelerator, self.run_dir = recipe, recipe.train, accelerator, run_dir
        self.teacher, self.data, self.quiet = teacher, data, quiet
        # the step as it runs here (step_shape: a resume on another number of processes keeps the run's blocks a step)
        self.shape = shape or step_shape(self.train, accelerator.num_processes)
        assert self.shape.world == accelerator.num_processes, (self.shape, accelerator.num_processes)
        self.plan = make_plan(self.train, len(data.train), data.seq_len, self.shape)
        self.counts = count_parameters(model)  # (trainable, total, adapters), before any wrapping or merging
        optimizer = make_optimizer(model, self.train)
        self.scheduler = make_scheduler(optimizer, self.train, self.plan)  # stepped by us: once per optimizer step
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # a step reads the blocks [step x blocks, (step + 1) x blocks) of the order, whatever its shape
        self.order = BatchOrder(
            len(data.train), self.shape.batch_size, self.train.seed, accelerator.process_index, self.shape.world
        )
        self.step, self.elapsed, self.lr = 0, 0.0, 0.0
        self.window = Window()  # the loss parts of the steps since the last log line (saved with each checkpoint)
        self.after_first_save = None  # called once the first checkpoint is written (the run's owner's hook)

    # --- state ----------------------------------------------------------------------------------------------------

    def save(self) -> None:
        state = {
            "step": self.step,
            "micro_batches": self.step * self.shape.accumulation,
            "blocks_per_step": self.shape.blocks,
            "tokens": self.step * self.plan.tokens_per_step,
            "total_steps": self.plan.total_steps,
            "elapsed_s": self.elapsed,
            "fingerprint": self.recipe.fingerprint(),
            "log_window": self.saved_window(),  # collective
            # what wrote it (versions, command, time): a checkpoint is an output too, and may outlive its run.json
            "provenance": run_provenance(),
        }
        checkpoint.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, state)
        if self.after_first_save is not None:  # after, not before: a failed or interrupted first checkpoint (a full
            self.after_first_save()  # disk, Ctrl-C mid-save) left the old run to be put back, not both runs lost
            self.after_first_save = None
        if self.accelerator.is_main_process:
            checkpoint.prune(self.run_dir, self.train.save_total_limit)

    def saved_window(self) -> dict:
        """The steps logged since the last log line, for a resume to log the line an uninterrupted run would (with
        logging_steps not dividing save_steps, it averaged only the steps after the checkpoint). The process mean of
        the sums: a log line is the process mean of sums / steps, which is linear, so every process may restart from
        that mean (collective)."""
        sums = dict(self.mean_over_processes(self.window.sums)) if self.window.steps else {}
        return {"sums": sums, "steps": self.window.steps}

    def resume(self, path: Path) -> None:
        state = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step, self.elapsed = state["step"], state.get("elapsed_s", 0.0)
        saved = state.get("log_window") or {}  # absent in checkpoints written before it was kept
        self.window = Window(dict(saved.get("sums", {})), saved.get("steps", 0))
        if self.accelerator.is_main_process:
            drop_metrics_after(self.run_dir / METRICS, self.step)

    # --- logging --------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.train.report_to and "tensorboard" in self.train.report_to:
            scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self.accelerator.log(scalars, step=record["step"])

    def evaluate(self, tag: str) -> dict:
        bs = self.train.per_device_eval_batch_size
        result = heldout_loss(self.model, self.data.eval, bs, self.accelerator.device)
        self.log(
            {
                "step": self.step,
                "tokens": self.step * self.plan.tokens_per_step,
                "event": tag,
                "eval_loss": result["loss"],
                "eval_perplexity": result["perplexity"],
            }
        )
        return result

    # --- the loop -------------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the loss parts."""
        ga, acc = self.shape.accumulation, self.accelerator
        window = Window()
        for micro in range(ga):
            ids = self.data.train[self.order.indices(self.step * ga + micro)].to(acc.device)
            sync = micro == ga - 1
            with nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                loss, parts = uptrain_loss(self.model, self.teacher, ids, self.recipe.distill)
                acc.backward(loss / ga)
            window.add({"loss": loss.detach().item(), **parts})
        stop_if_not_finite(window.sums["loss"], self.step + 1, acc)
        if self.train.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
        self.optimizer.step()
        self.lr = self.scheduler.get_last_lr()[0]  # this step's learning rate (logged), before the scheduler moves on
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return window.pop()

    def on_step_end(self) -> None:
        """Checkpoint when due (a hook: tests stop a run here to simulate a kill)."""
        if self.train.save_steps > 0 and self.step % self.train.save_steps == 0 and self.step < self.plan.total_steps:
            self.save()

    def mean_over_processes(self, parts: dict) -> dict:
        if self.accelerator.num_processes == 1:
            return parts
        values = self.accelerator.reduce(torch.tensor(list(parts.values()), device=self.accelerator.device), "mean")
        return dict(zip(parts, values.tolist(), strict=True))

    def run(self) -> None:
        from tqdm.auto import tqdm

        total, start_step = self.plan.total_steps, self.step
        quiet = self.quiet or not self.accelerator.is_main_process
        bar = tqdm(total=total, initial=start_step, desc="uptrain", unit="step", dynamic_ncols=True, disable=quiet)
        self.model.train()
        window, elapsed0 = self.window, self.elapsed
        curve = self.train.eval_steps > 0  # the held-out quality curve: step 0, every eval_steps, the last step
        if curve and self.step == 0:
            self.evaluate("eval")
        while self.step < total:
            t0 = time.perf_counter()
            window.add(self.train_step())
            self.elapsed += time.perf_counter() - t0  # training time only: evaluation and saving excluded
            tok_s = self.plan.tokens_per_step * (self.step - start_step) / max(self.elapsed - elapsed0, 1e-9)
            bar.update(1)
            if self.step % self.train.logging_steps == 0 or self.step == total:
                parts = self.mean_over_processes(window.pop())
                self.log(
                    {
                        "step": self.step,
                        "tokens": self.step * self.plan.tokens_per_step,
                        "lr": self.lr,
                        "tokens_per_s": round(tok_s, 1),
                        "elapsed_s": round(self.elapsed, 2),
                        **parts,
                    }
                )
                bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{tok_s:.0f}")
            if curve and (self.step % self.train.eval_steps == 0 or self.step == total):
                self.evaluate("eval")
            self.on_step_end()
        bar.close()


def drop_metrics_after(path: Path, step: int) -> None:
    """A run killed after its last checkpoint had logged steps it now trains again: without this, metrics.jsonl
    would hold those steps twice (the lost run's and the resumed run's). A torn last line (killed while writing)
    goes too. Rewritten and renamed into place (a kill now loses nothing); the copy is written in checkpoints/, one
    of the run's own folders, so a kill leaves no stray file in the run folder (whose --overwrite it would block)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.parent / checkpoint.CHECKPOINTS / (path.name + ".tmp")
        tmp.parent.mkdir(exist_ok=True)
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _logged_step(line: str) -> float:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf
