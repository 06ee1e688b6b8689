"""`python -m crowdkernels ...`: the same as the `crowdkernels` console script."""
import sys

from .cli import main

sys.exit(main())
