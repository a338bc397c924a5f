// `deno run --allow-net tests/_flood.ts <port> <count>`: opens `count` idle TCP connections to
// 127.0.0.1:<port> (at most 64 connecting at once, each given 5 s), prints
// `{"opened": n, "failed": n}` and holds them until killed (5 minutes at most). A separate process, so the flood has
// its own descriptors and a kill ends every pending connect.
const [port, count] = Deno.args.map(Number);
const held: Deno.Conn[] = [];
let failed = 0;
let next = 0;
async function worker(): Promise<void> {
  while (next < count) {
    next++;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const conn = await Promise.race([
      Deno.connect({ hostname: "127.0.0.1", port }).catch(() => null),
      new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), 5_000)),
    ]);
    clearTimeout(timer);
    if (conn) held.push(conn);
    else failed++;
  }
}
await Promise.all(Array.from({ length: 64 }, worker));
console.log(JSON.stringify({ opened: held.length, failed }));
// Held until killed; bounded all the same, should the test that started it die first.
setTimeout(() => Deno.exit(0), 300_000);
