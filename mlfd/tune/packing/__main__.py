"""``python -m mlfd.tune.packing REQUEST.json RESULT.json``: the child process of :func:`mlfd.tune.packing.probe`."""

import sys

from mlfd.tune.packing.probe import _main

sys.exit(_main(sys.argv[1:]))
