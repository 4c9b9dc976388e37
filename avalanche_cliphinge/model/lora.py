"""One LoRA adapter per task on chosen image-encoder blocks, through peft."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn


class VisualLoRA:
    """Named LoRA adapters (one per task) injected into ``clip.visual`` with peft.

    Each adapter starts equal to the frozen base model and is trained with its task's head
    only, so later tasks cannot move the features an earlier head was trained on. The base
    weights stay untouched (peft keeps them as ``base_layer``). Every adapter is off unless
    one is switched on by ``using`` (stage 2 of its task, its head's features at
    inference): the encoder outside those contexts is the frozen base, bit for bit, so its
    features may be cached (``active`` is ``None`` there).

    Args:
        visual: open_clip's ``VisionTransformer`` (``clip.visual``).
        layers: indices of ``transformer.resblocks`` to adapt (``mlp.c_fc`` and ``mlp.c_proj``
            of each). Attention is left out on purpose: peft's LoRA for
            ``nn.MultiheadAttention`` adds the update into the frozen ``in_proj_weight`` and
            subtracts it after every forward, which drifts the frozen weights by float
            rounding (measured 1.5e-8 after 20 steps); the MLP layers are adapted exactly.
        rank, alpha: LoRA rank and scaling numerator.
    """

    def __init__(self, visual: nn.Module, layers: Sequence[int], rank: int, alpha: float):
        n_blocks = len(visual.transformer.resblocks)
        bad = [i for i in layers if not 0 <= i < n_blocks]
        if bad:
            raise ValueError(
                f"lora_layers {bad} out of range: the image encoder has {n_blocks} "
                f"blocks (indices 0..{n_blocks - 1}); fix lora_layers in the config"
            )
        self.visual = visual
        self.layers = sorted(set(layers))
        self.rank = rank
        self.alpha = alpha
        self.adapters: List[str] = []
        #: the adapter the encoder routes through now, ``None`` for the frozen base
        self.active: Optional[str] = None

    def _lora_modules(self) -> Iterator[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return (m for m in self.visual.modules() if isinstance(m, BaseTunerLayer))

    def add(self, name: str, generator: Optional[torch.Generator] = None) -> None:
        """Inject a new adapter ``name`` (initialised to a no-op: B = 0), switched off.

        ``generator`` (a CPU generator) draws the ``lora_A`` matrices, with peft's
        distribution (Kaiming uniform, ``a = sqrt(5)``), one module after the other in
        ``visual.modules()`` order; without it they keep peft's draw from the global RNG
        (fine when a saved state is loaded over them).
        """
        from peft import LoraConfig, inject_adapter_in_model

        blocks = "|".join(str(i) for i in self.layers)
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=rf"transformer\.resblocks\.({blocks})\."
            r"mlp\.(c_fc|c_proj)",
        )
        inject_adapter_in_model(config, self.visual, adapter_name=name)
        if generator is not None:
            with torch.no_grad():
                for module in self._lora_modules():
                    weight = module.lora_A[name].weight
                    drawn = torch.empty(weight.shape)
                    nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                    weight.copy_(drawn)
        self.adapters.append(name)
        self.activate(None)

    def parameters(self, name: str) -> List[nn.Parameter]:
        """The trainable LoRA tensors of adapter ``name``."""
        return [p for n, p in self.visual.named_parameters() if f".{name}." in n and "lora_" in n]

    def activate(self, name: Optional[str]) -> None:
        """Route the encoder through adapter ``name``, or through the frozen base for ``None``."""
        self.active = name
        for module in self._lora_modules():
            if name is None:
                module.enable_adapters(False)
            else:
                module.set_adapter(name)
                module.enable_adapters(True)

    @contextmanager
    def using(self, name: Optional[str]) -> Iterator[None]:
        """Context in which the encoder uses adapter ``name`` (the frozen base for ``None``);
        the adapter active before (usually none) is restored after."""
        previous = self.active
        self.activate(name)
        try:
            yield
        finally:
            self.activate(previous)
