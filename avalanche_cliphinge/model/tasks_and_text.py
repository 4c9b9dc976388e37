"""The text side of ``CLIPHingeModel``: its tasks, their classes and prompts, their text features.

``TasksAndText`` registers each task's classes (their score columns) and prompts, says which
prompts train, and encodes the prompted and the raw (template) text features, keeping those of
frozen tasks in a cache. It is a mixin of ``CLIPHingeModel``, whose ``__init__`` sets the
state it reads (declared below) and whose ``encode_prompts`` it calls.

With a unified context (``CLIPHingeModel(shared_context=True)``, CoOp's) every task's prompts
read the one ``shared_ctx`` parameter: it trains whenever any task does, and then every task's
text features leave the cache.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..seeding import Draw, generator as seeded
from .prompts import TaskPrompts, raw_text_features, unified_context


class TasksAndText:
    """Tasks, classes, prompts and text features of ``CLIPHingeModel`` (a mixin)."""

    clip: nn.Module
    tokenizer: Callable
    names: Dict[int, str]
    class_ids: List[int]
    n_ctx: int
    ctx_init: str
    prompt_template: str
    seed: int
    prompt_length: int
    prompts: nn.ModuleList
    task_classes: List[List[int]]
    column_of: Tensor
    class_of_column: Tensor
    _text_cache: Dict[int, Tensor]
    _raw_text: Optional[Tensor]
    _encode_trainable: Callable[[Tensor, Tensor], Tensor]
    # shared_ctx: Optional[nn.Parameter], the unified context (read with getattr: a model
    # pickled before it existed has none)

    def _register_unified_context(self, shared: bool) -> None:
        """Register ``shared_ctx``: with ``shared``, CoOp's unified context ``[n_ctx, width]``
        (``prompts.unified_context``, its random part drawn by ``seeding.generator(seed,
        Draw.PROMPTS, 0)``), which every task's prompts will read; else ``None``."""
        ctx = None
        if shared:
            generator = seeded(self.seed, Draw.PROMPTS, 0)
            ctx = unified_context(self.clip, self.tokenizer, self.n_ctx, self.ctx_init, generator)
        self.register_parameter("shared_ctx", ctx)

    # ---- tasks and classes ------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        """Number of tasks registered so far."""
        return len(self.task_classes)

    @property
    def seen_classes(self) -> List[int]:
        """Class ids of every registered task, in task order (the score columns' order)."""
        return [c for classes in self.task_classes for c in classes]

    def task_of(self, class_id: int) -> int:
        """Index of the task that owns ``class_id``."""
        for task, classes in enumerate(self.task_classes):
            if class_id in classes:
                return task
        raise KeyError(f"class {class_id} belongs to no registered task")

    def add_task(self, class_ids: Sequence[int]) -> int:
        """Register a task's new classes and create their prompts; returns the task index.

        Raises:
            ValueError: a class without a name in ``class_names``, or one already registered
                (a class that comes back keeps its task: see ``CLIPHingeStrategy``).
        """
        class_ids = [int(c) for c in class_ids]
        bad = [c for c in class_ids if c not in self.names]
        if bad:
            raise ValueError(
                f"class ids {bad} have no name in class_names (known ids: "
                f"{self.class_ids[0]}..{self.class_ids[-1]}, {len(self.names)} "
                "names); pass names for every class id of the stream"
            )
        repeated = sorted(set(class_ids) & set(self.seen_classes))
        if repeated:
            raise ValueError(
                f"classes {repeated} are already registered; add_task takes new classes only"
            )
        task = self.n_tasks
        generator = seeded(self.seed, Draw.PROMPTS, task)
        self.prompts.append(
            TaskPrompts(
                self.clip,
                self.tokenizer,
                [self.names[c] for c in class_ids],
                self.n_ctx,
                self.ctx_init,
                generator,
                length=self.prompt_length,
                ctx=getattr(self, "shared_ctx", None),
            )
        )
        self.task_classes.append(class_ids)
        start = len(self.seen_classes) - len(class_ids)
        self.column_of[torch.tensor(class_ids, device=self.column_of.device)] = torch.arange(
            start, start + len(class_ids), device=self.column_of.device
        )
        # the score columns' class ids as a tensor, built once per task (not per minibatch)
        self.class_of_column = torch.tensor(self.seen_classes, device=self.column_of.device)
        return task

    def set_trainable_prompts(self, tasks: Sequence[int]) -> None:
        """Make the prompts of ``tasks`` trainable and freeze every other task's.

        Only the text features of ``tasks`` leave the cache: they are about to change, while
        the other tasks' prompts stay as they were encoded. A frozen prompt keeps no gradient:
        plugins that read every parameter's ``.grad`` (AGEM, GEM) would take a stale one for
        the current step's. A unified context trains when ``tasks`` is not empty, and every
        task's text features then leave the cache (they all read it).
        """
        shared = getattr(self, "shared_ctx", None)
        if shared is not None:
            shared.requires_grad_(bool(tasks))
            if tasks:
                self._text_cache.clear()
            else:
                shared.grad = None
            return
        for task, prompts in enumerate(self.prompts):
            prompts.ctx.requires_grad_(task in tasks)
            if task not in tasks:
                prompts.ctx.grad = None
        for task in tasks:
            self._text_cache.pop(task, None)

    def invalidate_text_cache(self) -> None:
        """Forget every cached text feature (call after changing a frozen prompt by hand)."""
        self._text_cache.clear()

    def cached_text_tensors(self) -> List[Tensor]:
        """The text features cached for frozen tasks, ``[n_classes_of_task, dim]`` each.

        The cached tensors themselves (not copies), in the order they were cached: what a
        caller that needs their addresses (``torch._dynamo.mark_static_address`` for CUDA
        graphs) marks. The cache changes only through ``task_text_features``,
        ``set_trainable_prompts`` and ``invalidate_text_cache``.
        """
        return list(self._text_cache.values())

    # ---- text side --------------------------------------------------------------------------
    def task_text_features(self, task: int) -> Tensor:
        """``[n_classes_of_task, dim]`` prompted text features of ``task``.

        Trainable prompts go through the text encoder on every call (with gradients in grad
        mode), since each optimizer step changes them; frozen prompts are encoded once and
        served from a cache until they become trainable or ``invalidate_text_cache``.
        """
        prompts = self.prompts[task]
        if prompts.ctx.requires_grad:
            if torch.is_grad_enabled():
                return self._encode_trainable(prompts.embeddings(), prompts.tokens)
            return self.encode_prompts(prompts.embeddings(), prompts.tokens)
        cached = self._text_cache.get(task)
        if cached is None:
            with torch.no_grad():
                cached = self.encode_prompts(prompts.embeddings(), prompts.tokens)
            self._text_cache[task] = cached
        return cached

    def text_features(self) -> Tensor:
        """``[n_seen, dim]`` prompted text features of every seen class, in column order."""
        return torch.cat([self.task_text_features(t) for t in range(self.n_tasks)])

    def raw_text_features(self, class_ids: Sequence[int]) -> Tensor:
        """``[len(class_ids), dim]`` features of ``prompt_template`` with each class name.

        They depend only on the frozen CLIP: the first call encodes every class of the stream
        in one batch and later calls index it, so a value never depends on which classes were
        asked for together (a resumed run picks the same hard pairs to the last bit).
        """
        if self._raw_text is None:
            self._raw_text = raw_text_features(
                self.clip,
                self.tokenizer,
                [self.names[c] for c in self.class_ids],
                self.prompt_template,
            )
        rows = [self.class_ids.index(int(c)) for c in class_ids]
        index = torch.as_tensor(rows, dtype=torch.long, device=self._raw_text.device)
        return self._raw_text[index]
