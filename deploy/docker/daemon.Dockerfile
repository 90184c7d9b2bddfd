# skymirror: the daemon, the CLI and the front door in one binary.
# Built by deploy/docker/build-images.sh, which stages rootfs/ (the binary and
# the libraries it links); nothing is pulled.
#
#   docker run -v skymirror-data:/data -p 7600:7600 skymirror-daemon \
#     daemon --data-dir /data --listen 0.0.0.0:7600 --advertise DAEMON
#   (TLS with the CA in /data/pki and the first admin token in /data/admin-token)
#   docker run skymirror-daemon --server https://DAEMON:7600 edge
FROM scratch
COPY rootfs/ /
VOLUME /data
EXPOSE 7600
ENTRYPOINT ["/skymirror"]
CMD ["--help"]
