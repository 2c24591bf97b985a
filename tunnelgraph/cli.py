"""The ``tunnelgraph`` command line: analyze, open, merge and verify models.

MODEL is an ``.onnx`` file, a PyTorch module saved whole with
``torch.save`` (``.pt``), or a factory ``package.module:function`` that
returns an ``nn.Module``. PyTorch models need example inputs to be traced:
``--input-shape 1,3,32,32`` (float32 random) or ``--inputs F.npz`` (arrays
``input_0``, ``input_1``, ... or the file's arrays in order).

Exit status: 0 on success, 1 when ``verify`` finds the models different,
2 on bad input (a message says what and how to fix it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class UsageError(Exception):
    """Bad input on the command line; the message says what to do."""


def main(argv: Sequence[str] | None = None) -> int:
    from tunnelgraph.analysis.groups import hint_style

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with hint_style("cli"):
            return int(args.run(args) or 0)
    except UsageError as error:
        print(f"tunnelgraph {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # library errors carry their own explanation
        from tunnelgraph.errors import TunnelgraphError

        if isinstance(error, (TunnelgraphError, ValueError, FileNotFoundError, TypeError)):
            print(f"tunnelgraph {args.command}: {error}", file=sys.stderr)
            return 2
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunnelgraph", description="Function-preserving tunnels in neural networks.")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--input-shape", help="shape of a random float32 example input, e.g. 1,3,32,32")
        command.add_argument("--inputs", help=".npz file with the example inputs")
        command.add_argument("--through", action="extend", type=_through_options, default=[], metavar="OP[,OP]",
                             help="per-channel operations sites may pass: any of batchnorm, pooling, dropout, "
                                  "depthwise (a comma list, or the flag repeated)")

    analyze = commands.add_parser("analyze", help="sites, blocked places and why, reducible units")
    analyze.add_argument("model")
    model_options(analyze)
    analyze.add_argument("--data", help=".npz with an 'inputs' array, for empirical reducibility measures")
    analyze.add_argument("--json", action="store_true", help="machine-readable output")
    analyze.set_defaults(run=_analyze)

    open_ = commands.add_parser("open", help="open a tunnel at a site and write the new model")
    open_.add_argument("model")
    model_options(open_)
    open_.add_argument("--site", required=True, help="the site, e.g. 'conv[3]'")
    group = open_.add_mutually_exclusive_group()
    group.add_argument("--lam", type=float, default=0.5, help="one lambda for every outbound weight (default 0.5)")
    group.add_argument("--lam-file", help=".npy file with a lambda vector of the site's outbound size")
    open_.add_argument("--out", required=True, help="output file: .onnx, or .pt for a PyTorch model")
    open_.add_argument("--json", action="store_true")
    open_.set_defaults(run=_open)

    merge = commands.add_parser("merge", help="merge a site's channel into another channel (close a tunnel)")
    merge.add_argument("model")
    model_options(merge)
    merge.add_argument("--site", required=True)
    merge.add_argument("--into", required=True, type=int, help="the channel to merge into")
    merge.add_argument("--out", required=True)
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(run=_merge)

    verify = commands.add_parser("verify", help="compare two models' outputs; exit 1 if they differ")
    verify.add_argument("a")
    verify.add_argument("b")
    verify.add_argument("--input-shape")
    verify.add_argument("--inputs")
    verify.add_argument("--rtol", type=float)
    verify.add_argument("--atol", type=float)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=_verify)

    demo = commands.add_parser(
        "demo", help="escape a flat area: train the paper's CNN there, open tunnels at the plateau, compare "
                     "with a control run (embedded task, no download)")
    demo.add_argument("--mnist", metavar="DIR", help="MNIST IDX files in DIR instead of the embedded teacher task")
    demo.add_argument("--steps", type=_positive_int, default=600, help="SGD steps of each run (default 600)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="tunnelgraph-demo", help="folder for demo.json and demo.png")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--json", action="store_true", help="print the JSON record instead of the report")
    demo.set_defaults(run=_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> int:
    import logging
    from dataclasses import asdict

    from tunnelgraph.experiments.demo import demo, describe

    if args.mnist is not None and not Path(args.mnist).is_dir():
        raise UsageError(f"--mnist {args.mnist}: no such folder; pass the folder that holds the MNIST IDX files")
    logging.getLogger("tunnelgraph").setLevel(logging.WARNING)
    result = demo(mnist=args.mnist, steps=args.steps, seed=args.seed, out=args.out, progress=not args.no_progress)
    print(json.dumps(asdict(result), indent=1) if args.json else describe(result, args.out))
    return 0


def _through_options(text: str) -> list[str]:
    from tunnelgraph.analysis.groups import THROUGH_OPTIONS

    options = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [option for option in options if option not in THROUGH_OPTIONS]
    if unknown or not options:
        raise argparse.ArgumentTypeError(
            f"unknown option(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(THROUGH_OPTIONS)}, "
            "e.g. --through batchnorm,pooling"
        )
    return options


# -- loading ---------------------------------------------------------------------------
def _load(spec: str) -> Any:
    """The adapter of MODEL: an .onnx file, a .pt file saved with torch.save, or package.module:factory."""
    from tunnelgraph.adapters import adapter_for

    model: Any = spec  # an .onnx file; adapter_for names what else MODEL may be
    if spec.endswith((".pt", ".pth")):
        import torch

        if not Path(spec).is_file():
            raise UsageError(f"no file '{spec}'")
        model = torch.load(spec, weights_only=False)
    elif ":" in spec and not Path(spec).exists():
        module_name, _, factory = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UsageError(f"cannot import '{module_name}' ({error}); is it on PYTHONPATH?") from error
        if not hasattr(module, factory):
            raise UsageError(f"'{module_name}' has no '{factory}'")
        model = getattr(module, factory)()
    try:
        adapter = adapter_for(model)
    except TypeError as error:
        raise UsageError(
            f"MODEL '{spec}' is neither an .onnx file, a .pt file nor package.module:factory giving an "
            f"nn.Module ({error})"
        ) from error
    if model is not spec:  # a PyTorch module: compared and saved in inference mode
        adapter.model.eval()
    return adapter


def _example(args: argparse.Namespace, *models: Any) -> Any:
    """The example inputs from --inputs or --input-shape, else those the first model declares (ONNX)."""
    import torch

    if args.inputs:
        with np.load(args.inputs) as arrays:
            keys = sorted(arrays.files, key=lambda k: (not k.startswith("input"), k))
            tensors = tuple(torch.from_numpy(arrays[k]) for k in keys)
        return tensors[0] if len(tensors) == 1 else tensors
    if args.input_shape:
        try:
            shape = tuple(int(part) for part in args.input_shape.split(","))
        except ValueError as error:
            raise UsageError(f"--input-shape must be comma-separated integers, got '{args.input_shape}'") from error
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for model in models:
        try:
            return model.example_inputs(None)
        except ValueError:
            continue
    raise UsageError("a PyTorch model needs example inputs: pass --input-shape 1,3,32,32 or --inputs F.npz")


def _save(model: Any, out: str, example: Any) -> None:
    from tunnelgraph.adapters import adapter_for

    try:
        adapter_for(model).save(out, example)
    except ValueError as error:
        raise UsageError(f"{error} (--out)") from error


# -- commands ----------------------------------------------------------------------------
def _analyze(args: argparse.Namespace) -> int:
    import tunnelgraph as tg

    model = _load(args.model)
    example = _example(args, model)
    data = None
    if args.data:
        import torch

        with np.load(args.data) as arrays:
            inputs = torch.from_numpy(arrays["inputs"])
        data = [(inputs[i:i + 256], None) for i in range(0, len(inputs), 256)]
    report = tg.analyze(model.model, example, through=args.through, data=data, progress=False)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_markdown())
    return 0


def _lam(args: argparse.Namespace) -> Any:
    if args.lam_file:
        return np.load(args.lam_file)
    return args.lam


def _open(args: argparse.Namespace) -> int:
    import tunnelgraph as tg

    model = _load(args.model)
    example = _example(args, model)
    result = tg.rewrite(model.model, args.site, _lam(args), example_inputs=example, through=args.through)
    _save(result, args.out, example)
    _report(args, {"opened": args.site, "out": args.out})
    return 0


def _merge(args: argparse.Namespace) -> int:
    import tunnelgraph as tg

    model = _load(args.model)
    example = _example(args, model)
    result = tg.merge(model.model, args.site, args.into, example_inputs=example, through=args.through)
    _save(result, args.out, example)
    _report(args, {"merged": args.site, "into": args.into, "out": args.out})
    return 0


def _verify(args: argparse.Namespace) -> int:
    import tunnelgraph as tg

    a, b = _load(args.a), _load(args.b)
    example = _example(args, a, b)
    report = tg.verify(a.model, b.model, example, rtol=args.rtol, atol=args.atol)
    if args.json:
        print(json.dumps({**report.__dict__}, indent=2))
    else:
        print(report)
    return 0 if report.passed else 1


def _report(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        print(", ".join(f"{key}: {value}" for key, value in payload.items()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
