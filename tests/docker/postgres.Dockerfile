# PostgreSQL for the compose test, made from the Debian base with Debian's package (no registry is
# reachable to pull postgres:16). It takes the official image's POSTGRES_USER, POSTGRES_PASSWORD and
# POSTGRES_DB, keeps its data in /var/lib/postgresql/data, and listens on 127.0.0.1:$PGPORT only (the
# test runs it on the host's network).
ARG BASE=oaml-base:bookworm
FROM ${BASE}
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/postgresql/data /run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data PGPORT=5432
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
