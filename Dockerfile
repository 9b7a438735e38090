# Multi-stage build: compile with the Rust toolchain, run on a slim Debian
# image as an unprivileged user.
#   docker build -t anibridge-proxy .
#   docker run -p 8080:8080 -e ANIBRIDGE_PROXY_SECRET=... anibridge-proxy
# The image's config is conf/container.yaml; to change it, mount your own:
#   -v $PWD/my-proxy.yaml:/etc/anibridge-proxy/anibridge-proxy.yaml:ro
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY conf ./conf
RUN cargo build --release --locked --bin anibridge-proxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin anibridge
COPY --from=build /src/target/release/anibridge-proxy /usr/local/bin/anibridge-proxy
COPY conf/container.yaml /etc/anibridge-proxy/anibridge-proxy.yaml
USER anibridge
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/anibridge-proxy"]
CMD ["--config", "/etc/anibridge-proxy/anibridge-proxy.yaml"]
