# flowcoach %post ($1: 1 = install, 2 = upgrade). The user and admin group flowcoach and
# /run/flowcoach; then, like %systemd_post, a first install enables the units as the
# distribution's presets say (systemctl preset) and starts nothing: RPM-based systems
# leave starting to the administrator. Both units are skipped anyway until
# /etc/flowcoach/slack-app-token exists.
systemd-sysusers /usr/lib/sysusers.d/flowcoach.conf || :
if [ -d /run/systemd/system ]; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/flowcoach.conf || :
    systemctl daemon-reload || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset flowcoach.socket flowcoach.service >/dev/null 2>&1 || :
fi
