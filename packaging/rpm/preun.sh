# flowcoach %preun ($1: 0 = erase, 1 = upgrade). Like %systemd_preun: on erase, disable
# and stop the units, and stop every instance of the templates. On an upgrade nothing
# stops: %postun hands the running daemons over to the new binary.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now flowcoach.service flowcoach.socket \
        flowcoach-metrics.socket >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        systemctl stop 'flowcoach@*.service' 'flowcoach@*.socket' >/dev/null 2>&1 || :
    fi
    # Instances the administrator enabled (systemctl enable flowcoach@NAME).
    rm -f /etc/systemd/system/*.wants/flowcoach@*.service \
        /etc/systemd/system/*.wants/flowcoach@*.socket
fi
