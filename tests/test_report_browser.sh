#!/usr/bin/env bash
# test_report_browser.sh: the report page in a real browser (Debian's chromium,
# headless): `pdserve report` on a synthetic results database, then index.html is
# opened with a small script injected (in a copy) that counts the images loaded with a
# nonzero natural size and puts the count in document.title; --dump-dom reads it back.
# Also takes a screenshot (kept in $PDSERVE_BUILD/report-screenshot.png to look at).
# Installs nothing: exits 77 when chromium or gnuplot is absent (scripts/deps.sh --test).
set -uo pipefail
ROOT="${PDSERVE_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
BUILD="${PDSERVE_BUILD:-$ROOT/build}"
BIN="${PDSERVE_BIN:-$BUILD/pdserve}"
MAKEDB="$BUILD/test_study_report"

CHROME=""
for c in chromium chromium-browser; do command -v "$c" >/dev/null 2>&1 && { CHROME="$c"; break; }; done
[ -n "$CHROME" ] || { echo "SKIP: chromium is not installed (scripts/deps.sh --test)"; exit 77; }
command -v gnuplot >/dev/null 2>&1 || { echo "SKIP: gnuplot is not installed"; exit 77; }
[ -x "$BIN" ] || { echo "FAIL: no pdserve binary at $BIN"; exit 1; }
[ -x "$MAKEDB" ] || { echo "FAIL: no $MAKEDB (build the tests)"; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$MAKEDB" --make-db "$TMP/results.db" || fail "could not write the synthetic database"
"$BIN" report "$TMP/results.db" -o "$TMP/report" >"$TMP/table.txt" 2>"$TMP/report.log" ||
  { cat "$TMP/report.log"; fail "pdserve report failed"; }
grep -q "TTFT p50" "$TMP/table.txt" || fail "no comparison table on stdout"
N_IMG=$(grep -o '<img ' "$TMP/report/index.html" | wc -l)
[ "$N_IMG" -ge 5 ] || fail "index.html has only $N_IMG images"

# The probe: after load, count images that decoded with a nonzero natural size.
sed 's|</body>|<script>window.addEventListener("load",function(){var ok=0,im=document.images;for(var i=0;i<im.length;i++)if(im[i].complete\&\&im[i].naturalWidth>0\&\&im[i].naturalHeight>0)ok++;document.title="loaded:"+ok+"/"+im.length;});</script></body>|' \
  "$TMP/report/index.html" >"$TMP/report/probe.html"

chrome() {
  timeout 120 "$CHROME" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d "$TMP/profile.XXXXXX")" --virtual-time-budget=10000 "$@" 2>>"$TMP/chrome.log"
}
chrome --dump-dom "file://$TMP/report/probe.html" >"$TMP/dom.html" || { tail -20 "$TMP/chrome.log"; fail "chromium --dump-dom failed"; }
TITLE=$(sed -n 's|.*<title>\(loaded:[0-9]*/[0-9]*\)</title>.*|\1|p' "$TMP/dom.html" | head -1)
echo "page title after load: ${TITLE:-none}"
[ "$TITLE" = "loaded:$N_IMG/$N_IMG" ] || fail "expected loaded:$N_IMG/$N_IMG images, got '${TITLE:-no title}'"
grep -q "Pareto frontiers and plots" "$TMP/dom.html" || fail "the page body did not load"

chrome --screenshot="$TMP/shot.png" --window-size=1280,2000 "file://$TMP/report/index.html" >/dev/null ||
  fail "chromium --screenshot failed"
[ -s "$TMP/shot.png" ] || fail "no screenshot"
cp "$TMP/shot.png" "$BUILD/report-screenshot.png" 2>/dev/null || true
echo "ok: $N_IMG images loaded in chromium; screenshot in $BUILD/report-screenshot.png"
