# GridTokenX Meter Gateway: `deno task start` as a non-root user, the store on a volume.
#   docker build -t gridtokenx-gateway .
#
# The base image is pinned by tag to the Deno release the gateway is tested on. It is not pinned
# by digest because none could be resolved where this file was written (no registry access); to
# pin it, resolve the digest once and append it:
#   docker buildx imagetools inspect denoland/deno:2.9.6   # -> FROM denoland/deno:2.9.6@sha256:…
FROM denoland/deno:2.9.6

ENV DENO_NO_UPDATE_CHECK=1 \
    DENO_NO_PROMPT=1
WORKDIR /app

# Dependencies first, in their own layers: a code change does not fetch the npm packages again.
# vendor/ holds the patched postgres.js (the import map's "postgres" entry points into it).
# --frozen: a deno.lock that does not match deno.json fails the build instead of being rewritten.
COPY deno.json deno.lock ./
COPY vendor/ ./vendor/
RUN deno install --frozen

# Then the code, and the module graph of the gateway, its writer worker and the operator tasks
# (migrations, doctor), so nothing is fetched at start.
COPY . .
RUN deno install --frozen --entrypoint main.ts workers/writer.ts cli/migrate.ts cli/doctor.ts

# The store holds password hashes and device keys: only the gateway user may enter /data.
# The code stays owned by root (read-only for the gateway); `deno` is the base image's user.
RUN mkdir -p /data && chown deno:deno /data && chmod 700 /data
USER deno

ENV HOST=0.0.0.0 \
    PORT=8080 \
    DENO_KV_PATH=/data/gateway.kv
VOLUME ["/data"]
EXPOSE 8080

# Liveness only (/healthz): readiness (/readyz) is for the load balancer to route by.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["deno", "eval", "const r = await fetch('http://127.0.0.1:' + (Deno.env.get('PORT') ?? '8080') + '/healthz'); Deno.exit(r.ok ? 0 : 1)"]

# SIGTERM starts the graceful shutdown: listeners close, the writer commits everything already
# accepted, held MQTT acks are released. Give it time: `docker stop --time 30` or compose's
# stop_grace_period (deploy/compose.yaml sets 30s); Docker's default of 10 s may cut a drain short.
STOPSIGNAL SIGTERM

# The image's entrypoint runs `deno <args>`.
CMD ["task", "start"]
