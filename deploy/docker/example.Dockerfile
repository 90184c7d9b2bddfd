# The example app (deploy/example-app): answers `/` with the replica's identity
# and `/healthz` with 200. Give it `--host 0.0.0.0` to be reachable from outside
# its container; it listens on $PORT (default 8080). Built by
# deploy/docker/build-images.sh; nothing is pulled.
FROM scratch
COPY rootfs/ /
EXPOSE 8080
ENTRYPOINT ["/skymirror-example"]
