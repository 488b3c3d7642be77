"""``python -m mesh`` runs the ``mesh`` command line."""

import sys

from mesh.cli import main

sys.exit(main())
