#!/usr/bin/env bash
# Regenerates the JSON schemas the board tests validate against (tests/integration/
# test_grafana_boards.py), from the TypeScript types of npm @grafana/schema at the version of the
# grafana/grafana image in docker-compose.yml. Needs Node.js and the npm registry; the tests and CI
# do not: they read the committed *.schema.json files.
#   bash grafana/schema/generate.sh        (then commit grafana/schema/)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
GRAFANA_VERSION=11.6.0        # keep equal to the grafana/grafana tag in docker-compose.yml
GENERATOR_VERSION=2.4.0       # ts-json-schema-generator
TYPESCRIPT_VERSION=5.8.3

tag=$(sed -n 's#^ *image: *grafana/grafana:\([0-9.]*\).*#\1#p' "$here/../../docker-compose.yml")
if [ "$tag" != "$GRAFANA_VERSION" ]; then
    echo "error: docker-compose.yml runs grafana/grafana:$tag, this script pins $GRAFANA_VERSION" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm init -y >/dev/null
npm install --silent --no-audit --no-fund --save-exact \
    "@grafana/schema@$GRAFANA_VERSION" "ts-json-schema-generator@$GENERATOR_VERSION" \
    "typescript@$TYPESCRIPT_VERSION"
raw=node_modules/@grafana/schema/dist/esm/raw

gen() {  # gen TYPES_FILE TYPE OUTPUT
    npx --no-install ts-json-schema-generator --no-type-check --path "$1" --type "$2" \
        | python3 -c 'import json,sys; json.dump(json.load(sys.stdin), sys.stdout, indent=2, sort_keys=True); print()' \
        > "$3"
}

gen "$raw/dashboard/x/dashboard_types.gen.d.ts" Dashboard "$here/dashboard.schema.json"
mkdir -p "$here/panels"
# The options of each panel plugin the boards use (panel "type" -> its panelcfg types).
for pair in timeseries:timeseries/panelcfg/x/TimeSeriesPanelCfg stat:stat/panelcfg/x/StatPanelCfg \
            table:table/panelcfg/x/TablePanelCfg geomap:geomap/panelcfg/x/GeomapPanelCfg \
            barchart:barchart/panelcfg/x/BarChartPanelCfg \
            bargauge:bargauge/panelcfg/x/BarGaugePanelCfg \
            text:text/panelcfg/x/TextPanelCfg; do
    gen "$raw/composable/${pair#*:}_types.gen.d.ts" Options "$here/panels/${pair%%:*}.options.schema.json"
done
echo "@grafana/schema $GRAFANA_VERSION" > "$here/VERSION"
echo "wrote $here/dashboard.schema.json and $here/panels/*.options.schema.json (@grafana/schema $GRAFANA_VERSION)"
