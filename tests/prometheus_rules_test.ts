// deploy/prometheus: the alert rules are valid, their unit tests (alerts_test.yml) pass, and the
// compose scrape config is valid, with its optional bearer-token block switched on as well.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { promtool, promtoolAvailable } from "./_prometheus.ts";

const DIR = fileURLToPath(new URL("../deploy/prometheus/", import.meta.url));
const NAME = "deploy/prometheus: promtool checks the rules, runs their tests, checks the config";

const status = await promtoolAvailable();

function assertOk(result: { code: number; stdout: string; stderr: string }, what: string) {
  assert.equal(result.code, 0, `${what} exited ${result.code}:\n${result.stdout}${result.stderr}`);
}

Deno.test({
  name: status.ok ? NAME : `${NAME} (skipped: ${status.reason})`,
  ignore: !status.ok,
  async fn(t) {
    await t.step("promtool check rules alerts.yml", async () => {
      const result = await promtool(["check", "rules", `${DIR}alerts.yml`]);
      assertOk(result, "promtool check rules");
      assert.match(result.stdout, /SUCCESS: \d+ rules found/);
    });

    await t.step("promtool test rules alerts_test.yml", async () => {
      const result = await promtool(["test", "rules", `${DIR}alerts_test.yml`]);
      assertOk(result, "promtool test rules");
      assert.match(result.stdout, /SUCCESS/);
    });

    await t.step("every alert has a test where it fires", async () => {
      const rules = await Deno.readTextFile(`${DIR}alerts.yml`);
      const tests = await Deno.readTextFile(`${DIR}alerts_test.yml`);
      const alerts = [...rules.matchAll(/^\s*- alert: (\S+)/gm)].map((m) => m[1]);
      assert.ok(alerts.length > 0);
      for (const alert of alerts) {
        assert.match(tests, new RegExp(`- name: ${alert} fires`), `no firing test for ${alert}`);
      }
    });

    await t.step("promtool check config prometheus.yml", async () => {
      const result = await promtool(["check", "config", `${DIR}prometheus.yml`]);
      assertOk(result, "promtool check config");
    });

    await t.step("the config with its bearer-token block uncommented is valid too", async () => {
      // credentials_file must exist for promtool: point it at a temp file, keep the rest.
      const dir = await Deno.makeTempDir({ prefix: "gw-promconfig-" });
      try {
        const tokenFile = `${dir}/token`;
        await Deno.writeTextFile(tokenFile, "a-token");
        const original = await Deno.readTextFile(`${DIR}prometheus.yml`);
        const config = original
          .replace("    # authorization:", "    authorization:")
          .replace("    #   type: Bearer", "      type: Bearer")
          .replace(
            / {4}# {3}credentials_file: \S+/,
            `      credentials_file: ${JSON.stringify(tokenFile)}`,
          )
          .replace("  - alerts.yml", `  - ${JSON.stringify(`${DIR}alerts.yml`)}`);
        assert.notEqual(config, original);
        assert.match(config, /^ {4}authorization:\n {6}type: Bearer\n {6}credentials_file: /m);
        await Deno.writeTextFile(`${dir}/prometheus.yml`, config);
        assertOk(await promtool(["check", "config", `${dir}/prometheus.yml`]), "check config");
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});
