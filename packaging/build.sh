#!/usr/bin/env bash
# Builds the packages: release binaries, man pages and completions generated from the clap
# definitions, then target/debian/*.deb (cargo-deb) and target/generate-rpm/*.rpm
# (cargo-generate-rpm). Idempotent: earlier packages and assets are replaced. Prints the
# paths of the two packages last.
#
#   packaging/build.sh            # needs: cargo-deb, cargo-generate-rpm (see .ci/run)
#   packaging/check.sh            # lintian, rpm inspection, systemd-analyze
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cargo-deb cargo-generate-rpm; do
    command -v "$tool" >/dev/null || {
        echo "packaging/build.sh: $tool is missing: cargo install $tool --locked" >&2
        exit 1
    }
done

# Reproducible packages: file dates (and man page dates) from the last commit.
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

target="${CARGO_TARGET_DIR:-target}"
if [[ "$target" != target ]]; then
    # The [package.metadata.*] asset paths name target/… (cargo-deb maps target/release
    # itself, cargo-generate-rpm and the generated assets do not).
    echo "packaging/build.sh: CARGO_TARGET_DIR must be unset or 'target'" >&2
    exit 1
fi

echo "== release build"
cargo build --release --locked --package flowcoach --bins

echo "== man pages and completions"
rm -rf target/assets
cargo run --quiet --locked --package xtask -- assets --out target/assets >/dev/null
for page in target/assets/man/*.1; do
    # The rpm takes them compressed; cargo-deb compresses its own copies.
    gzip -9 -n -c "$page" >"$page.gz"
done
# cargo-generate-rpm packages binaries as they are: give it stripped copies.
mkdir -p target/assets/bin
for bin in flowcoach flowcoachctl; do
    strip --strip-all -o "target/assets/bin/$bin" "target/release/$bin"
done

echo "== deb"
rm -f target/debian/flowcoach_*.deb
cargo deb --no-build >/dev/null
# cargo-deb writes no DEBIAN/md5sums: add it (every file but the conffiles, as dh_md5sums
# does) so that `dpkg --verify flowcoach` can check the installed files.
deb="$(ls target/debian/flowcoach_*.deb)"
repack=target/debian/repack
rm -rf "$repack"
dpkg-deb -R "$deb" "$repack"
(
    cd "$repack"
    find . -path ./DEBIAN -prune -o -type f -printf '%P\n' \
        | grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles) \
        | LC_ALL=C sort \
        | xargs -d '\n' md5sum >DEBIAN/md5sums
)
chmod 644 "$repack/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz -b "$repack" "$deb" >/dev/null
rm -rf "$repack"

echo "== rpm"
rm -f target/generate-rpm/flowcoach-*.rpm
cargo generate-rpm >/dev/null

echo "== packages"
ls -1 "$PWD"/target/debian/flowcoach_*.deb "$PWD"/target/generate-rpm/flowcoach-*.rpm
