"""The command line the examples share: one parser builder instead of a copy per script.

``example_parser(__doc__, ...)`` returns an :class:`argparse.ArgumentParser` whose description
is the first paragraph of the example's docstring and whose ``--help`` shows the defaults, with
the options every example spells the same way; each example then adds its own::

    parser = example_parser(__doc__, fast="2 epochs of 4 steps (smoke test)",
                            output_dir="runs/demo-<timestamp>", digits=("dataset", "optimizer"))
    parser.add_argument("--epochs", type=int, default=9, help="training epochs")
    args = parser.parse_args(argv)

The shared options, in a group of their own ("run"): ``--device {auto,cpu,cuda}`` (see
``common.accelerator``), ``--output-dir``, ``--seed``, ``--threads`` and ``--fast``; and, named
in ``digits``, the digits examples' ``--dataset``, ``--model`` and ``--optimizer`` (first in
``--help``, with the example's own options). ``python examples/<name>.py`` puts this folder on
``sys.path``, so every example imports it as ``_args``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

DIGITS_OPTIONS = ("dataset", "model", "optimizer")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default, except ``None`` and ``False`` (the help text says those)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def example_parser(doc: str | None, *, fast: str | None = None, output_dir: str | None = None,
                   digits: Sequence[str] = (), device: bool = True, threads: bool = True
                   ) -> argparse.ArgumentParser:
    """The parser of an example, with the options the examples share.

    Args:
        doc: the example's docstring; its first paragraph is the description.
        fast: the help of ``--fast`` (what the smoke run does); ``None``: no ``--fast``.
        output_dir: the default run directory, as ``--help`` should describe it (e.g.
            ``"runs/demo-<timestamp>"``); ``None``: no ``--output-dir``.
        digits: which of ``"dataset"``, ``"model"``, ``"optimizer"`` to add (the digits examples').
        device: add ``--device {auto,cpu,cuda}``.
        threads: add ``--threads`` (torch's CPU threads, default 1).
    """
    unknown = set(digits) - set(DIGITS_OPTIONS)
    if unknown:
        raise ValueError(f"digits options are {DIGITS_OPTIONS}, got {sorted(unknown)}")
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    if digits:  # common imports Lightning: only the digits examples need it
        from common import DATASETS, MODELS, OPTIMIZERS
    if "dataset" in digits:
        parser.add_argument("--dataset", choices=DATASETS, default="digits",
                            help="scikit-learn's bundled digits, or synthetic 8×8 images")
    if "model" in digits:
        parser.add_argument("--model", choices=MODELS, default="cnn",
                            help="SmallCNN (151k parameters) or DigitsMLP (26k)")
    if "optimizer" in digits:
        parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                            help="SGD with momentum 0.9 (linear LR rule) or Adam (square-root rule)")
    run = parser.add_argument_group("run")
    if device:
        run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                         help="auto: CUDA if available")
    if output_dir is not None:
        run.add_argument("--output-dir", type=Path, default=None,
                         help=f"run directory (default: {output_dir})")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    if threads:
        run.add_argument("--threads", type=int, default=1,
                         help="CPU threads for torch; the tensors are small, so one thread is about "
                              "as fast as several and does not fight other processes for cores")
    if fast is not None:
        run.add_argument("--fast", action="store_true", help=fast)
    return parser
