# GridTokenX Meter Gateway: `deno task start` with the store on a volume.
FROM denoland/deno:2.9.6

WORKDIR /app
# Dependencies first, so code changes do not invalidate the cached npm packages.
COPY deno.json deno.lock ./
COPY . .
# The store holds password hashes and device keys: only the gateway user may enter /data.
RUN mkdir -p /data && chown deno:deno /data && chmod 700 /data
USER deno
# Fetch and type-check everything now (including the writer worker), not at first start.
RUN deno cache main.ts workers/writer.ts

ENV HOST=0.0.0.0 \
    PORT=8080 \
    DENO_KV_PATH=/data/gateway.kv
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["deno", "eval", "const r = await fetch('http://127.0.0.1:' + (Deno.env.get('PORT') ?? '8080') + '/healthz'); Deno.exit(r.ok ? 0 : 1)"]

# The image's entrypoint runs `deno <args>`.
CMD ["task", "start"]
