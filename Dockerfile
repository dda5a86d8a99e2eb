# One small runtime image with every prebuilds binary:
#   prebuilds-scheduler, prebuilds-worker, prebuilds-provisioner, prebuilds-notifier, prebuildsctl
#   (and terraform).
#
#   docker build -t prebuilds:local .                          compiles everything (stage `compiled`)
#   docker build --build-arg BINARIES=prebuilt -t prebuilds:local .
#       takes binaries already built on the host from .docker-bin/ (scripts/compose-check does this:
#       no registry or internet is needed beyond the debian:bookworm-slim base).
#
# No `# syntax=` line on purpose: it would make every build pull a frontend image from a registry.

# Which stage supplies /out (the binaries and terraform): `compiled` or `prebuilt`.
ARG BINARIES=compiled

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The dependency layer: the manifests of every workspace member (tests/tests/compose.rs checks the
# list against Cargo.toml) with empty sources, built once, so a source edit recompiles only the
# workspace's own crates.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY core/Cargo.toml core/
COPY schemas/Cargo.toml schemas/
COPY runtime/Cargo.toml runtime/
COPY store/Cargo.toml store/
COPY worker/Cargo.toml worker/
COPY scheduler/Cargo.toml scheduler/
COPY provisioner/Cargo.toml provisioner/
COPY notifier/Cargo.toml notifier/
COPY cli/Cargo.toml cli/
COPY api/Cargo.toml api/
COPY tests/Cargo.toml tests/
COPY bench/Cargo.toml bench/
COPY reliability/Cargo.toml reliability/
COPY scripts/docker-stub-sources scripts/
RUN scripts/docker-stub-sources . \
 && cargo build --release --locked \
      -p prebuilds-worker -p prebuilds-scheduler -p prebuilds-provisioner -p prebuilds-notifier \
      -p prebuildsctl -p prebuilds-api
COPY . .
# COPY keeps the files' own times, which can be older than the stub build: touch them so Cargo
# rebuilds the workspace crates from the real sources.
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
 && cargo build --release --locked \
      -p prebuilds-worker -p prebuilds-scheduler -p prebuilds-provisioner -p prebuilds-notifier \
      -p prebuildsctl -p prebuilds-api \
 && mkdir /out \
 && cp target/release/prebuilds-worker target/release/prebuilds-scheduler \
       target/release/prebuilds-provisioner target/release/prebuilds-notifier \
       target/release/prebuildsctl target/release/prebuilds-api /out/

FROM debian:bookworm-slim AS terraform
ARG TERRAFORM_VERSION=1.9.8
# SHA-256 of terraform_1.9.8_linux_amd64.zip, from HashiCorp's terraform_1.9.8_SHA256SUMS: the
# download is checked before it is unpacked. A different TERRAFORM_VERSION needs its own value.
ARG TERRAFORM_SHA256=186e0145f5e5f2eb97cbd785bc78f21bae4ef15119349f6ad4fa535b83b10df8
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl unzip \
 && curl -fsSL -o /tmp/tf.zip "https://releases.hashicorp.com/terraform/${TERRAFORM_VERSION}/terraform_${TERRAFORM_VERSION}_linux_amd64.zip" \
 && echo "$TERRAFORM_SHA256  /tmp/tf.zip" | sha256sum -c - \
 && unzip /tmp/tf.zip -d /usr/local/bin && rm /tmp/tf.zip

FROM scratch AS compiled
COPY --from=build /out/ /out/
COPY --from=terraform /usr/local/bin/terraform /out/terraform

# .docker-bin/ holds prebuilds-worker, prebuilds-scheduler, prebuilds-provisioner,
# prebuilds-notifier, prebuildsctl, prebuilds-api
# and terraform, built or installed on the host (the same Debian release as the runtime stage).
FROM scratch AS prebuilt
COPY .docker-bin/ /out/

FROM ${BINARIES} AS binaries

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /home/prebuilds prebuilds
COPY --from=binaries /out/ /usr/local/bin/
COPY examples/ /opt/prebuilds/examples/
USER prebuilds
WORKDIR /home/prebuilds
ENV PREBUILDS_LOG_FORMAT=json \
    PREBUILDS_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
# Each compose service picks its binary with `command:`.
CMD ["prebuildsctl", "--help"]
