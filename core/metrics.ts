type Labels = Record<string, string>;

interface Family {
  help: string;
  type: "counter" | "gauge";
  values: Map<string, number>;
  read?: () => number;
}

/** Series keys by label name, then value, then the next label's name…: no strings built per call. */
interface KeyNode {
  next: Map<string, KeyNode>;
  key?: string;
}

const MAX_CACHED_KEYS = 10_000;
const NO_LABELS: Labels = {};

/** Counters and gauges rendered in the Prometheus text format; no I/O. */
export class Metrics {
  #families = new Map<string, Family>();
  #keys: KeyNode = { next: new Map() };
  #cached = 0;

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
  inc(name: string, labels: Labels = NO_LABELS, by = 1): void {
    const family = this.#families.get(name);
    if (!family) throw new RangeError(`Unknown metric "${name}"`);
    const key = this.#keyOf(labels);
    family.values.set(key, (family.values.get(key) ?? 0) + by);
  }

  /** The escaped series key of a label set; called per message, so built once per label set. */
  #keyOf(labels: Labels): string {
    let node: KeyNode | undefined = this.#keys;
    for (const k in labels) {
      node = node.next.get(k)?.next.get(labels[k]);
      if (node === undefined) break;
    }
    if (node?.key !== undefined) return node.key;
    const key = Object.entries(labels).map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, "_")}"`)
      .join(",");
    if (this.#cached < MAX_CACHED_KEYS) {
      this.#cached++;
      let at = this.#keys;
      for (const k in labels) at = child(child(at, k), labels[k]);
      at.key = key;
    }
    return key;
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

function child(node: KeyNode, name: string): KeyNode {
  let next = node.next.get(name);
  if (next === undefined) node.next.set(name, next = { next: new Map() });
  return next;
}
