"""What each experience trains in a ``CLIPHingeStrategy``: its classes and task, its
prompts, the optimizer over them and its learning rate.

``ExperienceTasks`` is a mixin of the strategy (as Avalanche composes its templates from
mixins). It reads the strategy's ``config``, ``model``, ``experience``, ``optimizer``,
``plugins`` and ``current_task``, and writes ``experience_classes``, ``current_task``,
``frozen_rows`` and ``train_epochs``.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .config import ConfigError
from .step_state import ExperienceClasses
from .strategy_inputs import classes_of, stream_class_count


class ExperienceTasks:
    """The task side of ``CLIPHingeStrategy`` (a mixin before ``SupervisedTemplate``)."""

    #: whether the optimizer was the user's (its defaults set the learning rate)
    _user_optimizer = False

    def _open_experience(self) -> None:
        """The experience's classes (present, new, returning, old; ``experience_classes``),
        the task its new classes make (checked against the layout), the prompts it trains
        and its number of epochs (0 when nothing trains)."""
        self.experience_classes = read_experience(
            self.model, self.config, self.experience, self.model.add_task
        )
        self.current_task = self.model.n_tasks - 1
        trainable = self._set_trainable_prompts()
        # nothing to train when every class returns with frozen prompts: statistics only
        self.train_epochs = (
            0
            if not trainable
            else (self.config.init_epochs if self.current_task == 0 else self.config.epochs)
        )

    def _set_trainable_prompts(self) -> bool:
        """Prompts of this experience: the new task's, every earlier task's with
        ``update_old_text_prompts``, and those of returning classes unless
        ``returning_class_prompts == "freeze"`` (other classes of their tasks stay fixed).

        Returns whether anything (prompts or the image adapter) trains in this experience.
        """
        model, classes = self.model, self.experience_classes
        trainable = set(range(model.n_tasks)) if self.config.update_old_text_prompts else set()
        if classes.task is not None:
            trainable.add(classes.task)
        self.frozen_rows = []
        if self.config.returning_class_prompts == "train":
            for task in sorted({model.task_of(c) for c in classes.returning} - trainable):
                keep = torch.tensor(
                    [c not in classes.returning for c in model.task_classes[task]],
                    device=model.prompts[task].ctx.device,
                )
                self.frozen_rows.append((model.prompts[task].ctx, keep))
                trainable.add(task)
        model.set_trainable_prompts(sorted(trainable))
        return bool(trainable) or model.adapter is not None

    def base_lr(self) -> float:
        """Stage-1 learning rate before decay: the user optimizer's, else the config's."""
        if self._user_optimizer:
            return float(self.optimizer.defaults["lr"])
        return self.config.init_lr if self.current_task == 0 else self.config.lr

    def make_optimizer(self, reset_optimizer_state=False, **kwargs):
        """The trainable prompts (and the adapter) become the optimizer's one param group.

        The optimizer object stays for the whole stream (a scheduler plugin keeps a reference
        to it); its state is reset when the parameters change. Never the frozen CLIP.
        """
        # a context shared by every task's prompts (CoOp) is one parameter
        params = list(dict.fromkeys(p.ctx for p in self.model.prompts if p.ctx.requires_grad))
        if self.model.adapter is not None:
            params += list(self.model.adapter.parameters())
        groups = self.optimizer.param_groups
        current = [p for g in groups for p in g["params"]]
        if not reset_optimizer_state and [id(p) for p in current] == [id(p) for p in params]:
            return
        lr = groups[0]["lr"] if self.user_scheduler and groups else self.base_lr()
        groups.clear()
        self.optimizer.state.clear()
        self.optimizer.add_param_group({"params": params, "lr": lr})

    def epoch_lr(self, epoch: int) -> float:
        """Stage-1 learning rate at ``epoch`` (0-based) of the current task (step decay)."""
        steps = sum(1 for e in self.config.lr_decay_epochs if epoch >= e)
        return self.base_lr() * self.config.lr_decay_factor**steps


def avalanche_sizes(
    config, train_mb_size: Optional[int], train_epochs: Optional[int], eval_mb_size: Optional[int]
):
    """``config`` with Avalanche's constructor sizes where given: ``train_mb_size`` is
    ``batch_size``, ``train_epochs`` both ``init_epochs`` and ``epochs``, ``eval_mb_size``
    ``eval_batch_size``."""
    overrides = {
        key: value
        for key, value in (
            ("batch_size", train_mb_size),
            ("init_epochs", train_epochs),
            ("epochs", train_epochs),
            ("eval_batch_size", eval_mb_size),
        )
        if value is not None
    }
    return config.replace(**overrides) if overrides else config


def read_experience(
    model, config, experience, register: Callable[[List[int]], int]
) -> ExperienceClasses:
    """The classes of ``experience`` against what ``model`` has seen: present, new,
    returning and old ones; the new ones, checked against the config's layout (and, for the
    first experience, the stream's class count), become a task through ``register(new) ->
    task index``. Raises ``ConfigError`` in one line for a layout the stream breaks."""
    if model.n_tasks == 0:
        classes = stream_class_count(experience)
        if classes is not None:
            config.check_class_count(classes, "the stream")
    present = sorted(int(c) for c in classes_of(experience))
    seen = set(model.seen_classes)
    new = [c for c in present if c not in seen]
    returning = [c for c in present if c in seen]
    task = None
    if new:
        task = model.n_tasks
        # a layout key left unset (None) takes the stream's experiences as they come
        expected = config.task_size(task)
        if not returning and expected is not None and len(new) != expected:
            raise ConfigError(
                f"experience {task} has {len(new)} classes but the config "
                f"expects {expected} (init_class={config.init_class}, "
                f"increment={config.increment}); make them agree"
            )
        if config.total_tasks is not None and task >= config.total_tasks:
            raise ConfigError(
                f"experience {task} is beyond total_tasks={config.total_tasks}; raise total_tasks"
            )
        task = register(new)
    return ExperienceClasses(
        present=present,
        new=new,
        returning=returning,
        task=task,
        old=[c for c in model.seen_classes if c not in set(present)],
    )
