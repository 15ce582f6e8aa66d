"""POIs from an OpenStreetMap extract (the same as `aether make-pois`): python make_pois.py --pbf
CITY.osm.pbf --out POIS.geojson"""

from aether.cli.make_pois import main

if __name__ == "__main__":
    main()
