"""SigLIP and SAM wrappers, AttnPrompter, LoRA, the composed RSRefSeg model, presets.

One module per component (imported explicitly; this package imports nothing eagerly, so the data
pipeline can import `sizes` or `tokenizer` without loading the model stack):

    siglip      SiglipEncoder, load_siglip                       SigLIP image/text features
    sam         BatchedSam, build_sam, load_sam_checkpoint
    sizes       SamSizes, SiglipSizes, InputSizes                backbone and input sizes (no torch)
    prompter    AttnPrompter                                     SigLIP features -> SAM prompts
    lora        apply_lora                                       peft LoRA on the three backbones
    presets     TINY, RSREFSEG_B, RSREFSEG_L, input_sizes        sizes and weight loading
    tokenizer   load_tokenizer                                   phrase tokenizers (tokenize: datasets.pipeline)
    device_inputs model_batch                                    pipeline batch -> model inputs, resized on the device
    rsrefseg    RSRefSeg, build_model                            the composed model
    loss        mask_bce_loss
    metrics     SegMetrics, per_sample_iou                       gIoU, cIoU, Pr@X
    checkpoint  save_checkpoint, load_checkpoint                 safetensors + config.yaml
    checkpoint_folder find_checkpoint, checkpoint_source         where a checkpoint is (no torch)
    errors      ModelLoadError
"""
