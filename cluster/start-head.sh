#!/usr/bin/env bash
# Start a Ray head node for coremerge jobs on this machine.
#
#   cluster/start-head.sh [more `ray start` flags, e.g. --num-gpus 8]
#
# - The GCS, the dashboard and the job API listen on 127.0.0.1: reach them from elsewhere
#   through an SSH tunnel (ssh -L 8265:127.0.0.1:8265 head-node), never an open port.
#   For worker nodes on other machines set RAY_HEAD_IP to this node's private address
#   (the dashboard and job API stay on 127.0.0.1 either way).
# - Token authentication is on (RAY_AUTH_MODE=token). The token is RAY_AUTH_TOKEN if set, else
#   the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; a missing file is created (0600).
#   Every client needs RAY_AUTH_MODE=token and the same token, e.g.
#     RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
#         --runtime-env cluster/runtime_env.yaml -- python -m pipeline run job.yaml
#
# Environment: RAY_HEAD_IP (127.0.0.1), RAY_HEAD_PORT (6379), RAY_DASHBOARD_PORT (8265).
set -euo pipefail

head_ip="${RAY_HEAD_IP:-127.0.0.1}"
port="${RAY_HEAD_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"

export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  if [ ! -s "$token_file" ]; then
    mkdir -p "$(dirname "$token_file")"
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' > "$token_file")
    echo "start-head.sh: wrote a new Ray auth token to $token_file" >&2
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

echo "start-head.sh: Ray head on $head_ip:$port, job API on http://127.0.0.1:$dashboard_port (token auth on)" >&2
