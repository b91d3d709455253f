"""Latent-space study of a trained run: reconstruction, latent map, prior samples, interpolation, attribute vectors."""
