"""Fetch AlphaEarth (the same as `aether fetch-ae`): python fetch_ae.py --bbox W S E N --year 2024
--out OUT.tif"""

from aether.cli.fetch_ae import main

if __name__ == "__main__":
    main()
