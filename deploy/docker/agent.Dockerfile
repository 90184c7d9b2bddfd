# skymirror-agent, for a provider whose replicas are containers on the Docker
# engine it is given (mount its socket). Built by deploy/docker/build-images.sh,
# which stages rootfs/ (the binary and the libraries it links); nothing is pulled.
#
#   docker run -v /var/run/docker.sock:/var/run/docker.sock -v agent-state:/state \
#     skymirror-agent --server http://DAEMON:7600 --provider NAME --driver docker \
#     --state-dir /state --join-token TOKEN
FROM scratch
COPY rootfs/ /
VOLUME /state
ENTRYPOINT ["/skymirror-agent"]
CMD ["--help"]
