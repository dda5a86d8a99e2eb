# syntax=docker/dockerfile:1
# One small runtime image with every prebuilds binary:
#   prebuilds-scheduler, prebuilds-worker, prebuilds-provisioner, prebuildsctl.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits don't rebuild them.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY core/Cargo.toml core/
COPY schemas/Cargo.toml schemas/
COPY runtime/Cargo.toml runtime/
COPY store/Cargo.toml store/
COPY worker/Cargo.toml worker/
COPY scheduler/Cargo.toml scheduler/
COPY provisioner/Cargo.toml provisioner/
COPY cli/Cargo.toml cli/
COPY tests/Cargo.toml tests/
RUN cargo fetch --locked
COPY . .
RUN cargo build --release --locked \
      -p prebuilds-worker -p prebuilds-scheduler -p prebuilds-provisioner -p prebuildsctl \
 && mkdir /out \
 && cp target/release/prebuilds-worker target/release/prebuilds-scheduler \
       target/release/prebuilds-provisioner target/release/prebuildsctl /out/

FROM debian:bookworm-slim AS terraform
ARG TERRAFORM_VERSION=1.9.8
# SHA-256 of terraform_1.9.8_linux_amd64.zip, from HashiCorp's terraform_1.9.8_SHA256SUMS: the
# download is checked before it is unpacked. A different TERRAFORM_VERSION needs its own value.
ARG TERRAFORM_SHA256=186e0145f5e5f2eb97cbd785bc78f21bae4ef15119349f6ad4fa535b83b10df8
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl unzip \
 && curl -fsSL -o /tmp/tf.zip "https://releases.hashicorp.com/terraform/${TERRAFORM_VERSION}/terraform_${TERRAFORM_VERSION}_linux_amd64.zip" \
 && echo "$TERRAFORM_SHA256  /tmp/tf.zip" | sha256sum -c - \
 && unzip /tmp/tf.zip -d /usr/local/bin && rm /tmp/tf.zip

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /home/prebuilds prebuilds
COPY --from=build /out/ /usr/local/bin/
COPY --from=terraform /usr/local/bin/terraform /usr/local/bin/terraform
COPY examples/ /opt/prebuilds/examples/
USER prebuilds
WORKDIR /home/prebuilds
ENV PREBUILDS_LOG_FORMAT=json \
    PREBUILDS_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
# Each compose service picks its binary with `command:`.
CMD ["prebuildsctl", "--help"]
