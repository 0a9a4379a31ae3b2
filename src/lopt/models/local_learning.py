"""The LoPT block wrapper: k contiguous blocks, gradient boundaries between them, reconstruction heads.

The wrapper does not re-implement the model's forward (masks, rotary embeddings and caches differ
between architectures and transformers versions). It hooks the model's own decoder layers instead:
- a pre-hook on the first layer of each non-final block records the block's input;
- a hook on the last layer of each non-final block computes the block's local reconstruction loss
  and hands the *detached* output to the next block, so no gradient crosses a block boundary.
With local backward the second hook also runs the block's backward on the spot, so the block's
activations are freed before the next block runs: peak activation memory is that of one block.

`num_blocks=1` is end-to-end training: no boundary, no head, the model as it is.
The model may carry LoRA adapters (a peft `PeftModel`, models/lora.py): the hooks sit on the same
decoder layers, so each block's adapters learn from that block's objective.
`early_blocks="frozen"` is the ablation that separates local reconstruction from merely freezing
the bottom of the model: the boundaries stay, the non-final blocks and embeddings are not trained.
`aux_loss` picks the reconstruction objective (RECONSTRUCTION_LOSSES): the paper's mean squared error, or that
error relative to the block input's spread, which puts every block's local loss on one scale.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lopt.errors import LoptError, unknown_choice
from lopt.models.adapters import model_parts
from lopt.models.lora import merged

BackwardFn = Callable[[torch.Tensor], None]
EARLY_BLOCK_MODES = ("recon", "frozen")
# Keeps recon_normalized finite for a token whose block input is constant over the hidden dimension; far below
# the per-token variance of any real residual stream, so it does not bend the loss's scale invariance.
VARIANCE_EPS = 1e-6


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """recon (the paper's): each token's mean squared error over the hidden dimension."""
    return (prediction - target).pow(2).mean(dim=-1)


def normalized_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """recon_normalized: each token's mean squared error divided by the variance of its target over the hidden
    dimension. Scaling a block's input (and a prediction at the same relative error) leaves it unchanged, so blocks
    whose residual streams differ in magnitude by orders (as they do with depth) get losses on one scale: predicting
    each token's mean value scores 1. The variance is a constant of the target, not trained through."""
    variance = target.detach().var(dim=-1, unbiased=False)
    return squared_error(prediction, target) / (variance + VARIANCE_EPS)


# --aux_loss: the per-token reconstruction error of each value (config/method.py lists the same names for --help)
RECONSTRUCTION_LOSSES = {"recon": squared_error, "recon_normalized": normalized_squared_error}


@dataclass(frozen=True)
class LoptSettings:
    """LoPT's settings, as one object: the run config makes it (`config.lopt`, None for end-to-end training) and the
    wrapper (`LocalLearningLM.from_settings`), the step, the optimizer, the TRL mixin and the backends read it, so
    "is this LoPT" has one answer. The defaults are the paper's."""

    num_blocks: int = 2  # contiguous blocks k
    lambda_aux: float = 10.0  # weight of the mean local loss in the objective
    early_blocks: str = "recon"  # EARLY_BLOCK_MODES: trained by their local loss, or frozen (ablation)
    aux_loss: str = "recon"  # RECONSTRUCTION_LOSSES: the non-final blocks' local objective
    backward: str = "local"  # local (block by block, frees activations) or joint (one backward over the sum)
    lr_k1: float | None = None  # learning rate of embeddings, early blocks and heads (None: the learning rate)
    clip_per_block: bool = False  # clip each block by its own gradient norm, not all by the global norm
    block_step: bool = False  # step each block right after its backward (the SFT loop, replicated backend)


def split_blocks(num_layers: int, num_blocks: int) -> list[range]:
    """Contiguous blocks whose sizes differ by at most one; the earliest blocks get the extra layers."""
    if not 1 <= num_blocks <= num_layers:
        raise LoptError(
            f"--num_blocks {num_blocks} is out of range for a model with {num_layers} decoder layers; "
            f"use a value from 2 to {num_layers} (2 is the paper's default)."
        )
    base, extra = divmod(num_layers, num_blocks)
    blocks, start = [], 0
    for i in range(num_blocks):
        size = base + (1 if i < extra else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


class ReconstructionHead(nn.Module):
    """Training-only head: predicts a block's input from its output (LayerNorm, bottleneck MLP)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, hidden_size // 4),
            nn.GELU(),
            nn.Linear(hidden_size // 4, hidden_size),
        )
        for module in self.net:
            if isinstance(module, nn.Linear):
                # A small gain keeps the head's first predictions near zero, so the local loss starts
                # from the scale of the block input rather than from a random projection of it.
                nn.init.xavier_uniform_(module.weight, gain=0.1)
                nn.init.zeros_(module.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


@dataclass
class _BoundaryStep:
    """What the layer hooks need during one training forward."""

    backward: BackwardFn | None  # local backward: run each block's backward on the spot; None: joint
    aux_weight: float  # weight of one block's local loss in the step objective
    token_mask: torch.Tensor | None  # [batch, seq], 1 for real tokens: padding takes no part in the local loss
    measure: bool = False  # validation: compute the local losses without gradients too
    after_backward: Callable[[int], None] | None = None  # --block_step: called with a block's index after its backward
    losses: list[torch.Tensor] = field(default_factory=list)
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


def _first_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(output, hidden: torch.Tensor):
    # Decoder layers return a tensor (transformers 5) or a tuple led by the hidden states (4.x, GPT-2).
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def backbone_hidden_states(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """A transformers backbone's final hidden states. Packed rows (`position_ids` restarting at each example,
    data/collate.py) go without the attention mask: given positions and no mask, transformers builds the
    block-diagonal causal mask from the positions (masking_utils' packed-sequence detection; flash attention's
    variable-length path on GPU), so no example of a row attends to another."""
    if position_ids is not None:
        out = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    else:
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


class LocalLearningLM(nn.Module):
    """A Hugging Face causal LM (or a reward model: a sequence classifier with one label) split into `num_blocks`
    locally trained blocks."""

    def __init__(
        self,
        model: nn.Module,
        num_blocks: int = 2,
        lambda_aux: float = 10.0,
        early_blocks: str = "recon",
        aux_loss: str = "recon",
    ):
        super().__init__()
        if early_blocks not in EARLY_BLOCK_MODES:
            raise unknown_choice("--early_blocks", early_blocks, EARLY_BLOCK_MODES)
        if aux_loss not in RECONSTRUCTION_LOSSES:
            raise unknown_choice("--aux_loss", aux_loss, list(RECONSTRUCTION_LOSSES))
        self.model = model  # a transformers causal LM or reward model, or a PeftModel around one
        self.parts = model_parts(self.base_model)
        self.blocks = split_blocks(len(self.parts.layers), num_blocks)
        self.lambda_aux = lambda_aux
        self.early_blocks = early_blocks
        self.aux_loss = aux_loss
        hidden_size = self.parts.embeddings[0].weight.shape[1]
        heads = len(self.blocks) - 1 if early_blocks == "recon" else 0
        self.aux_heads = nn.ModuleList(ReconstructionHead(hidden_size) for _ in range(heads))
        self.aux_heads.to(device=self.parts.embeddings[0].weight.device)
        self._step: _BoundaryStep | None = None
        # LoPT's settings (None: end-to-end); `from_settings` gives the whole object, with the step's and optimizer's
        self.settings = LoptSettings(num_blocks, lambda_aux, early_blocks, aux_loss) if num_blocks > 1 else None
        if num_blocks > 1:
            self._untie_embeddings()
            if early_blocks == "frozen":
                self._freeze_early_blocks()
            for i, block in enumerate(self.blocks[:-1]):
                self.parts.layers[block.start].register_forward_pre_hook(
                    functools.partial(self._record_block_input, i), with_kwargs=True
                )
                self.parts.layers[block.stop - 1].register_forward_hook(functools.partial(self._close_block, i))

    @classmethod
    def from_settings(cls, model: nn.Module, lopt: LoptSettings | None) -> LocalLearningLM:
        """`model` in the blocks `lopt` asks for, carrying the settings; None: end-to-end (one block)."""
        if lopt is None:
            return cls(model, num_blocks=1)
        wrapped = cls(model, lopt.num_blocks, lopt.lambda_aux, lopt.early_blocks, lopt.aux_loss)
        wrapped.settings = lopt
        return wrapped

    # ---- structure -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def backward_mode(self) -> str:
        """How the step back-propagates: LoPT's --backward, local for end-to-end (one block: the same)."""
        return self.settings.backward if self.settings is not None else "local"

    @property
    def base_model(self) -> nn.Module:
        """The transformers model: `model` itself, or the one its LoRA adapters were added to."""
        return self.model.get_base_model() if self.uses_adapters else self.model

    @property
    def uses_adapters(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def config(self):
        return self.base_model.config

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """'final': what the task loss trains (final block, final norm, LM head); 'early': the rest.

        With one block (end-to-end) everything is 'final'.
        """
        final_modules = [self.parts.layers[i] for i in self.blocks[-1]] + [self.parts.final_norm, self.parts.head]
        if self.num_blocks == 1:
            final_modules = [self.model]
        final_ids = {id(p) for m in final_modules for p in m.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"early": [], "final": []}
        for p in self.parameters():  # deduplicated, so a tied weight appears once
            if p.requires_grad:
                groups["final" if id(p) in final_ids else "early"].append(p)
        return groups

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """The trained parameters each block's objective reaches, block by block: the embeddings with block 1, each
        early block's reconstruction head with it, the final norm and LM head with the final block (end-to-end: one
        block, all of them). With local backward a block's gradients are final after its own backward (--block_step
        steps them there). The per-block gradient norms and clipping (training/optim.py) group by these too."""
        parts = self.parts
        modules = [[parts.layers[i] for i in block] for block in self.blocks]
        modules[0] += list(parts.embeddings)
        for i, head in enumerate(self.aux_heads):
            modules[i].append(head)
        modules[-1] += [parts.final_norm, parts.head]
        blocks, placed = [], set()
        for block_modules in modules:
            # keyed by id, so a weight shared within the block (E2E's tied embeddings and LM head) appears once
            block = {id(p): p for m in block_modules for p in m.parameters() if p.requires_grad and id(p) not in placed}
            placed |= block.keys()
            blocks.append(list(block.values()))
        stray = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in placed]
        if stray:
            raise LoptError(
                f"Trained parameters outside every block of this model: {', '.join(stray[:5])}. Per-block steps, "
                "clipping and gradient norms need each in a block; models/adapters.py names the parts of a family."
            )
        return blocks

    def _untie_embeddings(self) -> None:
        # With tied weights the LM head (trained by the task loss) would also be the input embedding
        # (trained locally by block 1), so the task gradient would cross the first boundary. A frozen
        # tied matrix (LoRA freezes both) gets no gradient at all: untying it would only add a copy.
        head, embed = self.parts.head, self.parts.embeddings[0]
        if not (head.weight.requires_grad or embed.weight.requires_grad) or head.weight.shape != embed.weight.shape:
            return  # frozen, or a reward model's score head, which is never tied
        config = self.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
            head.weight = nn.Parameter(embed.weight.detach().clone())
        text_config.tie_word_embeddings = False
        config.tie_word_embeddings = False

    def _freeze_early_blocks(self) -> None:
        early = list(self.parts.embeddings) + [self.parts.layers[i] for b in self.blocks[:-1] for i in b]
        for module in early:
            module.requires_grad_(False)

    # ---- hooks -----------------------------------------------------------------------------------
    def _active_step(self) -> _BoundaryStep | None:
        """The step a forward belongs to; forwards without gradients inside a training step (a reference model's,
        a generation's) take no part in it, unless the step measures (validation)."""
        step = self._step
        return step if step is not None and (step.measure or torch.is_grad_enabled()) else None

    def _record_block_input(self, block: int, module, args, kwargs):
        step = self._active_step()
        if step is not None and self.aux_heads:
            step.block_inputs[block] = _first_hidden(args, kwargs)
        return None

    def _close_block(self, block: int, module, args, output):
        step = self._active_step()
        if step is None and not torch.is_grad_enabled():
            return None
        hidden = _hidden_of(output)
        if step is not None and self.aux_heads:
            target = step.block_inputs.pop(block).detach()
            loss = self._reconstruction_loss(block, hidden, target, step.token_mask)
            if step.backward is not None:
                step.backward(step.aux_weight * loss)  # frees this block's activations now
                loss = loss.detach()
                if step.after_backward is not None:
                    step.after_backward(block)  # the block's gradients are final: its optimizer step can run
            step.losses.append(loss)
        return _with_hidden(output, hidden.detach())

    def _reconstruction_loss(self, block, hidden, target, token_mask) -> torch.Tensor:
        """The --aux_loss error (RECONSTRUCTION_LOSSES) in float32 between head(block output) and the block input,
        averaged over real tokens.

        The heads are created in float32; DeepSpeed's bf16 mode casts them with the model, so the head
        runs in whatever dtype its weights have now.
        """
        head = self.aux_heads[block]
        prediction = head(hidden.to(head.net[0].weight.dtype)).float()
        per_token = RECONSTRUCTION_LOSSES[self.aux_loss](prediction, target.float())
        if token_mask is None:
            return per_token.mean()
        mask = token_mask.to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)

    @contextlib.contextmanager
    def boundary_step(
        self,
        backward: BackwardFn | None,
        aux_weight: float,
        token_mask: torch.Tensor | None = None,
        measure: bool = False,
        after_backward: Callable[[int], None] | None = None,
    ) -> Iterator[list[torch.Tensor]]:
        """Within this context a forward computes the local losses, yielded as a list (one per block).

        With `backward` given (local mode) each block's weighted loss is back-propagated as soon as the
        block has run and the list holds detached values; with None (joint mode) the losses keep their
        graphs and the caller adds them to the task loss. `token_mask` (the attention mask) keeps
        padding out of the local losses. `measure` (validation, under torch.no_grad) computes the local losses
        of forwards without gradients too, with no backward. `after_backward(block)` runs after each early block's
        local backward (--block_step).
        """
        self._step = _BoundaryStep(
            backward=backward, aux_weight=aux_weight, token_mask=token_mask, measure=measure,
            after_backward=after_backward,
        )  # fmt: skip
        try:
            yield self._step.losses
        finally:
            self._step = None

    # ---- forward passes --------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The wrapped model's forward: same outputs (boundaries only detach, they change no value)."""
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (normed) hidden states, the LM head's input; the loss applies the head chunk by chunk."""
        return backbone_hidden_states(self.parts.backbone, input_ids, attention_mask, position_ids)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer in backward instead of storing its activations.

        We checkpoint each layer's `forward` (non-reentrant) rather than calling transformers'
        `gradient_checkpointing_enable`: module hooks then stay outside the checkpointed region on
        every transformers version, so a recomputation never re-runs a block boundary.
        """
        for layer in self.parts.layers:
            if not isinstance(layer.forward, functools.partial):
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)

    def merge_adapters(self) -> None:
        """Fold the LoRA adapters into the base weights, so the model saves as a plain checkpoint (--merge_lora).
        For the end of training: the adapters are gone afterwards."""
        if self.uses_adapters:
            self.model = merged(self.model)

    def save_pretrained(self, output_dir, tokenizer=None) -> None:
        """A plain Hugging Face checkpoint (with adapters: peft's adapter folder): the wrapped model only,
        never the reconstruction heads. Only the trained adapter is saved: TRL's DPO adds a frozen copy
        of it as the reference, which is no part of the result."""
        if self.uses_adapters:
            self.model.save_pretrained(output_dir, selected_adapters=[self.model.active_adapter])
        else:
            self.model.save_pretrained(output_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
