"""scr-jax: Structural Causal 3D Reconstruction (Liu et al., ECCV 2022) in JAX."""
