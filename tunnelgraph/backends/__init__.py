"""Backends apply rewrite plans to a framework's model."""
