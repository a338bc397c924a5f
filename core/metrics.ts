type Labels = Record<string, string>;

interface Family {
  help: string;
  type: "counter" | "gauge";
  values: Map<string, number>;
  read?: () => number;
}

const MAX_CACHED_KEYS = 10_000;

/** Counters and gauges rendered in the Prometheus text format; no I/O. */
export class Metrics {
  #families = new Map<string, Family>();
  #keys = new Map<string, string>();

  /** Declares a counter. */
  counter(name: string, help: string): void {
    this.#families.set(name, { help, type: "counter", values: new Map() });
  }

  /** Declares a gauge read at scrape time. */
  gauge(name: string, help: string, read: () => number): void {
    this.#families.set(name, { help, type: "gauge", values: new Map(), read });
  }

  /** Declares a counter kept elsewhere and read at scrape time (it only ever grows). */
  counterOf(name: string, help: string, read: () => number): void {
    this.#families.set(name, { help, type: "counter", values: new Map(), read });
  }

  /** Adds `by` to a counter's labelled series. */
  inc(name: string, labels: Labels = {}, by = 1): void {
    const family = this.#families.get(name);
    if (!family) throw new RangeError(`Unknown metric "${name}"`);
    // Called per message: the escaped series key is built once per distinct label set.
    let raw = "";
    for (const k in labels) raw += `${k}\u0000${labels[k]}\u0000`;
    let key = this.#keys.get(raw);
    if (key === undefined) {
      key = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, "_")}"`)
        .join(",");
      if (this.#keys.size < MAX_CACHED_KEYS) this.#keys.set(raw, key);
    }
    family.values.set(key, (family.values.get(key) ?? 0) + by);
  }

  /** The exposition text. */
  render(): string {
    const lines: string[] = [];
    for (const [name, f] of this.#families) {
      lines.push(`# HELP ${name} ${f.help}`, `# TYPE ${name} ${f.type}`);
      if (f.read) lines.push(`${name} ${f.read()}`);
      for (const [key, value] of f.values) lines.push(`${name}${key ? `{${key}}` : ""} ${value}`);
    }
    return lines.join("\n") + "\n";
  }
}
