"""SigLIP and SAM wrappers, AttnPrompter, LoRA, the composed RSRefSeg model, presets."""
