"""`python -m ds2oai` is the same as the `ds2oai` console script."""

from ds2oai.cli import main

raise SystemExit(main())
