"""Text-to-image bundles: loading and saving diffusers folders, the noise schedule, the toy world's model."""
