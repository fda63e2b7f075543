# Sourced by /etc/acpi/power.sh before it unmounts the store: the daemon, its workers, the
# collector and every build keep files open on /nix, and init would respawn the daemon at once,
# so its wrapper (and the collector's) waits instead once /run/virby-stopping exists.
touch /run/virby-stopping
killall -TERM nix-daemon virby-nix-gc nix-store 2>/dev/null
for d in /proc/[0-9]*; do  # builds run as the nixbld users (uids from 30001)
  uid=$(sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' "$d/status" 2>/dev/null)
  [ "${uid:-0}" -gt 30000 ] && kill -KILL "${d#/proc/}" 2>/dev/null
done
i=0
while pidof nix-daemon > /dev/null && [ $i -lt 30 ]; do usleep 100000; i=$((i + 1)); done
killall -KILL nix-daemon 2>/dev/null
