#!/bin/sh
# Container entry point. The first start of the auth container initialises the
# gateway (CA, server certificate, config) in $PUSHGATE_DIR (/var/lib/pushgate,
# the volumes of docker-compose.yml) from the environment that docker-compose.yml
# passes; it creates no VPN account (it prints the command that does).
set -eu
DIR=${PUSHGATE_DIR:-/var/lib/pushgate}
CONFIG="$DIR/pushgate.toml"

case "$1" in
auth)
    if [ ! -f "$CONFIG" ]; then
        : "${PUSHGATE_SERVER_NAME:?set PUSHGATE_SERVER_NAME: the name clients use for the auth service}"
        : "${PUSHGATE_PUBLIC_ENDPOINT:?set PUSHGATE_PUBLIC_ENDPOINT: the HOST:PORT clients send push packets to}"
        : "${PUSHGATE_TUNNEL_NETWORK:?set PUSHGATE_TUNNEL_NETWORK: the network clients get addresses from}"
        set --
        for network in ${PUSHGATE_DENY_NETWORKS:-}; do set -- "$@" --deny-network "$network"; done
        for route in ${PUSHGATE_ROUTES:-}; do set -- "$@" --route "$route"; done
        for server in ${PUSHGATE_DNS:-}; do set -- "$@" --dns "$server"; done
        # Metrics on every address of the container, for Prometheus' (the tunnel
        # cannot reach them: the dataplane refuses clients' packets to this stack's
        # network); the database in its own volume, mounted here only (like tls/).
        pushgate-admin init --dir "$DIR" "$@" \
            --server-name "$PUSHGATE_SERVER_NAME" \
            --auth-listen 0.0.0.0:7443 \
            --dataplane-endpoint "$PUSHGATE_PUBLIC_ENDPOINT" \
            --dataplane-listen 0.0.0.0:51820 \
            --tunnel-network "$PUSHGATE_TUNNEL_NETWORK" \
            --database db/pushgate.db \
            --auth-metrics-listen 0.0.0.0:9101 \
            --dataplane-metrics-listen 0.0.0.0:9102
        echo "first start: no VPN user yet; add one (it prompts for the secret) with"
        echo "  docker-compose -f deploy/docker-compose.yml exec auth pushgate-admin user add NAME --config $CONFIG"
    fi
    exec pushgate-auth --config "$CONFIG" \
        --log-level "${PUSHGATE_LOG_LEVEL:-info}" --log-format "${PUSHGATE_LOG_FORMAT:-text}"
    ;;
dataplane)
    # docker-compose.yml starts the dataplane once the auth service is healthy,
    # which it is only after the first start wrote the config.
    if [ ! -f "$CONFIG" ]; then
        echo "pushgate-entrypoint: $CONFIG does not exist: the auth container writes it at its first start" >&2
        exit 2
    fi
    if [ -n "${PUSHGATE_NAT_INTERFACE:-}" ]; then
        pushgate-nat --config "$CONFIG" "$PUSHGATE_NAT_INTERFACE"  # one shot, before the dataplane
    fi
    exec pushgate-dataplane --config "$CONFIG" \
        --log-level "${PUSHGATE_LOG_LEVEL:-info}" --log-format "${PUSHGATE_LOG_FORMAT:-text}"
    ;;
*)
    exec "$@"
    ;;
esac
