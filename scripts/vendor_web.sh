#!/usr/bin/env bash
# The map page's JavaScript libraries, from the npm registry, into the package
# (aether/serve/static/vendor), so `aether serve` works offline with no CDN:
#   bash scripts/vendor_web.sh
# Versions are pinned here; npm checks each tarball's integrity. Run it to update them, and
# commit the result (the package ships these files; pip never runs npm).
set -euo pipefail
cd "$(dirname "$0")/.."
LEAFLET=1.9.4
MARKERCLUSTER=1.5.3
dest=aether/serve/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "leaflet@$LEAFLET" "leaflet.markercluster@$MARKERCLUSTER" >/dev/null)
rm -rf "$dest" && mkdir -p "$dest/leaflet" "$dest/markercluster"
tar xzf "$work/leaflet-$LEAFLET.tgz" -C "$work" && mv "$work/package" "$work/leaflet"
tar xzf "$work/leaflet.markercluster-$MARKERCLUSTER.tgz" -C "$work" && mv "$work/package" "$work/markercluster"
cp -r "$work/leaflet/dist/leaflet.js" "$work/leaflet/dist/leaflet.css" "$work/leaflet/dist/images" "$work/leaflet/LICENSE" "$dest/leaflet/"
cp "$work/markercluster/dist/leaflet.markercluster.js" "$work/markercluster/dist/MarkerCluster.css" \
   "$work/markercluster/dist/MarkerCluster.Default.css" "$work/markercluster/MIT-LICENCE.txt" "$dest/markercluster/"
printf 'leaflet %s (BSD-2-Clause)\nleaflet.markercluster %s (MIT)\nfrom the npm registry by scripts/vendor_web.sh\n' \
  "$LEAFLET" "$MARKERCLUSTER" > "$dest/VERSIONS.txt"
echo "vendored leaflet $LEAFLET and leaflet.markercluster $MARKERCLUSTER into $dest"
