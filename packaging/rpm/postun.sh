# flowcoach %postun ($1: 0 = erase, >= 1 = upgrade; this is the old package's scriptlet,
# run once the new files are in place). Like %systemd_postun_with_reload: on an upgrade
# each running daemon (flowcoach.service, flowcoach@NAME.service) is reloaded, which hands
# it over to the new /usr/bin/flowcoach with no gap. A failed handover is rolled back and
# the previous version keeps serving; the upgrade does not fail for it.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 1 ]; then
        for unit in $(systemctl list-units --plain --no-legend --state=active \
                'flowcoach.service' 'flowcoach@*.service' | cut -d' ' -f1); do
            if systemctl reload "$unit"; then
                echo "flowcoach: $unit handed over to the new version"
            else
                echo "flowcoach: handing $unit over to the new version failed; the previous version keeps serving (journalctl -u $unit; retry: systemctl reload $unit)" >&2
            fi
        done
    fi
fi
if [ "$1" -eq 0 ]; then
    # The package's directories (its files are gone; /etc/flowcoach stays while it holds
    # tokens or a modified flowcoach.toml.rpmsave).
    rmdir /usr/lib/systemd/system/flowcoach.service.d \
        /usr/lib/systemd/system/flowcoach@.service.d \
        /usr/share/doc/flowcoach /etc/flowcoach 2>/dev/null || :
fi
