# nginx for the compose test, from the Debian base with Debian's package (nginx:1.27-alpine cannot be
# pulled here). The test mounts its own configuration at /etc/nginx/conf.d/default.conf.
ARG BASE=oaml-base:bookworm
FROM ${BASE}
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
CMD ["nginx", "-g", "daemon off;"]
