"""The channel-edit algebra and the framework-free plans that backends apply."""
