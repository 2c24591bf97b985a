"""Frontends turn a framework's model into the IR (:mod:`tunnelgraph.ir`)."""
