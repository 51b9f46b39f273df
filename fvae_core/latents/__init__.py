"""A small latent generative model, to decode what a diffusion model *generates* rather than what the encoder
gives (issue 28): rectified flow (``flow``), the UNet that predicts its velocity (``unet``), its training data,
a VAE's posteriors of augmented crops (``data``), and the run that trains it (``train``,
``fvae latents train`` / ``fvae latents sample``)."""
