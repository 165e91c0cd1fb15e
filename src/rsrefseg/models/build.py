"""`build_model`: the model a config describes, of either architecture (`model.arch`).

    rsrefseg   RSRefSeg (models/rsrefseg.py): SigLIP + AttnPrompter + SAM
    rsrefseg2  RSRefSeg-2 (models/rsrefseg2.py): SigLIP 2 + the cascaded prompter + SAM 2.1

Both take the same inputs (`device_inputs.model_batch`), return mask logits at the label size,
and share the trainable-weights interface (models/trainable.py), so training, evaluation,
prediction, checkpoints and serving never ask which one they hold.
"""

from __future__ import annotations

from rsrefseg.models.trainable import TrainableWeights
from rsrefseg.platform.config import ModelConfig


def build_model(
    model_cfg: ModelConfig, label_size: int = 0, *, random_init: bool = False, gpu: bool = False
) -> TrainableWeights:
    """The model of `model_cfg` (see `build_rsrefseg` / `build_rsrefseg2` for the arguments)."""
    if model_cfg.arch == "rsrefseg2":
        from rsrefseg.models.rsrefseg2 import build_rsrefseg2

        return build_rsrefseg2(model_cfg, label_size, random_init=random_init, gpu=gpu)
    from rsrefseg.models.rsrefseg import build_rsrefseg

    return build_rsrefseg(model_cfg, label_size, random_init=random_init, gpu=gpu)
