import sys

from phi3lit.commands import main

sys.argv[0] = "phi3lit"  # usage lines say `phi3lit ...` (the console script), not `__main__.py`
main()
