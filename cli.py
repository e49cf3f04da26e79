"""Run the tgfr-search command line from a checkout: `python cli.py --help`.

A thin entry point: the commands live in tgfr_search/cli.py, which the installed
`tgfr-search` script calls, so no top-level `cli` module is shipped in the wheel.
"""

from tgfr_search.cli import main

if __name__ == "__main__":
    main()
