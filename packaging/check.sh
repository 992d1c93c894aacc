#!/usr/bin/env bash
# Checks what packaging/build.sh produced, offline: lintian on the .deb (no error, no
# warning: the remaining tags are overridden with reasons), the .rpm's files, config files
# and scriptlets, and the units as installed by the .deb: `systemd-analyze verify` (any
# message fails) and `systemd-analyze security` (fails above 2.0, "OK").
#
#   packaging/build.sh && packaging/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Above this `systemd-analyze security` exposure (×10, its --threshold scale) the check fails.
SECURITY_THRESHOLD=20

deb="$(ls target/debian/flowcoach_*.deb)"
rpm="$(ls target/generate-rpm/flowcoach-*.rpm)"
failed=0
fail() {
    echo "FAIL: $*" >&2
    failed=1
}
# Each line of $2 must be a line of $1.
expect_lines() {
    local what="$1" have="$2" want="$3" line
    while IFS= read -r line; do
        grep -qxF -- "$line" <<<"$have" || fail "$what: missing $line"
    done <<<"$want"
}

echo "== lintian $deb"
# Root is fine here (it only reads the package); lintian says otherwise on stderr.
lintian --fail-on error,warning --info --display-experimental --pedantic "$deb" \
    2> >(grep -v 'running with root privileges' >&2) || fail "lintian"

echo "== deb contents"
files="$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')"
units='/lib/systemd/system/flowcoach.service
/lib/systemd/system/flowcoach.socket
/lib/systemd/system/flowcoach@.service
/lib/systemd/system/flowcoach@.socket
/lib/systemd/system/flowcoach-metrics.socket
/lib/systemd/system/flowcoach.service.d/10-common.conf
/lib/systemd/system/flowcoach@.service.d/10-common.conf'
common='/usr/bin/flowcoach
/usr/bin/flowcoachctl
/etc/flowcoach/flowcoach.toml
/usr/lib/sysusers.d/flowcoach.conf
/usr/lib/tmpfiles.d/flowcoach.conf
/usr/share/man/man1/flowcoach.1.gz
/usr/share/man/man1/flowcoachctl.1.gz
/usr/share/bash-completion/completions/flowcoach
/usr/share/bash-completion/completions/flowcoachctl
/usr/share/fish/vendor_completions.d/flowcoach.fish
/usr/share/fish/vendor_completions.d/flowcoachctl.fish
/usr/share/flowcoach/prometheus/flowcoach-rules.yml
/usr/share/flowcoach/prometheus/flowcoach-rules.test.yml'
expect_lines "deb" "$files" "$units
$common
/usr/share/zsh/vendor-completions/_flowcoach
/usr/share/zsh/vendor-completions/_flowcoachctl"
conffiles="$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)"
expect_lines "deb conffiles" "$conffiles" "/etc/flowcoach/flowcoach.toml"
echo "$(wc -l <<<"$files") entries, conffiles: $conffiles"

echo "== rpm -qpi $rpm"
rpm -qpi "$rpm"
echo "== rpm -qpl"
rpm_files="$(rpm -qpl "$rpm")"
echo "$rpm_files"
expect_lines "rpm" "$rpm_files" "$(sed 's|^/lib/|/usr/lib/|' <<<"$units")
$common
/usr/share/zsh/site-functions/_flowcoach
/usr/share/zsh/site-functions/_flowcoachctl"
echo "== rpm -qpc (configuration files)"
rpm_config="$(rpm -qpc "$rpm")"
echo "$rpm_config"
expect_lines "rpm config files" "$rpm_config" "/etc/flowcoach/flowcoach.toml"
echo "== rpm -qp --scripts"
scripts="$(rpm -qp --scripts "$rpm")"
echo "$scripts"
for expected in 'postinstall scriptlet' 'preuninstall scriptlet' 'postuninstall scriptlet' \
    'systemd-sysusers' 'systemctl --no-reload preset' 'disable --now' 'systemctl reload "$unit"'; do
    grep -qF -- "$expected" <<<"$scripts" || fail "rpm scriptlets: missing $expected"
done

# A tiny root: the host's own units (the targets ours refer to) overlaid with the .deb.
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/lib/systemd"
cp -a /lib/systemd/system "$root/lib/systemd/"
dpkg-deb -x "$deb" "$root"
# The programs the units run besides ours: ExecStop= uses the shell.
install -D -m 0755 "$(readlink -f /bin/sh)" "$root/bin/sh"
to_check=(flowcoach.service flowcoach.socket flowcoach-metrics.socket flowcoach@ci.service flowcoach@ci.socket)

echo "== systemd-analyze verify ${to_check[*]}"
# It exits 0 on unknown keys and other warnings: any message is a failure.
if ! messages="$(cd "$root" && systemd-analyze verify --root="$root" --man=no "${to_check[@]}" 2>&1)" \
    || [[ -n "$messages" ]]; then
    echo "$messages" >&2
    fail "systemd-analyze verify"
else
    echo "no messages"
fi

echo "== systemd-analyze security (threshold $((SECURITY_THRESHOLD / 10)).$((SECURITY_THRESHOLD % 10)))"
for unit in flowcoach.service flowcoach@ci.service; do
    if report="$(systemd-analyze security --offline=yes --root="$root" \
        --threshold="$SECURITY_THRESHOLD" "$unit" 2>&1)"; then
        tail -n 1 <<<"$report"
    else
        echo "$report" >&2
        fail "systemd-analyze security $unit: exposure above the threshold"
    fi
done

if ((failed)); then
    echo "packaging checks FAILED" >&2
    exit 1
fi
echo "packaging checks passed"
