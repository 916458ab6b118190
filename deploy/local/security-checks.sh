#!/usr/bin/env bash
# Security gates of `make test` and `make security`:
#   1. bandit over the packages (config and justified skips: [tool.bandit] in pyproject.toml;
#      single findings that are no risk carry `# nosec BXXX` and a reason on their line);
#   2. pip-audit over the dependencies installed in .venv (the editable project itself left out).
# A finding of either fails the run. When no advisory database can be reached (a machine that
# only reaches the package index), pip-audit is skipped with a visible notice instead: its own
# exit status would say "No known vulnerabilities found" after auditing nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- bandit ---------------------------------------------------------------------------------
status=0
"$BIN/bandit" -c pyproject.toml -r dataflows connectors -q >"$tmp/bandit.out" 2>"$tmp/bandit.err" \
    || status=$?
cat "$tmp/bandit.out"
# bandit 1.9 warns "nosec encountered ..., but no failed test" for a `# nosec` on a string that
# spans lines even though the nosec is what silenced the finding (PyCQA/bandit#1041): noise only.
grep -v 'but no failed test' "$tmp/bandit.err" >&2 || true
if [ "$status" -ne 0 ]; then
    echo "bandit failed (exit $status): fix each finding above, or mark it '# nosec BXXX' with a" \
        "comment saying why it is safe" >&2
    exit "$status"
fi
echo "bandit: no findings in dataflows/ connectors/"

# --- pip-audit ------------------------------------------------------------------------------
# Which advisory service answers: PyPI's per-release JSON API (pip-audit's default; a mirror
# may serve the index and /pypi/NAME/json but not this), else OSV. One request each, with a
# timeout, so an offline machine costs seconds instead of a failed lookup per dependency.
service=$("$BIN/python" - <<'EOF'
import json
import urllib.request
from importlib.metadata import version

PROBES = [
    ("pypi", f"https://pypi.org/pypi/pip/{version('pip')}/json", None),
    ("osv", "https://api.osv.dev/v1/query",
     json.dumps({"package": {"name": "pip", "ecosystem": "PyPI"}}).encode()),
]
reasons = []
for name, url, body in PROBES:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as resp:
            answer = json.load(resp)
        if name == "pypi" and "vulnerabilities" not in answer:
            reasons.append(f"{url} answered without vulnerability data")
            continue
        print(name)
        break
    except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors; bad JSON ValueError
        reasons.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
else:
    print("none: " + "; ".join(reasons))
EOF
)
if [[ "$service" == none:* ]]; then
    echo "pip-audit skipped: no advisory database reachable (${service#none: })"
    exit 0
fi

status=0
"$BIN/pip-audit" --skip-editable --progress-spinner off --vulnerability-service "$service" \
    --format json --output "$tmp/audit.json" 2>"$tmp/audit.err" || status=$?
"$BIN/python" - "$tmp/audit.json" "$tmp/audit.err" "$status" "$service" <<'EOF'
import json
import sys
from pathlib import Path

report_path, err_path, status, service = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
err = Path(err_path).read_text(errors="replace").strip()
try:
    report = json.loads(Path(report_path).read_text())
except (OSError, ValueError):
    report = None
if report is None:
    last = err.splitlines()[-1] if err else f"exit {status}, no report"
    if any(w in err for w in ("ConnectionError", "Timeout", "NameResolution", "Max retries")):
        print(f"pip-audit skipped: {service} advisory database stopped answering ({last})")
        sys.exit(0)
    print(f"pip-audit failed: {last}", file=sys.stderr)
    sys.exit(1)
deps = report["dependencies"]
vulnerable = [d for d in deps if d.get("vulns")]
skipped = [d for d in deps if "skip_reason" in d]
audited = len(deps) - len(skipped)
if skipped and audited == 0:
    print(f"pip-audit skipped: none of {len(deps)} dependencies could be audited "
          f"({skipped[0]['skip_reason']})")
    sys.exit(0)
for d in vulnerable:
    for v in d["vulns"]:
        fixes = ", ".join(v.get("fix_versions") or []) or "no fixed version"
        print(f"pip-audit: {d['name']} {d['version']}: {v['id']} (fixed in: {fixes})",
              file=sys.stderr)
if skipped:
    names = ", ".join(f"{d['name']}" for d in skipped)
    print(f"pip-audit: {len(skipped)} dependencies could not be audited: {names}")
if vulnerable:
    print(f"pip-audit failed: {len(vulnerable)} of {audited} audited dependencies have known "
          "vulnerabilities (above)", file=sys.stderr)
    sys.exit(1)
print(f"pip-audit: no known vulnerabilities in {audited} dependencies ({service} database)")
EOF
