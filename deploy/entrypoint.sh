#!/bin/sh
# Container entry point. The first start of the auth container initialises the
# gateway (CA, server certificate, config, first admin user) in /var/lib/pushgate.
set -eu
DIR=/var/lib/pushgate
CONFIG="$DIR/pushgate.toml"

case "$1" in
auth)
    if [ ! -f "$CONFIG" ]; then
        deny=""
        for network in ${PUSHGATE_DENY_NETWORKS:-}; do deny="$deny --deny-network $network"; done
        # shellcheck disable=SC2086 # $deny is a list of arguments
        pushgate-admin init --dir "$DIR" $deny \
            --server-name "${PUSHGATE_SERVER_NAME:-localhost}" \
            --auth-listen 0.0.0.0:7443 \
            --dataplane-endpoint "${PUSHGATE_PUBLIC_ENDPOINT:-localhost:51820}" \
            --dataplane-listen 0.0.0.0:51820 \
            --tunnel-network "${PUSHGATE_TUNNEL_NETWORK:-198.19.0.0/24}"
        # Metrics must be reachable from the Prometheus container (and are not from
        # the tunnel: the dataplane refuses clients' packets to this stack's network).
        sed -i 's/^metrics_listen = "127.0.0.1:9101"/metrics_listen = "0.0.0.0:9101"/' "$CONFIG"
        sed -i 's/^metrics_listen = "127.0.0.1:9102"/metrics_listen = "0.0.0.0:9102"/' "$CONFIG"
        # The database in its own volume, mounted in this container only (like tls/).
        sed -i 's|^database = "pushgate.db"|database = "db/pushgate.db"|' "$CONFIG"
        if [ -z "${PUSHGATE_ADMIN_PASSWORD:-}" ]; then
            PUSHGATE_ADMIN_PASSWORD=$(python -c 'import secrets; print(secrets.token_urlsafe(18))')
            echo "first start: user 'admin' created with password $PUSHGATE_ADMIN_PASSWORD"
        fi
        PUSHGATE_PASSWORD="$PUSHGATE_ADMIN_PASSWORD" pushgate-admin user add admin --config "$CONFIG"
    fi
    exec pushgate-auth --config "$CONFIG"
    ;;
dataplane)
    while [ ! -f "$CONFIG" ]; do echo "waiting for the auth container to initialise $CONFIG"; sleep 1; done
    if [ -n "${PUSHGATE_NAT_INTERFACE:-}" ]; then
        pushgate-nat --config "$CONFIG" "$PUSHGATE_NAT_INTERFACE"  # one shot, before the dataplane
    fi
    exec pushgate-dataplane --config "$CONFIG"
    ;;
*)
    exec "$@"
    ;;
esac
