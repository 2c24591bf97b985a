"""Exceptions raised by tunnelgraph; each message names the problem and the way out."""


class TunnelgraphError(Exception):
    """Base class of every error tunnelgraph raises on purpose."""


class TraceError(TunnelgraphError):
    """A model could not be turned into a graph (fx tracing or shape propagation failed)."""


class SiteError(TunnelgraphError, ValueError):
    """A site is unknown, illegal for the requested rewrite, or does not fit the model."""


class RewriteError(TunnelgraphError):
    """A rewrite could not be applied; the input model is left untouched."""


class StatisticsError(TunnelgraphError):
    """A-statistics cannot be measured as asked (unsupported layer, bad data, mismatched sites)."""


class MissingExtraError(TunnelgraphError, ImportError):
    """An optional part of tunnelgraph is used without the extra that provides it; the message says what to install."""


def missing_onnx(error: ImportError) -> MissingExtraError:
    """The error for ONNX support used without the ``onnx`` extra (``error``: the import that failed)."""
    return MissingExtraError(
        f"tunnelgraph's ONNX support (load_onnx, to_torch, export_onnx, .onnx models) needs the optional "
        f"'onnx' extra, which is not installed ({error}); install it with: pip install \"tunnelgraph[onnx]\""
    )
