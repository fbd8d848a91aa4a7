#!/usr/bin/env bash
# Install the Debian packages that provide missing commands, the one place the project does so.
#   scripts/system_deps.sh COMMAND[|ALT]:PACKAGE ...   e.g.  chromium|chromium-browser:chromium rsvg-convert:librsvg2-bin
# As root with apt-get it installs what is missing (apt-get update only when a first try fails);
# otherwise it prints the command to run and exits 0: tests needing the tool skip and say why.
set -u
missing=()
for spec in "$@"; do
    cmds=${spec%%:*} pkg=${spec##*:} found=0
    IFS='|' read -ra alts <<< "$cmds"
    for c in "${alts[@]}"; do command -v "$c" >/dev/null 2>&1 && found=1; done
    [ "$found" = 1 ] || missing+=("$pkg")
done
[ ${#missing[@]} = 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (apt-get) ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || \
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } || \
        echo "warning: could not install ${missing[*]}; the tests that need them will be skipped"
else
    echo "note: missing ${missing[*]} (sudo apt-get install ${missing[*]}); the tests that need them will be skipped"
fi
exit 0
