"""``python -m hf_localist.cli``: the ``hf-localist`` command."""

import sys

from . import main

sys.exit(main())
