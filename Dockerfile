# Multi-stage build: compile with the Rust toolchain, run on a slim Debian
# image as an unprivileged user with nothing added but the binary, the CA
# bundle (for HTTPS hosters) and the config.
#   docker build -t anibridge-proxy .
#   docker run -d --name anibridge-proxy --read-only -p 127.0.0.1:8080:8080 \
#     -e ANIBRIDGE_PROXY_SECRET="$(openssl rand -hex 32)" anibridge-proxy
# (Podman: `podman build --format docker ...` keeps the HEALTHCHECK.)
# The image's config is conf/container.yaml; to change it, mount your own:
#   -v $PWD/my-proxy.yaml:/etc/anibridge-proxy/anibridge-proxy.yaml:ro
FROM rust:1-bookworm AS build
# pingora-core builds zlib-ng with cmake.
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY conf ./conf
# The release profile keeps line tables for profiling; the image does not need them.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --bin anibridge-proxy

FROM debian:bookworm-slim
# No package manager run here: the CA bundle comes from the build stage, and
# the user is a bare uid (nothing in the image needs its name).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/anibridge-proxy /usr/local/bin/anibridge-proxy
COPY conf/container.yaml /etc/anibridge-proxy/anibridge-proxy.yaml
USER 10001:10001
EXPOSE 8080 9090
# The proxy drains on SIGTERM for shutdown_grace (8 s in conf/container.yaml,
# within `docker stop`'s default 10 s).
STOPSIGNAL SIGTERM
# The binary asks its own admin listener for /healthz: no curl or shell needed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/anibridge-proxy", "--config", "/etc/anibridge-proxy/anibridge-proxy.yaml", "--health"]
ENTRYPOINT ["/usr/local/bin/anibridge-proxy"]
CMD ["--config", "/etc/anibridge-proxy/anibridge-proxy.yaml"]
