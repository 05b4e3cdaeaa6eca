"""Data: prompt sets, image-caption folders and the toy world's procedural generator."""
