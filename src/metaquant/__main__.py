"""``python -m metaquant``: the same as the ``metaquant`` command."""

import sys

from .experiments.cli import main

sys.exit(main())
