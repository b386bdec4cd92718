"""The dual-conditioned latent diffusion model of paper 004: model, training, synthesis.

Modules: ``settings`` (config sections vae/ldm/synthesis), ``data`` (patch store and crop
bank readers), ``augment``, ``conditioning`` (map encoder, crop canvases, crop tokens),
``crop_features``, ``models`` (VAE/UNet/ControlNet builders, the denoiser), ``pipeline``
(HistoSynthesisPipeline), ``training`` (the accelerate loop, checkpoints), ``tasks`` (VAE and
LDM objectives), ``synthesis`` (image–label pairs to zarr/PNG), ``flagging`` (hallucination
scores).
"""
