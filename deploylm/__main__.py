"""`python -m deploylm ...`: the same command line as the `deploylm` script."""
from deploylm.cli import main

main()
