"""Pipeline stages inside a model: which modules a stage holds and how activations cross.

A model built for pipeline stage s of M keeps its module tree's names (checkpoint and engine
tensor names stay global: `model.layers.17...` is layer 17 on whichever stage holds it) but
puts an `OtherStage` placeholder, with no parameters, where another stage's module would be:

    stage 0        embedding, layers [0, a)
    stage s        layers [a_s, a_{s+1})
    stage M - 1    layers [.., L), final norm, LM head

`OtherStage` modules own no tensors, so the engine file of a rank holds only its stage's, and
loading skips checkpoint tensors under them (`is_on_other_stage`).
"""

from __future__ import annotations

from torch import nn

from kiln.parallel.state import ParallelState


class OtherStage(nn.Module):
    """Where another pipeline stage's module is. Holds nothing; never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module belongs to another pipeline stage")


def stage_modules(parallel: ParallelState, num_layers: int, make_layer) -> tuple[nn.ModuleList, list[nn.Module]]:
    """(all num_layers slots, this stage's layers in order): `make_layer(i)` for the layers of
    this stage, OtherStage for the rest."""
    own = parallel.stage_layers(num_layers)
    slots = nn.ModuleList(make_layer(i) if i in own else OtherStage() for i in range(num_layers))
    return slots, [slots[i] for i in own]


def is_on_other_stage(module_name: str, modules: dict[str, nn.Module]) -> bool:
    """True when `module_name` (a dotted name in the full model) lies under an OtherStage
    placeholder of this stage's model."""
    parts = module_name.split(".")
    for end in range(1, len(parts) + 1):
        if isinstance(modules.get(".".join(parts[:end])), OtherStage):
            return True
    return False
