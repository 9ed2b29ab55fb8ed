"""The optimizer a recipe's ``optim`` section asks for: AdamW (the official choice, spec §5) or Muon.

``optim.name: muon`` (a DEVIATION from the official AdamW) orthogonalises the update of every weight
matrix inside the transformer blocks (attention qkv/out, feed-forward, adaLN projections) with
``torch.optim.Muon`` (Jordan et al., 2024) at ``optim.muon_lr_scale`` × ``optim.lr``, and leaves
everything else to AdamW with the recipe's settings: the patch and caption embedders, the timestep
MLP and the final layer (input and output layers, which Muon is not meant for) and every norm weight
and bias (not matrices).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

OPTIMIZERS = ("adamw", "muon")
# Strategies whose parameters are whole matrices on every rank; Muon needs the whole matrix to
# orthogonalise it (FSDP and DeepSpeed ZeRO hand each rank a flat shard).
MUON_STRATEGIES = ("auto", "ddp")


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon parameters, AdamW parameters) of a Next-DiT: Muon takes the trainable 2-D weights of
    ``model.blocks()``; AdamW takes every other trainable parameter."""
    in_blocks = {id(p) for block in model.blocks() for p in block.parameters() if p.ndim == 2}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) in in_blocks], [p for p in trainable if id(p) not in in_blocks]


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some parameters and ``torch.optim.AdamW`` on the others, as one optimizer.

    Why our own class: Lightning's automatic optimisation, which our gradient clipping, skipped-step
    and EMA hooks build on, drives a single optimizer, and torch has none that mixes the two. All the
    maths is torch's: this class holds one param group per inner optimizer and shares its groups and
    its state with them, so the LR schedule, ``state_dict`` / ``load_state_dict`` (exact resume) and
    Lightning's device moves see one ordinary optimizer.
    """

    def __init__(self, muon_params: list[torch.nn.Parameter], adamw_params: list[torch.nn.Parameter], *,
                 lr: float, muon_lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 momentum: float = 0.95, ns_steps: int = 5) -> None:
        if not muon_params or not adamw_params:
            raise ValueError("MuonWithAdamW needs parameters for both Muon and AdamW")
        # "match_rms_adamw" scales each matrix's orthogonalised update to the RMS of an AdamW update
        # (0.2 * sqrt(max(rows, cols))), so muon_lr is on AdamW's scale.
        muon = torch.optim.Muon(muon_params, lr=muon_lr, weight_decay=weight_decay, momentum=momentum,
                                ns_steps=ns_steps, adjust_lr_fn="match_rms_adamw")
        adamw = torch.optim.AdamW(adamw_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)
        groups = [{**muon.param_groups[0], "optimizer": "muon"}, {**adamw.param_groups[0], "optimizer": "adamw"}]
        super().__init__(groups, {})
        self._inner = {"muon": muon, "adamw": adamw}
        self._link()

    def _link(self) -> None:
        """Point each inner optimizer at its group and at the shared state (re-done after a load,
        which replaces both)."""
        for group in self.param_groups:
            inner = self._inner[group["optimizer"]]
            inner.param_groups = [group]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner.values():
            inner.step()
        return loss


def build_optimizer(model: torch.nn.Module, optim: Any) -> torch.optim.Optimizer:
    """The optimizer for ``model``'s trainable parameters from a recipe's ``optim`` section."""
    betas, wd = tuple(optim.betas), optim.weight_decay
    if optim.name == "muon":
        muon_params, adamw_params = muon_split(model)
        return MuonWithAdamW(muon_params, adamw_params, lr=optim.lr, muon_lr=optim.lr * optim.muon_lr_scale,
                             betas=betas, eps=optim.eps, weight_decay=wd, momentum=optim.muon_momentum,
                             ns_steps=optim.muon_ns_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=True: torch picks the per-tensor loop on CPU, which costs the tiny recipes ~9 % of a
    # step in Python dispatch; the multi-tensor path gives bitwise the same weights (and is
    # already torch's choice on CUDA).
    return torch.optim.AdamW(params, lr=optim.lr, betas=betas, eps=optim.eps, weight_decay=wd, foreach=True)
