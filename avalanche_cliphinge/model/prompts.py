"""Learnable text prompts: CoOp-style context vectors, one set per class, or one set shared
by every class (CoOp's unified context, ``unified_context``)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def encode_token_embeddings(clip: nn.Module, embeddings: Tensor, tokens: Tensor) -> Tensor:
    """Run open_clip's text tower on token *embeddings* instead of token ids.

    Mirrors ``open_clip.CLIP.encode_text`` after its embedding lookup, so learned context
    vectors can stand in for word tokens. The text tower is causal, so the end-of-text
    feature depends only on the tokens up to it: the sequence may be cut after the last
    end-of-text position of the batch (``TaskPrompts`` keeps about 12 of 77 tokens for
    class-name prompts), which gives the same features with a fraction of the work.

    Args:
        clip: an open_clip ``CLIP`` model.
        embeddings: ``[n, length, width]`` token embeddings, ``length <= context_length``.
        tokens: ``[n, length]`` token ids of the same prompts (used to find each prompt's
            end-of-text position, the highest id in the row).

    Returns:
        ``[n, embed_dim]`` projected, unnormalised text features.
    """
    cast_dtype = clip.transformer.get_cast_dtype()
    eot = tokens.argmax(dim=-1)
    length = embeddings.shape[1]
    x = embeddings.to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    mask = clip.attn_mask
    x = clip.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _prompt_tokens(tokenizer: Callable, class_names: Sequence[str], n_ctx: int) -> Tensor:
    """``[n, context_length]`` token ids of ``X .. X name.`` (``n_ctx`` placeholders)."""
    placeholder = " ".join(["X"] * n_ctx)
    return tokenizer([f"{placeholder} {name}." for name in class_names])


def prompt_length(tokenizer: Callable, class_names: Sequence[str], n_ctx: int) -> int:
    """Tokens a prompt of any of ``class_names`` needs: one past the last end-of-text position.

    Giving every task's ``TaskPrompts`` this length (the whole stream's) makes all prompt
    tensors of equal-sized tasks the same shape, so a compiled text encoder is traced and
    captured once per run instead of once per task.
    """
    return int(_prompt_tokens(tokenizer, class_names, n_ctx).argmax(dim=-1).max()) + 1


class TaskPrompts(nn.Module):
    """The learnable prompts of one task: ``[SOS] ctx_c(1..n_ctx) name_c . [EOS]`` per class.

    Args:
        clip: the frozen open_clip model (its token embedding gives the fixed tokens).
        tokenizer: open_clip tokenizer, ``list[str] -> [n, context_length]``.
        class_names: names of the task's classes, in the task's class order.
        n_ctx: number of context vectors per class.
        ctx_init: phrase whose first ``n_ctx`` token embeddings initialise every class's
            context (missing positions, or all when empty, are drawn from N(0, 0.02^2)).
        generator: RNG for the random part of the initialisation.
        length: tokens kept per prompt, at least ``prompt_length`` of ``class_names``
            (default: exactly that). The model passes the whole stream's length so that
            every task's prompts have the same shape.
        ctx: a context ``[n_ctx, width]`` shared with other prompts (``unified_context``),
            held as this module's ``ctx`` and read by every class; default: the task's own
            ``[n_classes, n_ctx, width]``, initialised as above.

    Parameters: ``ctx [n_classes, n_ctx, width]`` (or the shared ``[n_ctx, width]``).
    Buffers: ``prefix [n, 1, width]``, ``suffix [n, L - 1 - n_ctx, width]``, ``tokens [n, L]``,
    where ``L`` is ``length`` (the causal text tower ignores the padding after the
    end-of-text token, so the rest of the context is never stored or computed).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable,
        class_names: Sequence[str],
        n_ctx: int,
        ctx_init: str = "",
        generator: Optional[torch.Generator] = None,
        length: Optional[int] = None,
        ctx: Optional[nn.Parameter] = None,
    ):
        super().__init__()
        embedding = clip.token_embedding
        width = embedding.weight.shape[1]
        device = embedding.weight.device
        tokens = _prompt_tokens(tokenizer, class_names, n_ctx).to(device)
        needed = int(tokens.argmax(dim=-1).max()) + 1
        if length is not None and not needed <= length <= tokens.shape[1]:
            raise ValueError(
                f"length {length} cannot hold these prompts: it must be between "
                f"{needed} and the context length {tokens.shape[1]}"
            )
        tokens = tokens[:, : needed if length is None else length]
        with torch.no_grad():
            embedded = embedding(tokens)
        if ctx is None:
            ctx = nn.Parameter(
                initial_context(clip, tokenizer, len(class_names), n_ctx, ctx_init, generator)
            )
        elif tuple(ctx.shape) != (n_ctx, width):
            raise ValueError(
                f"a shared context must be [n_ctx, width] = [{n_ctx}, {width}], got "
                f"{list(ctx.shape)}"
            )
        self.ctx = ctx
        self.register_buffer("prefix", embedded[:, :1].clone())
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone())
        self.register_buffer("tokens", tokens)
        self.class_names = list(class_names)

    def embeddings(self) -> Tensor:
        """``[n_classes, context_length, width]`` token embeddings with the learned context."""
        ctx = self.ctx.to(self.prefix.dtype)
        if ctx.ndim == 2:  # the shared context: the same rows for every class
            ctx = ctx.expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)

    def forward(self, clip: nn.Module) -> Tensor:
        """``[n_classes, embed_dim]`` L2-normalised prompted text features."""
        return F.normalize(encode_token_embeddings(clip, self.embeddings(), self.tokens), dim=-1)


@torch.no_grad()
def initial_context(
    clip: nn.Module,
    tokenizer: Callable,
    n_rows: int,
    n_ctx: int,
    ctx_init: str = "",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``[n_rows, n_ctx, width]`` initial context vectors in the token embedding's dtype and
    device: every row the token embeddings of the first ``n_ctx`` words of ``ctx_init``,
    positions it does not fill (all when empty) drawn from N(0, 0.02^2) by ``generator``."""
    embedding = clip.token_embedding
    width = embedding.weight.shape[1]
    ctx = torch.randn(n_rows, n_ctx, width, generator=generator) * 0.02
    ctx = ctx.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
    if ctx_init.strip():
        init_tokens = tokenizer([ctx_init.strip()]).to(embedding.weight.device)
        n_words = int(init_tokens.argmax(dim=-1)) - 1
        phrase = embedding(init_tokens)[0, 1 : 1 + min(n_words, n_ctx)]
        ctx[:, : phrase.shape[0]] = phrase
    return ctx


def unified_context(
    clip: nn.Module,
    tokenizer: Callable,
    n_ctx: int,
    ctx_init: str = "",
    generator: Optional[torch.Generator] = None,
) -> nn.Parameter:
    """CoOp's unified context: one ``[n_ctx, width]`` parameter for every class of every task
    (pass it as ``TaskPrompts``'s ``ctx``), initialised as one row of ``initial_context``;
    frozen (``requires_grad=False``) until a task trains it."""
    ctx = initial_context(clip, tokenizer, 1, n_ctx, ctx_init, generator)[0]
    return nn.Parameter(ctx, requires_grad=False)


@torch.no_grad()
def raw_text_features(
    clip: nn.Module, tokenizer: Callable, class_names: Sequence[str], template: str
) -> Tensor:
    """``[n, embed_dim]`` normalised CLIP text features of ``template.format(name)``.

    The fixed-template (unprompted) features used to choose text-side hard pairs and by
    zero-shot CLIP.
    """
    device = clip.token_embedding.weight.device
    tokens = tokenizer([template.format(name) for name in class_names]).to(device)
    return F.normalize(clip.encode_text(tokens).float(), dim=-1)
