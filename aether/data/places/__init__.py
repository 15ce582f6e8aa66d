"""POIs for any place: Overture Maps Places (GeoParquet row groups) and OpenStreetMap (Overpass)."""
