"""ftlab: Hydra-composed fine-tuning experiments on PaddlePaddle / PaddleNLP."""

__version__ = "0.1.0"

import logging

# The lines a person reads on the console (what was composed, counts, progress, results);
# the ftlab command shows this logger's records and puts everything else in train.log
# (ftlab.cli.console).
CONSOLE = "ftlab.console"
console = logging.getLogger(CONSOLE)
