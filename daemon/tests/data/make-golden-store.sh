#!/usr/bin/env bash
# Writes golden-store/store: a sled store written by a released daemon, so
# that daemon/tests/golden_store.rs proves that this build still reads every
# record an existing installation holds (store/records.rs, "Migrations").
#
# The binaries come from a build of the release whose store is kept, NOT from
# this tree:
#
#   git worktree add /tmp/release f32e1b1 && cd /tmp/release
#   cargo build --workspace --bins            # debug is enough
#   daemon/tests/data/make-golden-store.sh /tmp/release/target/debug
#
# The committed store was written by commit f32e1b1 (record version 1,
# schema version 1). Usage: make-golden-store.sh BIN_DIR, where BIN_DIR holds
# `skymirror`, `skymirror-agent` and `skymirror-example`. Needs jq.
#
# What it does, all on 127.0.0.1 with the process driver:
#  1. starts `skymirror daemon` on a fresh data dir and applies
#     golden-store/initial.yaml (6 providers, 6 apps);
#  2. starts agents for aws-east, gcp-west and hetzner (the other providers
#     have none: their assignments are stored, nothing runs);
#  3. waits for the replicas to be healthy, kills one (an exit and a restart);
#  4. applies golden-store/spec.yaml (web: a workload change; api: more
#     replicas), deletes the app `scratch` and the provider `old-dc`;
#  5. operator controls: cordon/uncordon docker-lab, failover/failback of
#     leader, then cordon hetzner, drain ec2-spot, failover api to gcp-west;
#  6. stops the daemon (SIGTERM: it flushes the store), then the agents, then
#     kills the replicas, and copies the data dir's `store` here.
#
# The store's content depends on timing (event times, pids, ports), never on
# anything the test checks beyond what the steps above make certain.
set -euo pipefail

BIN=$(cd "${1:?usage: $0 BIN_DIR (holding skymirror, skymirror-agent, skymirror-example)}" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$HERE/golden-store
for b in skymirror skymirror-agent skymirror-example; do
  [[ -x $BIN/$b ]] || { echo "error: $BIN/$b is missing" >&2; exit 1; }
done
command -v jq >/dev/null || { echo "error: jq is needed" >&2; exit 1; }

WORK=$(mktemp -d /tmp/skymirror-golden.XXXXXX)
# Every process started here carries this variable, and so do the replicas the
# agents start: it is how they are found and stopped at the end.
MARKER_VAR=SKYMIRROR_GOLDEN_MARKER
MARKER=$(cat /proc/sys/kernel/random/uuid)
DAEMON_PID=
AGENT_PIDS=()

# Replicas started by this run's agents, by the marker in their environment.
marked_pids() {
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    [[ $pid == "$$" ]] && continue
    if { tr '\0' '\n' <"$f"; } 2>/dev/null | grep -qx "$MARKER_VAR=$MARKER"; then
      echo "$pid"
    fi
  done
}

cleanup() {
  local status=$?
  [[ -n $DAEMON_PID ]] && kill "$DAEMON_PID" 2>/dev/null || true
  for pid in "${AGENT_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in $(marked_pids); do kill -9 "$pid" 2>/dev/null || true; done
  if [[ $status -ne 0 ]]; then
    echo "failed; logs kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

log() { echo "== $*" >&2; }

sm() { "$BIN/skymirror" --server "$URL" "$@"; }

# wait_for DESCRIPTION SECONDS COMMAND...: runs COMMAND until it succeeds.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "error: timed out after ${seconds}s waiting for $what" >&2
      sm get replicas >&2 || true
      exit 1
    fi
    sleep 0.2
  done
}

# ready APP COUNT [WORKLOAD_GENERATION]: at least COUNT ready replicas of APP.
ready() {
  local n
  n=$(sm get replicas "$1" -o json |
    jq --argjson wg "${3:-0}" '[.[] | select(.ready and .workloadGeneration >= $wg)] | length')
  ((n >= $2))
}

# ready_on APP PROVIDER COUNT: COUNT ready replicas of APP on PROVIDER.
ready_on() {
  sm get replicas "$1" --provider "$2" -o json |
    jq -e --argjson n "$3" '[.[] | select(.ready)] | length >= $n'
}

# restarted APP PROVIDER INDEX: that replica restarted once and is ready again.
restarted() {
  sm get replicas "$1" --provider "$2" -o json |
    jq -e --argjson i "$3" 'any(.[]; .index == $i and .restarts >= 1 and .ready)'
}

log "daemon"
mkdir -p "$WORK/data"
env "$MARKER_VAR=$MARKER" "$BIN/skymirror" daemon --data-dir "$WORK/data" \
  --listen 127.0.0.1:0 --log info >"$WORK/daemon.out" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
listening() { [[ -s $WORK/daemon.out ]]; }
deadline=$((SECONDS + 30))
until listening; do
  ((SECONDS < deadline)) && kill -0 "$DAEMON_PID" || { echo "error: the daemon did not start" >&2; exit 1; }
  sleep 0.1
done
URL="http://$(head -n1 "$WORK/daemon.out" | awk '{print $NF}')"
log "daemon at $URL"

sm apply -f "$OUT/initial.yaml"

for provider in aws-east gcp-west hetzner; do
  mkdir -p "$WORK/agents/$provider"
  env "$MARKER_VAR=$MARKER" "$BIN/skymirror-agent" --server "$URL" --provider "$provider" \
    --driver process --state-dir "$WORK/agents/$provider" \
    --join-token-file "$WORK/data/join-token" --search-path "$BIN" \
    >/dev/null 2>"$WORK/agent-$provider.log" &
  AGENT_PIDS+=($!)
done

log "waiting for replicas"
wait_for "web ready on aws-east and gcp-west" 60 ready web 4
wait_for "api ready" 60 ready api 1
wait_for "worker ready" 60 ready worker 1
wait_for "leader ready" 60 ready leader 1

# settled: no replica is on its way up or down.
settled() {
  sm get replicas -o json |
    jq -e 'all(.[]; .state != "pending" and .state != "starting" and .state != "stopping")'
}

log "a replica exits and restarts"
pid=$(sm get replicas web --provider aws-east -o json | jq -r '.[] | select(.index == 0) | .instanceId')
kill -9 "$pid"
wait_for "web/aws-east/0 to restart" 60 restarted web aws-east 0

log "second apply, deletions"
sm apply -f "$OUT/spec.yaml"
wait_for "web's new workload" 90 ready web 4 2
sm delete app scratch
sm delete provider old-dc

log "operator controls"
sm cordon docker-lab
sm uncordon docker-lab
sm failover leader --to gcp-west
wait_for "leader on gcp-west" 60 ready_on leader gcp-west 1
sm failback leader
sm cordon hetzner
sm drain ec2-spot
sm failover api --to gcp-west
wait_for "api on gcp-west" 60 ready_on api gcp-west 2
wait_for "every replica to settle" 60 settled

sm get replicas >&2
sm get providers >&2

log "stopping"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" || { echo "error: the daemon exited with an error (see $WORK/daemon.log)" >&2; exit 1; }
DAEMON_PID=
for pid in "${AGENT_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${AGENT_PIDS[@]}"; do wait "$pid" || true; done
AGENT_PIDS=()
for pid in $(marked_pids); do kill -9 "$pid" 2>/dev/null || true; done

rm -rf "$OUT/store"
cp -r "$WORK/data/store" "$OUT/store"
# sled recreates its empty `blobs` directory on open, and git keeps no empty directory.
find "$OUT/store" -type d -empty -delete
log "wrote $OUT/store ($(du -sh "$OUT/store" | cut -f1))"
