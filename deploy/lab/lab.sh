#!/usr/bin/env bash
# A three-provider skymirror lab on the local Docker engine: three "clouds", each
# its own Docker network with an agent (docker driver) whose replicas join that
# network, a daemon on a control network, and a front door that reaches every
# cloud. Outages and partitions are then plain Docker operations:
#
#   docker kill LAB-agent-aws $(docker ps -q --filter label=skymirror.provider=aws)
#                                                  # a cloud outage
#   docker network disconnect LAB-control LAB-agent-gcp
#                                                  # a control-plane partition
#   docker restart LAB-daemon                      # a daemon restart
#
# Networks: LAB-control (daemon, agents, edge) and LAB-<cloud> per cloud (that
# cloud's agent and replicas; the edge and the daemon too, standing for the
# public internet through which users and the daemon's outside probes reach
# replicas). Agents dial the daemon by the name `control-plane`, which exists
# on LAB-control only, so cutting an agent off LAB-control cuts it off the
# daemon and nothing else.
#
# Usage: deploy/lab/lab.sh up|down|status|cli ARGS...
#   up      build the images if missing (release), start everything, apply the
#           providers and deploy/lab/hello.yaml, wait until every replica is ready
#   down    remove the lab's containers (replicas included), networks and volumes
#   status  the lab's containers, providers and replicas
#   cli     run the skymirror CLI inside the daemon's container, e.g.
#           `lab.sh cli get replicas`, `lab.sh cli apply -f - < app.yaml`
#
# Settings (environment):
#   SKYMIRROR_LAB            name prefix of everything it creates (skymirror-lab)
#   SKYMIRROR_LAB_CLOUDS     provider names, highest priority first ("aws gcp hetzner")
#   SKYMIRROR_LAB_TAG        image tag to run (latest)
#   SKYMIRROR_LAB_API_PORT   host port of the daemon's API on 127.0.0.1 (7600)
#   SKYMIRROR_LAB_EDGE_PORT  host port of the front door on 127.0.0.1 (8080)
#   SKYMIRROR_LAB_READY_TIMEOUT  seconds `up` waits for every replica (120)
set -euo pipefail
cd "$(dirname "$0")/../.."

lab=${SKYMIRROR_LAB:-skymirror-lab}
read -r -a clouds <<<"${SKYMIRROR_LAB_CLOUDS:-aws gcp hetzner}"
tag=${SKYMIRROR_LAB_TAG:-latest}
api_port=${SKYMIRROR_LAB_API_PORT:-7600}
edge_port=${SKYMIRROR_LAB_EDGE_PORT:-8080}
# How long `up` waits for every replica to be ready.
ready_timeout=${SKYMIRROR_LAB_READY_TIMEOUT:-120}

say() { echo "lab: $*" >&2; }
die() { echo "lab: error: $*" >&2; exit 1; }

cli() { docker exec -i "$lab-daemon" /skymirror "$@"; }

images_present() {
  docker image inspect "skymirror-daemon:$tag" "skymirror-agent:$tag" \
    "skymirror-example:$tag" >/dev/null 2>&1
}

providers_yaml() {
  local priority=$((10 * ${#clouds[@]})) cloud
  for cloud in "${clouds[@]}"; do
    cat <<YAML
apiVersion: skymirror.dev/v1
kind: Provider
metadata:
  name: $cloud
  labels:
    cloud: $cloud
spec:
  driver: docker
  priority: $priority
  description: the $cloud cloud of the lab (Docker network $lab-$cloud)
---
YAML
    priority=$((priority - 10))
  done
}

# Ready replicas of the app, as the daemon reports them.
ready_count() {
  cli get replicas -o json 2>/dev/null | grep -c '"ready": true' || true
}

up() {
  docker info >/dev/null 2>&1 || die "no reachable Docker engine (docker info failed)"
  if docker container inspect "$lab-daemon" >/dev/null 2>&1; then
    die "lab $lab is already up (deploy/lab/lab.sh down first)"
  fi
  if ! images_present; then
    if [ "$tag" != latest ]; then
      die "images skymirror-{daemon,agent,example}:$tag are missing (deploy/docker/build-images.sh --tag $tag)"
    fi
    say "building the images (deploy/docker/build-images.sh)"
    deploy/docker/build-images.sh --tag "$tag"
  fi
  local token cloud
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  # All or nothing: a failure on the way removes what was started, after
  # showing the daemon's last words.
  trap 'up_failed' EXIT

  docker network create "$lab-control" >/dev/null
  for cloud in "${clouds[@]}"; do
    docker network create "$lab-$cloud" >/dev/null
  done

  say "starting the daemon (API on 127.0.0.1:$api_port)"
  docker run -d --name "$lab-daemon" --label "skymirror.lab=$lab" \
    --network "$lab-control" --network-alias control-plane \
    -v "$lab-daemon-data:/data" -p "127.0.0.1:$api_port:7600" \
    -e SKYMIRROR_JOIN_TOKEN="$token" \
    "skymirror-daemon:$tag" daemon --data-dir /data --listen 0.0.0.0:7600 \
    --insecure-plaintext --insecure-listen-anywhere >/dev/null
  for cloud in "${clouds[@]}"; do
    docker network connect "$lab-$cloud" "$lab-daemon"
  done
  local waited=0
  until cli status >/dev/null 2>&1; do
    waited=$((waited + 1))
    [ "$waited" -le 100 ] || die "the daemon did not answer within 20 s (docker logs $lab-daemon)"
    sleep 0.2
  done
  providers_yaml | cli apply -f - >&2

  for cloud in "${clouds[@]}"; do
    say "starting the agent of $cloud"
    docker run -d --name "$lab-agent-$cloud" --label "skymirror.lab=$lab" \
      --network "$lab-$cloud" \
      -v /var/run/docker.sock:/var/run/docker.sock -v "$lab-agent-$cloud:/state" \
      -e SKYMIRROR_JOIN_TOKEN="$token" \
      "skymirror-agent:$tag" --server http://control-plane:7600 --provider "$cloud" \
      --driver docker --docker-network "$lab-$cloud" --state-dir /state >/dev/null
    docker network connect "$lab-control" "$lab-agent-$cloud"
  done

  say "starting the front door (127.0.0.1:$edge_port)"
  docker run -d --name "$lab-edge" --label "skymirror.lab=$lab" \
    --network "$lab-control" -p "127.0.0.1:$edge_port:8080" \
    "skymirror-daemon:$tag" --server http://control-plane:7600 edge >/dev/null
  for cloud in "${clouds[@]}"; do
    docker network connect "$lab-$cloud" "$lab-edge"
  done

  sed "s|image: skymirror-example:latest|image: skymirror-example:$tag|" deploy/lab/hello.yaml |
    cli apply -f - >&2
  local want=$((2 * ${#clouds[@]})) ready=0
  waited=0
  while ready=$(ready_count); [ "$ready" -lt "$want" ]; do
    waited=$((waited + 1))
    [ "$waited" -le $((ready_timeout * 5)) ] ||
      die "only $ready of $want replicas ready after ${ready_timeout} s (deploy/lab/lab.sh status)"
    sleep 0.2
  done
  trap - EXIT
  say "up: $want replicas of hello ready on ${clouds[*]}"
  say "front door: http://127.0.0.1:$edge_port/   API: --server http://127.0.0.1:$api_port"
}

up_failed() {
  local status=$?
  trap - EXIT
  [ "$status" -ne 0 ] || return 0
  if docker container inspect "$lab-daemon" >/dev/null 2>&1; then
    say "the daemon's last log lines:"
    docker logs --tail 20 "$lab-daemon" >&2 || true
  fi
  say "up failed; removing what it started"
  down || true
  exit "$status"
}

down() {
  local cloud ids left=""
  # The agents first: a live agent would restart the replicas removed below.
  ids=$(docker ps -aq --filter "label=skymirror.lab=$lab")
  # shellcheck disable=SC2086 # one id per word
  [ -z "$ids" ] || docker rm -f -v $ids >/dev/null
  ids=""
  for cloud in "${clouds[@]}"; do
    ids+=" $(docker ps -aq --filter "label=skymirror.managed=true" \
      --filter "label=skymirror.provider=$cloud" --filter "network=$lab-$cloud")"
  done
  # shellcheck disable=SC2086 # one id per word
  [ -z "${ids// /}" ] || docker rm -f -v $ids >/dev/null
  for cloud in control "${clouds[@]}"; do
    if docker network inspect "$lab-$cloud" >/dev/null 2>&1 &&
      ! docker network rm "$lab-$cloud" >/dev/null; then
      left+=" network $lab-$cloud"
    fi
  done
  for volume in "$lab-daemon-data" "${clouds[@]/#/$lab-agent-}"; do
    if docker volume inspect "$volume" >/dev/null 2>&1 &&
      ! docker volume rm "$volume" >/dev/null; then
      left+=" volume $volume"
    fi
  done
  [ -z "$left" ] || die "down: could not remove:$left"
  say "down: lab $lab removed"
}

status() {
  docker ps -a --filter "label=skymirror.lab=$lab" --format 'table {{.Names}}\t{{.Status}}'
  cli get providers
  cli get replicas
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  cli) shift; cli "$@" ;;
  *) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
