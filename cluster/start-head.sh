#!/usr/bin/env bash
# Start a Ray head node for coremerge jobs on this machine.
#
#   cluster/start-head.sh [more `ray start` flags, e.g. --num-gpus 8]
#
# Settings (environment; cluster/README.md, "start-head.sh settings", has the details):
#   RAY_HEAD_IP         127.0.0.1  the node's address. 127.0.0.1 (or localhost, ::1): a one-machine
#                                  cluster with every Ray port on 127.0.0.1. A private address:
#                                  worker nodes on other machines can join, and Ray serves most
#                                  ports on all interfaces (cluster/README.md, "Security").
#   RAY_HEAD_PORT       6379       the GCS port (workers join at RAY_HEAD_IP:RAY_HEAD_PORT)
#   RAY_DASHBOARD_PORT  8265       the dashboard and job API, always on 127.0.0.1: reach it from
#                                  elsewhere through an SSH tunnel (ssh -L 8265:127.0.0.1:8265 head)
#   RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH  the token (below)
# Other ports are `ray start` flags: --ray-client-server-port, --dashboard-agent-listen-port, ...
#
# Token authentication is on (RAY_AUTH_MODE=token). The token is RAY_AUTH_TOKEN if set, else
# the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a missing file is created 0600, and a
# ~/.ray/auth_token that others can read is set to 0600. Every client needs RAY_AUTH_MODE=token
# and the same token, e.g.
#     RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
#         --runtime-env cluster/runtime_env.yaml -- python -m pipeline run job.yaml
set -euo pipefail

head_ip="${RAY_HEAD_IP:-127.0.0.1}"
port="${RAY_HEAD_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"

export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

case "$head_ip" in
  127.0.0.1 | localhost | ::1)
    # Ray rewrites a loopback --node-ip-address to this machine's outward address, and then
    # serves GCS, raylet, agents and workers on every interface; this setting (Ray's single-node
    # mode, the default on macOS) keeps the node IP 127.0.0.1, so that every port binds there.
    # The head's processes inherit it; see cluster/README.md for clients that join the GCS.
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    loopback=1 ;;
  *) loopback=0 ;;
esac

if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ ! -s "$token_file" ] || [ -z "$(tr -d '[:space:]' < "$token_file")" ]; then
    mkdir -p -m 700 "$(dirname "$token_file")"
    tmp="$(mktemp "$(dirname "$token_file")/.auth_token.XXXXXX")"  # 0600 from the start
    trap 'rm -f "$tmp"' EXIT  # if writing it fails
    python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$tmp"
    mv -f "$tmp" "$token_file"  # replaces a blank file, whatever its mode
    echo "start-head.sh: wrote a new Ray auth token to $token_file" >&2
  else
    mode="$(stat -L -c %a "$token_file")"
    if (( 8#$mode & 8#077 )); then
      # A token others can read lets them run code as this user (a local ray.init() of Ray
      # 2.60 writes ~/.ray/auth_token 0644). A file named by RAY_AUTH_TOKEN_PATH keeps its
      # mode: it may be shared on purpose.
      if [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        chmod 600 "$token_file"
        echo "start-head.sh: $token_file was readable by others (mode $mode); set it to 0600" >&2
      else
        echo "start-head.sh: $token_file is readable by others (mode $mode); chmod 600 it unless others must share this token" >&2
      fi
    fi
  fi
fi

ray start --head \
  --node-ip-address "$head_ip" \
  --port "$port" \
  --include-dashboard true \
  --dashboard-host 127.0.0.1 \
  --dashboard-port "$dashboard_port" \
  --disable-usage-stats \
  "$@"

if [ "$loopback" = 1 ]; then
  echo "start-head.sh: Ray head on 127.0.0.1:$port, every port on 127.0.0.1; job API on http://127.0.0.1:$dashboard_port (token auth on)" >&2
else
  echo "start-head.sh: Ray head on $head_ip:$port (workers join there); job API on http://127.0.0.1:$dashboard_port (token auth on)" >&2
fi
