#!/usr/bin/env bash
# pushgate for ../shared/bench/netns-tunnels.sh (its --extra hook contract):
# auth service and dataplane in the server namespace, pushgate-client in the
# client namespace, overlay 198.19.0.1 (gateway) <-> 198.19.0.2 (client).
#   bash ../shared/bench/netns-tunnels.sh -s veth,pushgate --extra pushgate=bench/pushgate-hook.sh
set -euo pipefail
bin="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin"
wd=$VPNB_WORKDIR
s_if="pg${VPNB_IFTAG}s" c_if="pg${VPNB_IFTAG}c"
# PUSHGATE_PYSPY=DIR: also profile the dataplane and the client with py-spy for
# PUSHGATE_PYSPY_SECONDS (default 25, about the idle ping and the TCP tests),
# starting PUSHGATE_PYSPY_DELAY seconds after the tunnel is up (default 0; about
# 14 reaches the UDP test with -t 5), writing collapsed stacks to
# DIR/{dataplane,client}-<tag>.txt.
profile() {
  [ -n "${PUSHGATE_PYSPY:-}" ] || return 0
  mkdir -p "$PUSHGATE_PYSPY"
  local name pid
  for name in dataplane client; do
    pid=$(sed -n "$([ $name = dataplane ] && echo 2 || echo 3)p" "$VPNB_PIDFILE")
    (sleep "${PUSHGATE_PYSPY_DELAY:-0}"
     exec "$bin/py-spy" record --nonblocking -r 200 -d "${PUSHGATE_PYSPY_SECONDS:-25}" -f raw \
       -o "$PUSHGATE_PYSPY/$name-$VPNB_IFTAG.txt" -p "$pid") >/dev/null 2>&1 &
  done
}
case ${1:-} in
up)
  umask 077
  "$bin/pushgate-admin" init --dir "$wd/gw" --server-name "$VPNB_UNDERLAY_SERVER" \
    --auth-listen "$VPNB_UNDERLAY_SERVER:7443" \
    --dataplane-endpoint "$VPNB_UNDERLAY_SERVER:51820" \
    --dataplane-listen "$VPNB_UNDERLAY_SERVER:51820" \
    --tunnel-network "198.19.0.0/$VPNB_OVERLAY_PREFIX" \
    --gateway-address "$VPNB_OVERLAY_SERVER" --route "198.19.0.0/$VPNB_OVERLAY_PREFIX" \
    --offer "tcp $VPNB_OVERLAY_SERVER:5201" --offer "udp $VPNB_OVERLAY_SERVER:5201" >/dev/null
  echo "bench password" >"$wd/password"
  "$bin/pushgate-admin" user add bench --config "$wd/gw/pushgate.toml" \
    --password-file "$wd/password" >/dev/null
  ip netns exec "$VPNB_NS_SERVER" "$bin/pushgate-auth" --config "$wd/gw/pushgate.toml" \
    >"$wd/auth.log" 2>&1 &
  echo $! >>"$VPNB_PIDFILE"
  ip netns exec "$VPNB_NS_SERVER" "$bin/pushgate-dataplane" --config "$wd/gw/pushgate.toml" \
    --tun-name "$s_if" >"$wd/dataplane.log" 2>&1 &
  echo $! >>"$VPNB_PIDFILE"
  for _ in $(seq 100); do [ -S "$wd/gw/run/control.sock" ] && break; sleep 0.1; done
  ip netns exec "$VPNB_NS_CLIENT" "$bin/pushgate-client" --tun "$c_if" --status-dir "$wd/c" \
    connect --server "$VPNB_UNDERLAY_SERVER:7443" --ca "$wd/gw/tls/ca.crt" --user bench \
    --password-file "$wd/password" >"$wd/client.log" 2>&1 &
  echo $! >>"$VPNB_PIDFILE"
  for _ in $(seq 150); do
    ip netns exec "$VPNB_NS_CLIENT" "$bin/pushgate-client" --tun "$c_if" --status-dir "$wd/c" \
      status 2>/dev/null | grep -q '^state: *up' && { profile; exit 0; }
    sleep 0.2
  done
  echo "pushgate client did not come up" >&2; cat "$wd"/*.log >&2; exit 1
  ;;
down) ;;  # the harness kills the recorded pids and deletes the namespaces
*) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
