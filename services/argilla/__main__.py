"""`python -m services.argilla start|stop|status|serve|ensure-venv`: the local Argilla's command line."""

import sys

from services.argilla.cli import main

sys.exit(main())
