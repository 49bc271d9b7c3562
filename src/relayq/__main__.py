"""`python -m relayq` runs the admin command."""

from relayq.cli.main import main

raise SystemExit(main())
