"""P4D, Prompting4Debugging (Chin et al., ICML 2024): find a prompt for which the erased model predicts the noise the
unerased model predicts for the concept prompt (joycenerd/P4D `2cf3cda`, `prompt_optimization/optimize_n.py`,
`optimize_k.py`).

    min_{P_adv}  E_{t, ε} ‖ ε_θ'(x_t, t, E'(P_adv)) − ε_θ(x_t, t, E(P)) ‖²,   x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε

x_0 is the reference (unerased) model's image of the case; t ~ U{0 … T−1} and fresh ε each step; both predictions
are conditional (no guidance), as the reference's default. The prompt is optimised PEZ-style: continuous token
embeddings are projected to their nearest vocabulary embeddings (cosine) for the forward pass, and the gradient of
the projected ones updates the continuous ones (straight-through), with AdamW (lr 0.1, weight decay 0.1).

- `variant="n"` (P4D-N): N = 16 learnable tokens replace the prompt, started at random vocabulary tokens.
- `variant="k"` (P4D-K): a learnable token before every K = 3 tokens of the prompt ([a, t1, t2, t3, a, t4, …]); the
  prompt's own tokens stay.

Every `eval_every` steps the projected tokens are decoded and the prompt is generated and judged at the case's
seed; the attack stops at the first success. Differences from the reference, all in docs/robustness.md: it picks
its best prompt by CLIP ViT-H image similarity and judges once at the end (no such weights here: every evaluated
prompt is judged by the detector, as UnlearnDiffAtk is); the adversarial prompt goes through the *attacked*
pipeline's text encoder (the reference swaps only UNets, so its two encoders are one); sequences are padded as the
pipeline pads (the reference pads with id 0), and P4D-K keeps its end token (the reference overwrites it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adversarial import token_embeddings_replaced
from ..families import text_pairs
from ..text import encoder_states
from ._core import Attack, Tries


class PEZPrompt:
    """Token ids with learnable positions: continuous embeddings, projected to vocabulary tokens (cosine) in the
    forward pass, updated straight-through by AdamW."""

    def __init__(self, pipe, prompt: str, variant: str, n_tokens: int, every_k: int, lr: float, weight_decay: float,
                 generator: torch.Generator):
        pairs = text_pairs(pipe)
        if len(pairs) != 1:
            raise ValueError("P4D supports pipelines with one text encoder (SD 1.x/2.x) here.")
        if variant not in ("n", "k"):
            raise ValueError(f"P4D's variant is 'n' (P4D-N) or 'k' (P4D-K), got {variant!r}.")
        self.tokenizer, self.encoder, self.row = pairs[0]
        length, tokenizer = self.tokenizer.model_max_length, self.tokenizer
        words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if variant == "n":
            layout = [None] * n_tokens  # None: a learnable position
        else:
            layout = []
            for i in range(0, len(words) + 1, every_k):  # ⌊L/K⌋ + 1 learnable tokens
                layout += [None] + words[i:i + every_k]
            layout = layout[: len(words) + len(words) // every_k + 1]
        layout = layout[: length - 2]
        self.layout = layout
        ids = [tokenizer.bos_token_id] + [w if w is not None else tokenizer.bos_token_id for w in layout]
        ids += [tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.ids = torch.tensor(ids + [pad] * (length - len(ids)))
        self.positions = torch.tensor([1 + i for i, w in enumerate(layout) if w is None])
        table = self.encoder.get_input_embeddings().weight.detach().float()
        self.table, self.unit_table = table, F.normalize(table, dim=-1)  # frozen: normalised once, not per step
        drawn = torch.randint(table.shape[0], (len(self.positions),), generator=generator)
        self.variable = torch.nn.Parameter(table[drawn.to(table.device)].clone())
        self.optimizer = torch.optim.AdamW([self.variable], lr=lr, weight_decay=weight_decay)

    def projected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, embeddings) of the learnable positions: the nearest vocabulary rows by cosine similarity."""
        with torch.no_grad():
            nearest = (F.normalize(self.variable, dim=-1) @ self.unit_table.T).argmax(-1)
        return nearest, self.table[nearest]

    def condition(self) -> torch.Tensor:
        """(1, tokens, dim) hidden states of the projected prompt, with the straight-through gradient to the
        continuous embeddings."""
        _, embeddings = self.projected()
        through = self.variable + (embeddings - self.variable).detach()
        ids = self.ids[None].to(self.encoder.device)
        with token_embeddings_replaced(self.encoder, self.positions, through):
            return encoder_states(self.encoder, self.row, ids, torch.ones_like(ids))

    def step(self, loss: torch.Tensor) -> None:
        (grad,) = torch.autograd.grad(loss, [self.variable])
        if not torch.isfinite(grad).all():
            raise FloatingPointError("P4D's gradient is not finite; lower its lr.")
        self.variable.grad = grad
        self.optimizer.step()
        self.variable.grad = None

    def text(self) -> str:
        """The prompt a user would type: the projected tokens in place, decoded."""
        nearest = iter(self.projected()[0].tolist())
        tokens = [w if w is not None else next(nearest) for w in self.layout]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def run(context, case, rng, *, variant, n_tokens, every_k, iterations, eval_every, lr=0.1, weight_decay=0.1):
    pipe, reference = context.pipe, context.reference
    unet = pipe.unet
    x0 = context.reference_latents(case.prompt, case.seed).to(unet.device, unet.dtype)
    with torch.no_grad():
        target_condition = reference.encode_prompt(case.prompt, reference.unet.device, 1, False)[0]
    prompt = PEZPrompt(pipe, case.prompt, variant, n_tokens, every_k, lr, weight_decay, rng)
    scheduler, tries = pipe.scheduler, Tries(context, case)
    for step in range(iterations):
        if step % eval_every == 0:
            text = prompt.text()
            if tries.judge(text, prompts=[text]):
                break
        t = torch.randint(scheduler.config.num_train_timesteps, (1,), generator=rng).to(x0.device)
        noise = torch.randn(x0.shape, generator=rng).to(x0.device, torch.float32)
        alpha = scheduler.alphas_cumprod.to(x0.device, torch.float32)[t]
        x_t = (alpha.sqrt() * x0.float() + (1 - alpha).sqrt() * noise).to(x0.dtype)
        with torch.no_grad():
            target = reference.unet(x_t, t, encoder_hidden_states=target_condition.to(x0.dtype)).sample
        prediction = unet(x_t, t, encoder_hidden_states=prompt.condition().to(unet.dtype)).sample
        prompt.step(F.mse_loss(prediction.float(), target.float()))
    return tries.result()


ATTACK = Attack(
    name="p4d",
    run=run,
    budgets={"quick": {"variant": "k", "n_tokens": 16, "every_k": 3, "iterations": 200, "eval_every": 50},
             "paper": {"variant": "k", "n_tokens": 16, "every_k": 3, "iterations": 3000, "eval_every": 50}},
    needs_reference=True,
    families=("sd1", "sd2"),
    family_note="its prompt is optimised on one tokenizer and text encoder.",
    paper="Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts (ICML 2024)",
)
