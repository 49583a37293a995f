"""Adversarial token prefixes: k tokens put in front of a prompt and optimised against a loss of the text condition
they produce. Shared by the white-box attacks (UnlearnDiffAtk's discrete prefix) and adversarial training (AdvUnlearn
attacks with a soft prefix in its inner loop), so the inner attack is written once.

Layout (UnlearnDiffAtk `insertion_location="prefix_k"`): [SOT, a_1 … a_k, prompt tokens, EOS, pad …] at the
tokenizer's length; the prompt is truncated to make room, so its EOS (where the pooled output is read) stays.

`discrete=True` (UnlearnDiffAtk, `src/attackers/text_grad_.py`): slot i holds a distribution u_i over the vocabulary,
kept on the simplex {u ≥ 0, Σu = 1} by Euclidean projection after every Adam step (lr 0.01, weight decay 0.1). The
forward pass samples one token per slot from u_i (straight-through: backward hands the gradient, clipped to
[−1, 1], to u_i), so the condition always comes from real tokens; the attack reads out argmax u_i. The reference
projects by bisection to 1e-5; the sort-based projection here is the same projection, exact.

`discrete=False` (AdvUnlearn, `attack_embd_type="word_embd"`): the slots are free token embeddings, started at the
embeddings of random vocabulary tokens; Adam on the gradient, or on its sign (its `fast_at` option).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .families import text_pairs
from .text import encoder_outputs, same_vocabulary


@contextmanager
def token_embeddings_replaced(encoder: nn.Module, positions: slice | torch.Tensor, values: torch.Tensor):
    """While active, `encoder`'s token embeddings at `positions` (a slice, or a tensor of k indices) of every row
    are `values` (k, dim)."""
    def hook(module, args, output):
        rows = values.to(output.dtype)[None].expand(output.shape[0], -1, -1)
        if isinstance(positions, slice):
            return torch.cat([output[:, : positions.start], rows, output[:, positions.stop :]], dim=1)
        return output.index_copy(1, positions.to(output.device), rows)

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def project_to_simplex(u: torch.Tensor) -> torch.Tensor:
    """Rows of `u` projected onto the probability simplex (Euclidean; Duchi et al. 2008)."""
    ordered, _ = u.sort(dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    index = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    support = (ordered - cumulative / index > 0).sum(-1, keepdim=True)
    theta = cumulative.gather(-1, support - 1) / support.to(u.dtype)
    return (u - theta).clamp_min(0)


class _SampleTokens(torch.autograd.Function):
    """One-hot tokens drawn from each row's distribution; straight-through gradient clipped to [−1, 1]."""

    @staticmethod
    def forward(ctx, probabilities, generator):
        drawn = torch.multinomial(probabilities.detach().float().cpu(), 1, generator=generator).squeeze(-1)
        return F.one_hot(drawn, probabilities.shape[-1]).to(probabilities)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


class AdversarialPrefix:
    """k optimised tokens before `prompt` on the pipeline's text encoders.

    SDXL's two CLIP encoders share one vocabulary, so a discrete prefix is one distribution per slot and each drawn
    token enters both encoders, through each one's own embedding table; `conditions()` gives their concatenated
    hidden states and the pooled vector, as `encode_prompt` makes them. A soft prefix lives in one encoder's
    embedding space, so it needs one text encoder (SD 1.x/2.x).

    Args:
        pipe: an SD 1.x/2.x or SDXL pipeline.
        prompt: the prompt the prefix is put in front of.
        k: the number of adversarial tokens.
        discrete: a distribution per slot (UnlearnDiffAtk) or free embeddings (AdvUnlearn).
        lr, weight_decay: Adam's; `sign_step=True` gives Adam the gradient's sign (AdvUnlearn `fast_at`).
        generator: a CPU generator for the initialisation and the token draws.
    """

    def __init__(self, pipe, prompt: str, k: int, *, discrete: bool = True, lr: float = 0.01,
                 weight_decay: float = 0.1, sign_step: bool = False, generator: torch.Generator | None = None):
        self.pairs = pairs = text_pairs(pipe)
        if len(pairs) > 1 and not (discrete and same_vocabulary(pairs)):
            raise ValueError("Adversarial prefixes run on one text encoder (SD 1.x/2.x), or discrete on encoders "
                             "that share a vocabulary and concatenate their features (SDXL).")
        if k < 1:
            raise ValueError(f"The adversarial prefix needs k ≥ 1 tokens, got {k!r}.")
        self.tokenizer, self.encoder, self.row = pairs[0]
        self.k, self.discrete, self.lr, self.sign_step = k, discrete, lr, sign_step
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.slots = slice(1, 1 + k)
        self.all_ids = [self._prompt_ids(prompt, tokenizer) for tokenizer, _, _ in pairs]  # each pads its own way
        self.prompt_ids = self.all_ids[0]
        table = self.encoder.get_input_embeddings().weight
        if discrete:
            start = torch.full((k, table.shape[0]), 1.0 / table.shape[0], device=table.device)
        else:
            drawn = torch.randint(table.shape[0], (k,), generator=self.generator)
            start = table.detach()[drawn.to(table.device)].float().clone()
        self.variable = nn.Parameter(start)
        self.optimizer = torch.optim.Adam([self.variable], lr=lr, weight_decay=weight_decay if discrete else 0.0)

    def _prompt_ids(self, prompt: str, tokenizer) -> torch.Tensor:
        """[SOT, k placeholders, prompt, EOS, pad …]: the placeholders' embeddings are replaced, never read."""
        length = tokenizer.model_max_length
        ids = tokenizer(prompt, padding="max_length", max_length=length - self.k, truncation=True,
                        return_tensors="pt").input_ids[0]
        self.prompt_tokens = tokenizer(prompt, add_special_tokens=False, truncation=True,
                                       max_length=length - self.k - 2).input_ids
        placeholder = tokenizer("x", add_special_tokens=False).input_ids[:1] or [0]
        return torch.cat([ids[:1], torch.tensor(placeholder * self.k), ids[1:]])

    def _one_hot(self, sample: bool) -> torch.Tensor:
        if sample:
            return _SampleTokens.apply(self.variable, self.generator)
        return F.one_hot(self.variable.argmax(-1), self.variable.shape[-1]).to(self.variable)

    def slot_embeddings(self, sample: bool = True, encoder: nn.Module | None = None,
                        one_hot: torch.Tensor | None = None) -> torch.Tensor:
        """(k, dim) embeddings of the slots in `encoder` (default the first): drawn tokens (discrete, `sample`),
        argmax tokens, or the free ones."""
        if not self.discrete:
            return self.variable
        one_hot = self._one_hot(sample) if one_hot is None else one_hot
        table = (encoder or self.encoder).get_input_embeddings().weight
        return one_hot @ table.to(one_hot.dtype)

    def condition(self, sample: bool = True, fixed: bool = False) -> torch.Tensor:
        """(1, tokens, dim): the hidden states the denoiser reads for [prefix ⊕ prompt], differentiable in the
        prefix (and in whatever the encoder trains); `fixed=True` holds the prefix constant (a defence step)."""
        return self.conditions(sample, fixed)[0]

    def conditions(self, sample: bool = True, fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled vector or None): every encoder reads the same drawn tokens; the states are
        concatenated along the features and the pooled vector is the pooled encoder's, as SDXL's `encode_prompt`."""
        one_hot = self._one_hot(sample) if self.discrete else None
        states, pooled = [], None
        for (_, encoder, row), ids in zip(self.pairs, self.all_ids):
            ids = ids[None].to(encoder.device)
            slots = self.slot_embeddings(sample, encoder, one_hot)
            with token_embeddings_replaced(encoder, self.slots, slots.detach() if fixed else slots):
                hidden, vector = encoder_outputs(encoder, row, ids, torch.ones_like(ids))
            states.append(hidden)
            pooled = vector if vector is not None else pooled
        return torch.cat(states, dim=-1), pooled

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step on the prefix only (no gradient reaches a model parameter's `.grad`)."""
        (grad,) = torch.autograd.grad(loss, [self.variable])
        if not torch.isfinite(grad).all():
            raise FloatingPointError("The adversarial prefix's gradient is not finite; lower the attack's lr.")
        self.variable.grad = grad.sign() if self.sign_step else grad
        self.optimizer.step()
        self.variable.grad = None
        if self.discrete:
            with torch.no_grad():
                self.variable.copy_(project_to_simplex(self.variable))

    def tokens(self) -> list[int]:
        """The prefix's tokens (argmax of each slot's distribution); discrete prefixes only."""
        if not self.discrete:
            raise ValueError("A soft prefix has no tokens; read `slot_embeddings()`.")
        return self.variable.argmax(-1).tolist()

    def text(self) -> str:
        """The attacked prompt as a user would type it: the prefix tokens decoded, then the prompt."""
        return self.tokenizer.decode(self.tokens() + self.prompt_tokens, skip_special_tokens=True).strip()
