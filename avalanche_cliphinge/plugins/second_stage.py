"""Stage 2: a per-task linear head (optionally with LoRA) fused with CLIP at inference."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import List

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .. import distributed
from ..loaders import EpochBatchSampler, TensorBatchLoader
from ..model.heads import TaskHead
from ..seeding import Draw, generator as seeded
from ..step import stage2_loss, stage2_targets
from .contract import check_strategy
from .second_stage_compiled import CompiledStage2


class SecondStagePlugin(SupervisedPlugin, supports_distributed=True):
    """After stage 1 of each task ``t >= start_task``, trains task t's head on task t's data.

    The head (``TaskHead``) starts from the task's prompted text features and is trained with
    SGD on the current task's training data only (no replay), its logits multiplied by
    ``logit_scale``; prompts and text encoder stay frozen. With LoRA (the model was built with
    ``use_lora_in_second_stage``) a new adapter ``task<t>`` on the chosen image blocks trains
    with the head and is used only for that head's features: the training images go through
    it at every epoch, while without LoRA the head trains on the strategy's frozen features
    (``current_features``, cached). The adapter's initial ``lora_A`` comes from the task's
    generator (``seed``, ``Draw.LORA``, t), the minibatch order from (``seed``,
    ``Draw.STAGE2``, t). At inference the model scores ``clip + fusion_weight * head``. Runs
    in ``after_training_exp``, so before Avalanche's end-of-experience evaluation. An
    experience that creates no task (every class comes back) trains no head; one that mixes
    new and returning classes trains the new task's head on the new classes' samples only.

    With the config's ``compile_step`` the run on cached features is one captured graph per
    step (``CompiledStage2``); the LoRA run stays eager. Under torchrun the LoRA
    run's minibatches are split by rows across the ranks, their gradients summed.

    Args:
        start_task: first task that gets a head (earlier tasks' classes get head logit 0).
        epochs: SGD epochs per task (0 disables stage 2).
        lr, momentum, weight_decay: SGD settings.
        logit_scale: multiplier of the head's logits.
        batch_size: minibatch size.
        seed: base seed of the shuffling generator.
    """

    #: What it reads on its strategy (see ``contract.MethodStrategy``).
    STRATEGY_NEEDS = (
        "model",
        "device",
        "config",
        "experience_classes",
        "current_features",
        "adapted_dataset",
        "autocast",
    )

    def __init__(
        self,
        *,
        start_task: int = 1,
        epochs: int = 5,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        logit_scale: float = 20.0,
        batch_size: int = 100,
        seed: int = 0,
    ):
        super().__init__()
        self.start_task, self.epochs, self.lr = start_task, epochs, lr
        self.momentum, self.weight_decay = momentum, weight_decay
        self.logit_scale, self.batch_size, self.seed = logit_scale, batch_size, seed
        #: the mean training loss of each epoch of the latest run (a new list per run)
        self.losses: List[float] = []
        #: optimizer steps taken so far, every task's run together
        self.steps = 0
        #: the captured runners of this run, by step shape (``compile_step``)
        self.captured = {}

    def __getstate__(self):
        # pickled (Avalanche's save_checkpoint) without the captured runners: their graphs
        # belong to this process; the next task builds them again
        state = self.__dict__.copy()
        state["captured"] = {}
        return state

    def __setstate__(self, state):
        state.setdefault("captured", {})
        self.__dict__.update(state)

    @property
    def stage2_losses(self) -> List[float]:
        """``losses``, as ``step_state.Stage2Record`` declares them for the metrics."""
        return self.losses

    @classmethod
    def from_config(cls, config) -> "SecondStagePlugin":
        """The plugin with the settings of a ``CLIPHingeConfig``."""
        return cls(
            start_task=config.second_stage_start_task,
            epochs=config.second_stage_epochs,
            lr=config.second_stage_lr,
            momentum=config.second_stage_momentum,
            weight_decay=config.second_stage_weight_decay,
            logit_scale=config.second_stage_logit_scale,
            batch_size=config.batch_size,
            seed=config.seed,
        )

    def before_training(self, strategy, **kwargs):
        check_strategy(self, strategy, self.STRATEGY_NEEDS)

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        task = model.n_tasks - 1
        created = strategy.experience_classes
        if task < self.start_task or self.epochs == 0 or (created and created.task is None):
            return
        device = strategy.device
        classes = torch.tensor(model.task_classes[task], device=device)
        with torch.no_grad():
            text = model.task_text_features(task)
        head = TaskHead(text, self.logit_scale).to(device)
        params = list(head.parameters())
        use_lora = model.lora is not None
        generator = seeded(self.seed, Draw.STAGE2, task)
        if use_lora:
            adapter = f"task{task}"
            model.lora.add(adapter, seeded(self.seed, Draw.LORA, task))  # its initial A
            params += model.lora.parameters(adapter)
            dataset = strategy.adapted_dataset
            if created and created.returning:
                own = torch.isin(torch.as_tensor(list(dataset.targets)), classes.cpu())
                # a torch Subset reads items through the dataset's transforms (CLIP's input);
                # Avalanche's own subset would drop the transform the strategy set
                dataset = Subset(dataset, torch.nonzero(own).flatten().tolist())
            sampler = EpochBatchSampler(len(dataset), self.batch_size, True, generator)
            loader = DataLoader(
                dataset, batch_sampler=sampler, num_workers=strategy.config.num_workers
            )
        else:
            feats, labels = strategy.current_features
            if created and created.returning:  # the new classes' samples only
                own = torch.isin(labels, classes)
                feats, labels = feats[own], labels[own]
            sampler = EpochBatchSampler(len(labels), self.batch_size, True, generator)
            loader = TensorBatchLoader(feats, labels, sampler)
        optimizer = torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        # compile_step on cached features: each epoch as calls of one captured step, the
        # graph made once per run (per shape)
        compiled = None
        if not use_lora and strategy.config.compile_step:
            key = CompiledStage2.shape_key(head, optimizer, loader)
            fitting = [c for c in self.captured.get(key, []) if c.capacity >= len(labels)]
            if not fitting:
                fitting = [CompiledStage2(strategy, head, optimizer, loader)]
                self.captured.setdefault(key, []).append(fitting[0])
            compiled = fitting[0]
            compiled.load(head, loader, classes)
        self.losses = []
        head.train()
        # the adapter stays active through backward: peft freezes inactive adapters' weights
        active = model.lora.using(adapter) if use_lora else nullcontext()
        epochs = tqdm(
            range(self.epochs),
            desc=f"stage 2, task {task}",
            leave=False,
            disable=not getattr(strategy, "progress", True),
        )
        # under torchrun LoRA's image passes are split by rows (the ranks' gradients summed)
        split = use_lora and distributed.world_size() > 1
        with active:
            for epoch in epochs:
                total, count = torch.zeros((), device=device), 0
                if compiled is not None:
                    total, count = compiled.run_epoch()
                    compiled.store(head)
                for batch in loader if compiled is None else ():
                    if split:  # this rank's rows, the ranks' gradients summed
                        total += self._shard_step(strategy, head, params, optimizer, batch, classes)
                        count += len(batch[1])
                        continue
                    x, y = batch[0].to(device), batch[1].to(device)
                    if use_lora:
                        with strategy.autocast():
                            x = model.run_image_encoder(x)
                    targets = stage2_targets(y, classes)
                    loss, _ = stage2_loss(head, x, targets, strategy.autocast)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += loss.detach() * len(y)  # summed on the device: no sync
                    count += len(y)
                # NaN weights make the epoch's loss NaN: one read checks both
                finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
                total = torch.where(finite, total, torch.full_like(total, float("nan")))
                self.losses.append(float(total) / max(count, 1))
                if not math.isfinite(self.losses[-1]):
                    raise FloatingPointError(
                        f"non-finite stage-2 loss or weights at task {task}, epoch {epoch} "
                        f"({self.losses[-1]}); lower second_stage_lr, second_stage_weight_decay "
                        "or second_stage_logit_scale. Earlier checkpoints are intact"
                    )
        self.steps += self.epochs * len(loader)
        head.eval()
        head.requires_grad_(False)
        for param in params:
            param.requires_grad_(False)
        model.heads[str(task)] = head

    def _shard_step(self, strategy, head, params, optimizer, batch, classes) -> torch.Tensor:
        """One SGD step of a LoRA minibatch under torchrun, this rank encoding its rows only.

        Each rank's loss is its rows' summed cross-entropy over the whole minibatch's size,
        so the summed gradients (``distributed.all_reduce_gradients``) are those of one
        process's mean, up to summation order; a rank without rows adds zeros. Returns the
        minibatch's summed loss (every rank's), on the device. ``classes``: the task's class
        ids, in its head's column order.
        """
        device, model = strategy.device, strategy.model
        rows, n = distributed.shard_rows(len(batch[1])), len(batch[1])
        x, y = batch[0][rows].to(device), batch[1][rows].to(device)
        optimizer.zero_grad()
        loss = torch.zeros((), device=device)
        if len(y):
            with strategy.autocast():
                feats = model.run_image_encoder(x)
            targets = stage2_targets(y, classes)
            loss, _ = stage2_loss(head, feats, targets, strategy.autocast, reduction="sum")
            (loss / n).backward()
        (total,) = distributed.all_reduce_gradients(params, loss.detach())
        optimizer.step()
        return total
