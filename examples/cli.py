"""LightningCLI: the callbacks come from a YAML config, not from code.

``examples/cli_config.yaml`` adds ``BatchSizeSchedule`` and ``BatchSizeLRCallback`` under
``trainer.callbacks`` with ``class_path`` and ``init_args``; the callback's ``monitor:`` (a
``MonitorConfig``) is written as a mapping of its fields, which jsonargparse turns into the
dataclass. The model and the data are the digits classifier of ``examples/common.py`` (the
151k-parameter ``models.SmallCNN`` by default). Every option can be overridden on the command
line.

Run it (needs ``jsonargparse[signatures]``, in the ``examples`` extra)::

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --model.optimizer=adam \\
        --model.lr=0.001 --trainer.max_epochs=2
    python examples/cli.py fit --config examples/cli_config.yaml --print_config
    python examples/cli.py fit --trainer.callbacks.help lr_batch_callback.BatchSizeLRCallback

Outputs: ``runs/cli/version_<n>/`` with ``metrics.csv`` (``lr_batch/*``, ``hessian/*``),
``spectra/`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from common import DigitsClassifier, DigitsDataModule


def main() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    LightningCLI(DigitsClassifier, DigitsDataModule)


if __name__ == "__main__":
    main()
