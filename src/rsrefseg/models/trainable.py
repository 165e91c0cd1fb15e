"""What both architectures share about their weights: a checkpoint holds only the trainable ones.

The frozen backbones are rebuilt from the config (pretrained files, or `model.init_seed` for
`tiny`), so `trainable_state_dict` is everything a checkpoint must hold.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from rsrefseg.models.errors import state_dict_problems


class TrainableWeights(nn.Module):
    """A mixin for the composed models (RSRefSeg, RSRefSeg-2)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters, plus the buffers of modules that own trainable parameters (the
        prompters' BatchNorm running statistics)."""
        keys = self._trainable_keys()
        return {k: v.detach() for k, v in self.state_dict().items() if k in keys}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what `trainable_state_dict` gave; keys and shapes must match exactly."""
        problems = state_dict_problems(self.trainable_state_dict(), dict(state))
        if problems:
            raise ValueError("trainable weights do not fit this model: " + "; ".join(problems))
        # strict=False: `state` holds only the trainable subset, checked exactly above.
        self.load_state_dict(dict(state), strict=False)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) number of parameters."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def _trainable_keys(self) -> set[str]:
        keys = {name for name, p in self.named_parameters() if p.requires_grad}
        for module_name, module in self.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                prefix = f"{module_name}." if module_name else ""
                keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
        return keys
