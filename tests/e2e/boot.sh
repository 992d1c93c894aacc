#!/usr/bin/env bash
# Boots a machine from the e2e tests' cached rootfs by hand, the way tests/e2e/machine.rs
# does (own cgroup, cgroup v2, --volatile=overlay: nothing it does is kept), to look into a
# failure interactively. Run a test once first so that target/e2e/rootfs-bookworm exists.
#
#   tests/e2e/boot.sh [NAME]      # as root; Ctrl-C (or SIGTERM) powers the machine off
#
# It prints the nsenter command to run things inside, e.g.
#   nsenter -t PID -a dpkg -i /path/inside.deb ; nsenter -t PID -a journalctl -u flowcoach
# A simulator for it: target/release/flowcoach-dev sim --listen 127.0.0.1:3000 (the machine
# shares the host's network), then a drop-in with FLOWCOACH_SLACK_API_URL as the tests write.
set -euo pipefail
cd "$(dirname "$0")/../.."

name="${1:-fce2e-manual-$$}"
rootfs="${CARGO_TARGET_DIR:-target}/e2e/rootfs-bookworm"
[[ -x "$rootfs/usr/lib/systemd/systemd" ]] || {
    echo "no rootfs in $rootfs: run FLOWCOACH_E2E=1 cargo test --test e2e -- systemd:: first" >&2
    exit 1
}

# One cgroup per machine in each hierarchy systemd uses (see machine.rs for why).
cgroups=()
own_v2="$(sed -n 's/^0:://p' /proc/self/cgroup)"
own_v1="$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup)"
v2_mount="$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)"
v1_mount="$(awk '$3 == "cgroup" && $4 ~ /name=systemd/ {print $2; exit}' /proc/self/mounts)"
[[ -n "$v2_mount" && -n "$own_v2" ]] && cgroups+=("$v2_mount${own_v2%/}/fce2e-$name")
[[ -n "$v1_mount" && -n "$own_v1" ]] && cgroups+=("$v1_mount${own_v1%/}/fce2e-$name")
for dir in "${cgroups[@]}"; do mkdir -p "$dir"; done

cleanup() {
    [[ -n "${nspawn:-}" ]] && kill "$nspawn" 2>/dev/null && wait "$nspawn" 2>/dev/null || true
    for dir in "${cgroups[@]}"; do
        find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 0' INT TERM

log="$(mktemp --tmpdir "$name.console.XXXX")"
unified=()
[[ -n "$v2_mount" && "${FLOWCOACH_E2E_CGROUP:-}" != host ]] && unified=(env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1)
# shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
sh -c 'for d in "$@"; do [ "$d" = -- ] && break; echo $$ > "$d/cgroup.procs"; done
       while [ "$1" != -- ]; do shift; done; shift; exec "$@"' sh "${cgroups[@]}" -- \
    "${unified[@]}" systemd-nspawn -D "$rootfs" --boot --register=no --keep-unit \
    --console=read-only --volatile=overlay -M "$name" >"$log" 2>&1 &
nspawn=$!

for _ in $(seq 1 300); do
    leader="$(cat "/proc/$nspawn/task/$nspawn/children" 2>/dev/null | awk '{print $1}')"
    [[ -n "$leader" && -S "/proc/$leader/root/run/systemd/private" ]] && break
    kill -0 "$nspawn" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
done
[[ -n "${leader:-}" ]] || { echo "no systemd in the machine after 30s; console: $log" >&2; exit 1; }
nsenter -t "$leader" -a systemctl is-system-running --wait || true
echo "machine $name is up: PID 1 is $leader on the host; console log: $log"
echo "  nsenter -t $leader -a bash          # a shell inside (Ctrl-C here powers it off)"
wait "$nspawn"
