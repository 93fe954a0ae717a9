"""``python -m tta_client`` runs the ``tta-client`` command line."""

import sys

from tta_client.cli import main

sys.exit(main())
