"""`python -m examples.rbm_digits`, from the repository root: see `cli.main`."""

from .cli import main

raise SystemExit(main())
