# Sourced by the JavaScript test drivers (tests/*/run.sh): npm_prepare DIR WORK PACKAGE copies
# DIR's package.json and check.mjs into WORK and installs the packages from the npm registry,
# once per build tree (PACKAGE present in node_modules means done).
npm_prepare() {
  local dir=$1 work=$2 package=$3
  mkdir -p "$work"
  cp "$dir/package.json" "$dir/check.mjs" "$work/"
  if [ ! -d "$work/node_modules/$package" ]; then
    (cd "$work" && npm install --no-audit --no-fund --silent)
  fi
}
